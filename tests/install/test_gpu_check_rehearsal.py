"""The GPU check, rehearsed here exactly as the GPU machine will run it, with no network.

The GPU machine has no network and its own python3 (torch 2.11, Triton 3.6, transformers 5.17;
bench/gpu_wheels.py GPU_MACHINE). This builds that environment once (cached under
~/.cache/deltafleet by the pins' hash), builds the wheelhouse (`make gpu-wheels`: the wheels
that machine lacks, from uv.lock), installs it with pip --no-index --target as the README's
line does, and runs `bench/gpu_check.py --rehearse` under `unshare -n`: preflight (imports,
the `gpu` tests collected), the deadline, the report copied to $OUT, and a CPU stand-in for each
GPU step. What it cannot show: anything the GPU measures (documented in the README).
Differences from the GPU machine, each because this one cannot do otherwise: Python 3.11 (no
3.12 can be installed here), so the rehearsal's wheelhouse is the same versions built for cp311,
and numpy is the lock's (numpy 2.5 needs 3.12); torch's CUDA wheel runs without a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_wheels  # noqa: E402

pytestmark = pytest.mark.slow


def uv() -> str:
    return str(ROOT / ".uv/bin/uv")


def pip_python() -> str:
    """A Python with pip (the .uv bootstrap venv `make install` made) to run gpu_wheels with."""
    return str(ROOT / ".uv/bin/python")


@pytest.fixture(scope="module")
def gpu_machine_python() -> Path:
    """A venv holding the GPU machine's versions, built once per pin set."""
    pins = [f"{n}=={v}" for n, v in gpu_wheels.GPU_MACHINE.items() if n != "numpy"] + gpu_wheels.GPU_MACHINE_UNPINNED
    pins.append(f"numpy=={importlib.metadata.version('numpy')}")  # the lock's pick for this Python
    key = hashlib.sha256(" ".join(sorted(pins)).encode()).hexdigest()[:12]
    from deltafleet.toymodels import cache_root

    env = cache_root() / f"gpu-machine-{key}"
    if not (env / "DONE").is_file():
        shutil.rmtree(env, ignore_errors=True)
        subprocess.run([uv(), "venv", "-q", "--python", "python3.11", str(env)], check=True)
        venv = {**os.environ, "VIRTUAL_ENV": str(env)}
        subprocess.run([uv(), "pip", "install", "-q", *pins], check=True, env=venv)
        subprocess.run([uv(), "pip", "uninstall", "-q", *gpu_wheels.GPU_MACHINE_ABSENT], check=True, env=venv)
        (env / "DONE").write_text("\n".join(pins))
    return env / "bin" / "python"


def test_the_wheelhouse_for_the_gpu_machine_fits_and_holds_the_locked_versions(tmp_path):
    out = tmp_path / "whl"
    subprocess.run([pip_python(), "bench/gpu_wheels.py", "--out", str(out)], cwd=ROOT, check=True)
    info = json.loads((out / "MANIFEST.json").read_text())
    locked = gpu_wheels.locked_versions()
    assert {w["name"]: w["version"] for w in info["wheels"]} == {n: locked[n] for n in gpu_wheels.CARRIED}
    assert info["bytes"] <= gpu_wheels.MAX_WHEELHOUSE
    assert all("cp312" in w["file"] or "py3-none" in w["file"] for w in info["wheels"]), info["wheels"]


def test_the_gpu_check_runs_offline_on_the_gpu_machines_versions(gpu_machine_python, tmp_path):
    wheels, target, out, results = tmp_path / "whl", tmp_path / "site", tmp_path / "out", tmp_path / "results"
    subprocess.run([pip_python(), "bench/gpu_wheels.py", "--python-version", "3.11", "--out", str(wheels)], cwd=ROOT,
                   check=True)
    # From here on, what the README tells the GPU machine to run, with no network at all.
    offline = ["unshare", "-n"]
    install = [str(gpu_machine_python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
               *map(str, sorted(wheels.glob("*.whl")))]
    subprocess.run([*offline, *install], check=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{target}", "OUT": str(out)}
    env.pop("VIRTUAL_ENV", None)
    env.pop("TRITON_INTERPRET", None)  # tests/kernels sets it for this process; the GPU machine has none
    proc = subprocess.run([*offline, str(gpu_machine_python), "bench/gpu_check.py", "--rehearse", "--deadline", "300",
                           "--results", str(results)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check-rehearsal-cpu.json").read_text())
    assert report["env"]["torch"].startswith(gpu_wheels.GPU_MACHINE["torch"])
    assert report["env"]["triton"] == gpu_wheels.GPU_MACHINE["triton"]
    assert report["env"]["transformers"] == gpu_wheels.locked_versions()["transformers"]  # the carried one won
    assert str(target) in report["env"]["transformers_from"]
    steps = {s["step"]: s for s in report["steps"]}
    assert list(steps) == ["kernels", "tests-kernels", "tests-serving", "serving", "tests-core", "compiled"]
    assert all(s["rc"] == 0 for s in steps.values()), {n: s.get("tail", "")[-500:] for n, s in steps.items() if s["rc"]}
    assert {"kernels-rehearsal-cpu.json", "serving-rehearsal-cpu.json", f"kernels-compiled-sm90-triton{gpu_wheels.GPU_MACHINE['triton']}.json"} <= {
        p.name for p in out.iterdir()}


def test_a_missing_module_stops_the_check_in_preflight_with_one_line(gpu_machine_python, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # no wheelhouse: pydantic is missing, as on the bare GPU machine
    env.pop("VIRTUAL_ENV", None)
    proc = subprocess.run([str(gpu_machine_python), "bench/gpu_check.py", "--rehearse", "--results", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["gpu-check: preflight: cannot import pydantic: ModuleNotFoundError: No module named 'pydantic'"], lines
