"""The GPU check: every GPU figure in one unattended run on a GPU machine with no network.

On the GPU machine (its own python3 holds torch, Triton and transformers; `.whl/` from
`make gpu-wheels` holds what it lacks), from the repository root, no make, no install step:

    python3 -m pip install -q --no-index --no-deps --target /tmp/df-wheels .whl/*.whl && \\
      PYTHONPATH=$PWD:/tmp/df-wheels python3 bench/gpu_check.py

Steps, in order of value, all under one deadline (--deadline, default 420 s):
  preflight      every module and bench script the steps import, and the `gpu` tests
                 collected, at once in children killed at --preflight (20 s); on failure the report
                 (with the error) still goes to $OUT, then exit 2 with one line
  env            device, driver, versions (in process)
  kernels        bench/kernels.py at Llama-2-7B shapes: copy bandwidth, base, ours, baselines;
                 the target cases (16 x 1, 1 x 1; fp16, bf16) first, its JSON written after each case
  tests-kernels  pytest -m gpu tests/kernels (device-side random data)
  tests-serving  pytest -m gpu tests/serving (CUDA-graph capture and replay)
  serving        bench/serving.py --preset gpu-fit (7B widths, tenants 1, 16 and as many as fit;
                 random weights drawn on the GPU, through a temporary folder: Engine takes paths)
  tests-core     pytest -m gpu tests/core (compression on CUDA)
  compiled       bench/compiled_kernels.py for this GPU's architecture (needs no GPU)
Each child runs in its own process group and is killed when its time is up. The report
(`gpu-check-<gpu>.json`) and every file a step wrote are copied to $OUT after every step, so a
run cut short still returns what it measured. `--only kernels,serving` reruns a few steps.

`--rehearse` runs the same program where there is no GPU (make test does, with no network):
preflight, collection, the deadline and $OUT logic, and a CPU stand-in for each GPU step
(kernels --quick, serving --preset tiny, the tests collected only); it proves the check starts,
finds everything and reports, not what the GPU will measure.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEADLINE_S = 420
PREFLIGHT_S = 20
# What any step imports: preflight fails in one line when one is missing, before a minute is spent.
MODULES = ["torch", "triton", "transformers", "safetensors", "tokenizers", "numpy", "pydantic", "yaml", "pytest",
           "deltafleet.kernels", "deltafleet.kernels.triton_decode", "deltafleet.compress", "deltafleet.serving.engine",
           "deltafleet.serving.decode_graphs"]
# The bench scripts the steps run, imported by path (their module-level imports and constants).
SCRIPTS = ["bench/kernels.py", "bench/serving.py", "bench/compiled_kernels.py"]
MIN_TRANSFORMERS = (5, 24)
GPU_TESTS = ["tests/kernels", "tests/serving", "tests/core"]


@dataclass
class Step:
    name: str
    limit: int  # seconds, within what is left of the deadline
    gpu: list[str]  # the command on a GPU
    rehearsal: list[str] | None  # its CPU stand-in (None: skipped in a rehearsal)
    outputs: list[str] = field(default_factory=list)  # files the step writes


def steps(py: str, slug: str, arch: int, res: Path, triton: str) -> list[Step]:
    compiled = f"{res}/kernels-compiled-sm{arch}-triton{triton}.json"
    pytest = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu"]
    return [
        Step("kernels", 150, [py, "bench/kernels.py", "--out", f"{res}/kernels-{slug}.json"],
             [py, "bench/kernels.py", "--quick", "--threads", "1", "--out", f"{res}/kernels-{slug}.json"],
             [f"{res}/kernels-{slug}.json"]),
        Step("tests-kernels", 90, [*pytest, "tests/kernels"], [*pytest, "--collect-only", "tests/kernels"]),
        Step("tests-serving", 60, [*pytest, "tests/serving"], [*pytest, "--collect-only", "tests/serving"]),
        Step("serving", 150, [py, "bench/serving.py", "--preset", "gpu-fit", "--out", f"{res}/serving-{slug}.json"],
             [py, "bench/serving.py", "--preset", "tiny", "--out", f"{res}/serving-{slug}.json"],
             [f"{res}/serving-{slug}.json"]),
        Step("tests-core", 60, [*pytest, "tests/core"], [*pytest, "--collect-only", "tests/core"]),
        Step("compiled", 60, [py, "bench/compiled_kernels.py", "--arch", str(arch), "--out", compiled],
             [py, "bench/compiled_kernels.py", "--arch", str(arch), "--out", compiled], [compiled]),
    ]


def run(cmd: list[str], limit: float) -> tuple[int, str, float]:
    """(exit code, output tail, seconds); the child's whole process group is killed at `limit`."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=max(1.0, limit))
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        rc, out = 124, (out or "") + f"\n[killed after {limit:.0f} s]"
    return rc, out or "", round(time.monotonic() - t0, 1)


