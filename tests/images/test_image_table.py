"""One table of image names and tags (operator/images.py): the chart's values and rendered
Deployment, the operator's settings defaults, the package and chart versions and the docs
all name the same images. No cluster, no build."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
import yaml

from deltafleet.operator.images import IMAGES, ML_IMAGE, OPERATOR_IMAGE, RAY_VERSION, REGISTRY, VERSION
from deltafleet.operator.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "deltafleet"
# Every place outside the table that names a deltafleet image.
NAMING_FILES = ["README.md", "docs/images.md", "docs/kubernetes.md", "docs/operator.md", "charts/deltafleet/values.yaml"]
REF = re.compile(re.escape(REGISTRY) + r"/([a-z0-9-]+)(?::([\w.-]+))?")


def test_versions_agree():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert VERSION == chart["appVersion"] == project["version"]


def test_the_pools_ray_version_is_the_ray_the_ml_image_installs():
    # KubeRay starts the pool's pods from the ML image and must be told the Ray inside it.
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    locked = {p["name"]: p["version"] for p in lock["package"]}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert RAY_VERSION == locked["ray"] == values["pool"]["rayVersion"]


def test_values_name_the_tables_repositories():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["image"]["repository"] == IMAGES["operator"].repository
    assert values["compression"]["image"]["repository"] == IMAGES["ml"].repository
    # Empty tags: the chart's appVersion, which is the table's VERSION (above).
    assert values["image"]["tag"] == values["compression"]["image"]["tag"] == ""


def test_operator_defaults_run_jobs_from_the_ml_image():
    # Jobs run `deltafleet compress`, which needs torch: never the torch-less operator image.
    assert Settings().job_image == ML_IMAGE != OPERATOR_IMAGE


def test_dockerfiles_of_the_table_exist_and_install_their_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for kind, image in IMAGES.items():
        dockerfile = (ROOT / image.dockerfile).read_text()
        assert f"build/images/{kind}/" in dockerfile and image.extra in extras


@pytest.mark.parametrize("path", NAMING_FILES)
def test_docs_and_values_name_only_the_tables_images(path):
    text = (ROOT / path).read_text()
    names = {i.name for i in IMAGES.values()}
    for m in REF.finditer(text):
        assert m.group(1) in names, f"{path}: {m.group(0)} is not in operator/images.py"
        assert m.group(2) in (None, VERSION), f"{path}: {m.group(0)} carries another tag than {VERSION}"


def test_images_doc_lists_every_image():
    text = (ROOT / "docs" / "images.md").read_text()
    for image in IMAGES.values():
        assert image.ref() in text and image.dockerfile in text


def test_the_table_prints_for_make():
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(ROOT / "operator" / "images.py")], capture_output=True, text=True, check=True)
    table = json.loads(out.stdout)
    assert table["images"]["operator"]["ref"] == OPERATOR_IMAGE and table["version"] == VERSION
