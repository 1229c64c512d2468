"""The images built from images/*/Dockerfile the way the tests build them (images/build.py
--unpack: mmdebstrap base, buildah vfs/chroot, unpacked for the pod runner), once per input
hash; `make test` builds them before pytest, so here they are normally a cache lookup."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def build_module():
    spec = importlib.util.spec_from_file_location("deltafleet_images_build", ROOT / "images" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _unpacked(kind: str) -> dict:
    build = build_module()
    try:
        folder = build.unpacked(kind)
    except build.BuildError as e:
        pytest.fail(f"the {kind} image: {e}", pytrace=False)
    meta = json.loads((folder / "image.json").read_text())
    return {"folder": folder, "rootfs": folder / "rootfs", **meta, **json.loads((folder / "build.json").read_text())}


@pytest.fixture(scope="session")
def operator_image() -> dict:
    return _unpacked("operator")


@pytest.fixture(scope="session")
def ml_image() -> dict:
    return _unpacked("ml")