def import_problem() -> str | None:
    """One line saying which module or bench script fails to import (or transformers is too old), or None."""
    import importlib.util

    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is the one line we print
            return f"cannot import {name}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    for script in SCRIPTS:  # imported under another name, so their `if __name__ == "__main__"` stays off
        try:
            spec = importlib.util.spec_from_file_location(f"gpu_check_{Path(script).stem}", ROOT / script)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        except Exception as e:  # noqa: BLE001
            return f"cannot import {script}: {type(e).__name__}: {' '.join(str(e).split())[:200]}"
    import transformers

    version = tuple(int(p) for p in re.findall(r"\d+", transformers.__version__)[:2])
    if version < MIN_TRANSFORMERS:
        return (f"transformers {transformers.__version__} (from {Path(transformers.__file__).parent}) is older than "
                f"{'.'.join(map(str, MIN_TRANSFORMERS))}: put the wheelhouse first on PYTHONPATH")
    return None


def preflight(py: str, limit: float) -> str | None:
    """One line saying what is missing, or None, within `limit` seconds for imports and collection together.

    Both run at once in children whose process groups are killed at the limit: an import that
    hangs (a driver, a lock) costs the preflight's seconds, not the check's. The imports child is
    this file with the hidden `--preflight-imports`: it prints import_problem()'s line, exit 1."""
    t0 = time.monotonic()
    cmds = {"imports": [py, str(Path(__file__).resolve()), "--preflight-imports"],
            "collection": [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--collect-only", "-m", "gpu", *GPU_TESTS]}
    procs = {k: subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True) for k, c in cmds.items()}
    done = {}
    try:
        for k, proc in procs.items():
            out, _ = proc.communicate(timeout=max(0.1, limit - (time.monotonic() - t0)))
            done[k] = (proc.returncode, [ln for ln in out.splitlines() if ln.strip()])
    except subprocess.TimeoutExpired:
        pass
    finally:
        for k, proc in procs.items():
            if k not in done:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    if "imports" not in done:
        return f"importing the check's modules passed the preflight's {limit:g} s"
    rc, lines = done["imports"]
    if rc != 0:
        return lines[-1] if lines else f"the imports child exited {rc}"
    if "collection" not in done:
        return f"collecting the gpu tests passed the preflight's {limit:g} s"
    rc, lines = done["collection"]
    if rc not in (0, 5):  # 5: nothing collected
        return f"the gpu tests do not collect (pytest exit {rc}): {' | '.join(lines[-3:])[:300]}"
    return None


def installed() -> dict:
    """Versions as installed, importing nothing (a failed preflight's report: an import may be what hangs)."""
    import importlib.metadata
    import importlib.util

    env = {"python": platform.python_version(), "cpu": platform.processor(), "cuda_available": None}
    for name in ("torch", "triton", "transformers"):
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = None
    spec = importlib.util.find_spec("transformers")
    env["transformers_from"] = str(Path(spec.origin).parent) if spec and spec.origin else None
    env.update(nvidia_smi())
    return env


def nvidia_smi() -> dict:
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        return {"nvidia_smi": smi, "driver": smi.split(",")[1].strip() if smi else None}
    except (OSError, subprocess.SubprocessError) as e:
        return {"nvidia_smi": f"unavailable: {e}"}


def environment() -> dict:
    """Device, driver and versions, from the modules imported (after a passed preflight)."""
    import torch
    import transformers
    import triton

    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton.__version__,
           "transformers": transformers.__version__, "transformers_from": str(Path(transformers.__file__).parent),
           "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "cpu": platform.processor()}
    if env["cuda_available"]:
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                   memory_GiB=round(props.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
    env.update(nvidia_smi())
    return env


class Report:
    """The check's JSON, rewritten (and copied to $OUT with every step's files) after each step."""

    def __init__(self, path: Path, out: Path | None, env: dict, rehearse: bool, deadline: float) -> None:
        self.path, self.out = path, out
        self.data = {"env": env, "rehearsal": rehearse, "deadline_s": deadline, "steps": []}
        self.files = [path]

    def add(self, record: dict, files: list[Path]) -> None:
        self.data["steps"].append(record)
        self.files += [f for f in files if f.is_file() and f not in self.files]
        self.write()

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".partial")
        tmp.write_text(json.dumps(self.data, indent=1) + "\n")
        os.replace(tmp, self.path)
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            for f in self.files:
                shutil.copyfile(f, self.out / f.name)


def select(plan: list[Step], only: str) -> list[Step]:
    """The steps `--only a,b` names, in the plan's order (all when empty); SystemExit with one line for a name not there."""
    if not only:
        return plan
    wanted = set(only.split(","))
    unknown = wanted - {s.name for s in plan}
    if unknown:
        raise SystemExit(f"gpu-check: --only {','.join(sorted(unknown))}: no such step ({', '.join(s.name for s in plan)})")
    return [s for s in plan if s.name in wanted]


def run_steps(plan: list[Step], report: Report, left, rehearse: bool) -> list[str]:
    """Run each step within min(its limit, what is left of the deadline); the names of those failed or cut short."""
    failed = []
    for step in plan:
        cmd = step.rehearsal if rehearse else step.gpu
        if cmd is None or left() < 5:
            report.add({"step": step.name, "rc": None, "seconds": 0, "skipped": "no time left" if cmd else "rehearsal"}, [])
            failed += [step.name] if cmd else []
            continue
        limit = min(step.limit, left() - 2)
        print(f"\n=== {step.name}: {' '.join(cmd)} (limit {limit:.0f} s)", flush=True)
        rc, output, seconds = run(cmd, limit)
        print(output[-4000:], flush=True)
        record = {"step": step.name, "rc": rc, "seconds": seconds, "limit_s": round(limit), "command": cmd,
                  "tail": output[-3000:]}
        if rc == 124:
            record["timed_out"] = True
        report.add(record, [Path(f) for f in step.outputs])
        if rc != 0:
            failed.append(step.name)
    return failed


def slug_of(env: dict, rehearse: bool) -> str:
    name = env.get("device") or (env.get("nvidia_smi") or "").split(",")[0] or ("rehearsal-cpu" if rehearse else "unknown-gpu")
    if name.startswith("unavailable"):
        name = "rehearsal-cpu" if rehearse else "unknown-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--deadline", type=float, default=DEADLINE_S, help=f"seconds for the whole check (default {DEADLINE_S})")
    ap.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    ap.add_argument("--rehearse", action="store_true", help="no GPU: run each GPU step's CPU stand-in")
    ap.add_argument("--results", default=str(RESULTS), help="where the JSON goes (default bench/results)")
    ap.add_argument("--preflight", type=float, default=PREFLIGHT_S,
                    help=f"seconds for the preflight's imports and collection together (default {PREFLIGHT_S})")
    ap.add_argument("--preflight-imports", action="store_true", help=argparse.SUPPRESS)  # preflight's child
    args = ap.parse_args(argv)
    if args.preflight_imports:
        problem = import_problem()
        print(problem or "imports ok")
        return 1 if problem else 0
    start = time.monotonic()
    py = sys.executable
    left = lambda: args.deadline - (time.monotonic() - start)  # noqa: E731
    try:  # names only, before a second is spent: a typo is refused in one line
        select(steps(py, "x", 90, Path(args.results), "x"), args.only)
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    problem = preflight(py, min(args.preflight, left()))
    preflight_s = round(time.monotonic() - start, 1)
    env = installed() if problem else environment()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    results = Path(args.results).resolve()
    report = Report(results / f"gpu-check-{slug_of(env, args.rehearse)}.json", out, env, args.rehearse, args.deadline)
    report.data["preflight"] = {"seconds": preflight_s, "limit_s": args.preflight, "error": problem}
    report.write()  # in $OUT even when the preflight failed: the one line, the versions found
    if problem:
        print(f"gpu-check: preflight: {problem}", file=sys.stderr)
        return 2
    print(json.dumps(env, indent=1), flush=True)
    print(f"preflight: {preflight_s} s", flush=True)
    if not env["cuda_available"] and not args.rehearse:
        print("gpu-check: no CUDA device visible (use --rehearse to check the program without one)", file=sys.stderr)
        return 2
    arch = int(env["capability"].replace(".", "")) if env["cuda_available"] else 90
    plan = select(steps(py, slug_of(env, args.rehearse), arch, results, env["triton"]), args.only)
    failed = run_steps(plan, report, left, args.rehearse)
    report.data["total_seconds"] = round(time.monotonic() - start, 1)
    report.write()
    print("\n| step | rc | seconds |\n|---|---|---|")
    for s in report.data["steps"]:
        print(f"| {s['step']} | {s['rc'] if s['rc'] is not None else s.get('skipped')} | {s['seconds']} |")
    print(f"\nwrote {report.path} ({report.data['total_seconds']} s){f' and copied to {out}' if out else ''}")
    if failed:
        print(f"gpu-check: failed or cut short: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
