"""The chart's image references: repository:tag from the table's version by default, or
repository@digest when image.digest is set (operator and compression Jobs alike)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from cluster.binaries import require_binaries
from deltafleet.operator.images import IMAGES, ML_IMAGE, OPERATOR_IMAGE

CHART = Path(__file__).resolve().parents[2] / "charts" / "deltafleet"
DIGEST = "sha256:" + "ab" * 32


def rendered(*sets: str) -> tuple[dict, dict]:
    argv = [str(require_binaries() / "helm"), "template", "df", str(CHART)]
    for s in sets:
        argv += ["--set", s]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")["spec"]["template"]["spec"]["containers"][0]
    test_pod = next(d for d in docs if d["kind"] == "Pod")["spec"]["containers"][0]
    return deployment, test_pod


def job_image(container: dict) -> str:
    return next(e["value"] for e in container["env"] if e["name"] == "DELTAFLEET_JOB_IMAGE")


def test_default_images_are_the_tables():
    operator, test_pod = rendered()
    assert operator["image"] == test_pod["image"] == OPERATOR_IMAGE
    assert job_image(operator) == ML_IMAGE


def test_a_digest_pins_each_image():
    operator, test_pod = rendered(f"image.digest={DIGEST}", f"compression.image.digest={DIGEST}", "image.tag=ignored")
    assert operator["image"] == test_pod["image"] == f"{IMAGES['operator'].repository}@{DIGEST}"
    assert job_image(operator) == f"{IMAGES['ml'].repository}@{DIGEST}"


def test_a_malformed_digest_is_refused():
    argv = [str(require_binaries() / "helm"), "template", "df", str(CHART), "--set", "image.digest=latest"]
    out = subprocess.run(argv, capture_output=True, text=True)
    assert out.returncode != 0 and "digest" in out.stderr
