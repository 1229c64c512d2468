"""What a user installs: ranges that admit today's ML stack, and a lock that matches them.

The lock (uv.lock) is what `make install`, CI and the images install; the ranges in
pyproject.toml are what `pip install deltafleet[serve]` sees next to a user's own torch and
transformers. These tests run the real resolver (uv) against both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def uv() -> str:
    found = os.environ.get("UV") or (str(ROOT / ".uv/bin/uv") if (ROOT / ".uv/bin/uv").exists() else shutil.which("uv"))
    if not found:
        raise AssertionError("uv not found: `make install` bootstraps it into .uv/ (or set UV=/path/to/uv)")
    return found


def locked_version(name: str) -> str:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    versions = {p["version"] for p in lock["package"] if p["name"] == name}
    assert len(versions) == 1, f"uv.lock holds {name} {sorted(versions)}"
    return versions.pop()


def test_the_lock_matches_the_ranges_in_pyproject():
    out = subprocess.run([uv(), "lock", "--check", "--offline"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, f"uv.lock is stale (run `make lock`):\n{out.stderr}"


def test_every_upper_bound_names_the_break_it_avoids():
    # A bound like numpy<2 that only worked around an old library silently downgrades users' stacks.
    from packaging.requirements import Requirement

    text = (ROOT / "pyproject.toml").read_text()
    project = tomllib.loads(text)["project"]
    reqs = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    capped = [r for r in reqs if any(s.operator in ("<", "<=", "==", "~=") for s in Requirement(r).specifier)]
    lines = {r: next(l for l in text.splitlines() if f'"{r}"' in l) for r in capped}
    unexplained = [r for r, line in lines.items() if "#" not in line]
    assert not unexplained, f"upper bounds without a comment naming the break: {unexplained}"


@pytest.mark.slow
def test_serve_extra_installs_next_to_current_torch_and_transformers_without_changing_them(tmp_path):
    # A user's environment that already holds the ML stack (the lock's torch and transformers).
    torch_v, transformers_v = locked_version("torch"), locked_version("transformers")
    env = tmp_path / "user-env"
    subprocess.run([uv(), "venv", "-q", "--python", "python3", str(env)], check=True)
    py = str(env / "bin" / "python")
    subprocess.run([uv(), "pip", "install", "-q", "--python", py, f"torch=={torch_v}", f"transformers=={transformers_v}"],
                   check=True)
    out = subprocess.run([uv(), "pip", "install", "--dry-run", "--python", py, f"{ROOT}[serve]"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    changes = [l.strip() for l in out.stderr.splitlines() if l.strip()[:2] in ("+ ", "- ")]
    assert any(c.startswith("+ ray") for c in changes), f"the dry run installs nothing?\n{out.stderr}"
    touched = [c for c in changes if re.match(r"[+-] (torch|transformers|triton)==", c)]
    assert not touched, f"installing deltafleet[serve] would change the user's ML stack: {touched}"
