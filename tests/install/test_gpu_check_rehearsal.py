"""The GPU check, rehearsed here exactly as the GPU machine will run it, with no network.

The GPU machine has no network and its own python3 (3.12, torch 2.11, Triton 3.6, transformers
5.17, numpy 2.5; bench/gpu_wheels.py GPU_MACHINE). This builds that environment once (cached
under ~/.cache/deltafleet by the interpreter's and the pins' hash; cold, it downloads torch 2.11
with its CUDA libraries), builds the wheelhouse (`make gpu-wheels`: the wheels that machine
lacks, from uv.lock) for the environment's Python, installs it with pip --no-index --target as the
line in docs/testing.md ("GPU check") does, and runs `bench/gpu_check.py --rehearse` under `unshare -n`: preflight
(imports, the `gpu` tests collected, within 20 s), the deadline, the report copied to $OUT, and a
CPU stand-in for each GPU step. What it cannot show: anything the GPU measures (docs/testing.md).
Python: a 3.12 when this machine has one (`uv python find 3.12`, else pyenv's), so the cp312
wheelhouse is installed exactly as shipped, with numpy 2.5 as there; without one, Python 3.11
(the reason is printed and kept in the environment's DONE file), the wheelhouse's same versions
built for cp311 and the lock's numpy. torch's CUDA wheel runs without a GPU.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import time
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


def python_312() -> tuple[str, str | None]:
    """(interpreter, why not 3.12): the GPU machine's 3.12 when this machine has one, else python3.11."""
    found = subprocess.run([uv(), "python", "find", "--no-python-downloads", "3.12"], capture_output=True, text=True)
    if found.returncode == 0 and found.stdout.strip():
        return found.stdout.strip(), None
    pyenv = sorted(Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))  # uv misses pyenv's when its shim fails
    if pyenv:
        return str(pyenv[-1]), None
    return "python3.11", f"no Python 3.12 here (uv python find: {' '.join(found.stderr.split())[:200]})"


@pytest.fixture(scope="module")
def gpu_machine_python() -> Path:
    """A venv holding the GPU machine's versions, built once per interpreter and pin set."""
    python, why_not_312 = python_312()
    if why_not_312:
        print(f"gpu-machine rehearsal on Python 3.11: {why_not_312}")
    on_312 = why_not_312 is None
    pins = [f"{n}=={v}" for n, v in gpu_wheels.GPU_MACHINE.items() if n != "numpy"] + gpu_wheels.GPU_MACHINE_UNPINNED
    # numpy: the GPU machine's (2.5 needs 3.12), else the lock's pick for 3.11
    pins.append(f"numpy=={gpu_wheels.GPU_MACHINE['numpy'] if on_312 else importlib.metadata.version('numpy')}")
    key = hashlib.sha256(" ".join([python, *sorted(pins)]).encode()).hexdigest()[:12]
    from deltafleet.toymodels import cache_root

    env = cache_root() / f"gpu-machine-{key}"
    if not (env / "DONE").is_file():
        shutil.rmtree(env, ignore_errors=True)
        t0 = time.monotonic()
        subprocess.run([uv(), "venv", "-q", "--python", python, str(env)], check=True)
        venv = {**os.environ, "VIRTUAL_ENV": str(env)}
        subprocess.run([uv(), "pip", "install", "-q", *pins], check=True, env=venv)
        subprocess.run([uv(), "pip", "uninstall", "-q", *gpu_wheels.GPU_MACHINE_ABSENT], check=True, env=venv)
        built = f"built in {time.monotonic() - t0:.0f} s with {python}" + (f" ({why_not_312})" if why_not_312 else "")
        print(f"gpu-machine env {env.name}: {built}")
        (env / "DONE").write_text("\n".join([*pins, built]))
    return env / "bin" / "python"


def python_version(python: Path) -> str:
    return subprocess.run([str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                          capture_output=True, text=True, check=True).stdout.strip()


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
    version = python_version(gpu_machine_python)  # 3.12: the wheelhouse exactly as shipped
    subprocess.run([pip_python(), "bench/gpu_wheels.py", "--python-version", version, "--out", str(wheels)], cwd=ROOT,
                   check=True)
    # From here on, what docs/testing.md tells the GPU machine to run, with no network at all.
    offline = ["unshare", "-n"]
    install = [str(gpu_machine_python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target", str(target),
               *map(str, sorted(wheels.glob("*.whl")))]
    subprocess.run([*offline, *install], check=True)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{target}", "OUT": str(out)}
    env.pop("VIRTUAL_ENV", None)
    env.pop("TRITON_INTERPRET", None)  # tests/kernels sets it for this process; the GPU machine has none
    # --preflight 60: this machine's 2 shared cores import transformers 5.24 (torch.distributed,
    # dynamo, sympy) in 10-20 s under load; the GPU machine's 16 take the default 20 s limit.
    proc = subprocess.run([*offline, str(gpu_machine_python), "bench/gpu_check.py", "--rehearse", "--deadline", "300",
                           "--preflight", "60", "--results", str(results)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu-check-rehearsal-cpu.json").read_text())
    assert report["env"]["python"].startswith(version)
    assert report["env"]["torch"].startswith(gpu_wheels.GPU_MACHINE["torch"])
    assert report["env"]["triton"] == gpu_wheels.GPU_MACHINE["triton"]
    assert report["env"]["transformers"] == gpu_wheels.locked_versions()["transformers"]  # the carried one won
    assert str(target) in report["env"]["transformers_from"]
    assert report["preflight"]["error"] is None and report["preflight"]["seconds"] <= 60
    steps = {s["step"]: s for s in report["steps"]}
    print("rehearsal timings:", {"preflight": report["preflight"]["seconds"], **{n: s["seconds"] for n, s in steps.items()},
                                 "total": report["total_seconds"]})
    assert list(steps) == ["kernels", "tests-kernels", "tests-serving", "serving", "tests-core", "compiled"]
    assert all(s["rc"] == 0 for s in steps.values()), {n: s.get("tail", "")[-500:] for n, s in steps.items() if s["rc"]}
    assert {"kernels-rehearsal-cpu.json", "serving-rehearsal-cpu.json", f"kernels-compiled-sm90-triton{gpu_wheels.GPU_MACHINE['triton']}.json"} <= {
        p.name for p in out.iterdir()}


def test_a_missing_module_stops_the_check_in_preflight_with_one_line(gpu_machine_python, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OUT": str(tmp_path / "out")}  # no wheelhouse: pydantic is missing,
    env.pop("VIRTUAL_ENV", None)  # as on the bare GPU machine
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([str(gpu_machine_python), "bench/gpu_check.py", "--rehearse", "--results", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["gpu-check: preflight: cannot import pydantic: ModuleNotFoundError: No module named 'pydantic'"], lines
    report = json.loads((tmp_path / "out" / "gpu-check-rehearsal-cpu.json").read_text())  # still sent back
    assert report["preflight"]["error"] == lines[0].removeprefix("gpu-check: preflight: ")
    assert report["env"]["triton"] == gpu_wheels.GPU_MACHINE["triton"] and report["steps"] == []
