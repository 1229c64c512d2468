"""The GPU check's own logic, fast and with no heavy environment: --only, the deadline, $OUT.

bench/gpu_check.py runs unattended on a GPU machine lent for minutes; what must hold there is
that a typo costs nothing, a hung step is killed with everything it started, the steps after it
are reported as skipped, and the report is in $OUT after every step. These tests drive its
functions (select, run_steps, Report) with small shell steps, and its command line where the
refusal comes before any import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_check  # noqa: E402


def plan(tmp: Path) -> list[gpu_check.Step]:
    return gpu_check.steps(sys.executable, "x", 90, tmp, "3.6.0")


def step(name: str, script: str, limit: int = 60) -> gpu_check.Step:
    """A step whose rehearsal command is a bash script (the GPU command is never run here)."""
    return gpu_check.Step(name, limit, ["false"], ["bash", "-c", script])


def alive(pid: int) -> bool:
    """Running or sleeping; a zombie (killed, not yet reaped by init) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def test_an_unknown_step_in_only_is_refused_in_one_line_before_anything_runs():
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--only", "kernels,kernals"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "gpu-check: --only kernals: no such step (kernels, tests-kernels, tests-serving, serving, tests-core, compiled)"]
    assert proc.stdout == ""
    assert time.monotonic() - t0 < 5  # refused before the preflight's imports (~10 s)


def test_only_keeps_just_the_named_steps_in_the_plans_order(tmp_path):
    assert [s.name for s in gpu_check.select(plan(tmp_path), "serving,kernels")] == ["kernels", "serving"]
    assert [s.name for s in gpu_check.select(plan(tmp_path), "")] == [s.name for s in plan(tmp_path)]


def test_a_step_past_the_deadline_is_killed_with_its_children_and_the_rest_is_skipped(tmp_path):
    out, pids = tmp_path / "out", tmp_path / "pids"
    report = gpu_check.Report(tmp_path / "results" / "gpu-check-t.json", out, {"env": "test"}, True, 8)
    # Step 2 leaves a grandchild sleeping in the background, and hangs; it first copies what $OUT
    # holds, to show that step 1's record was there while step 2 ran.
    hang = (f"cp {out}/gpu-check-t.json {tmp_path}/seen-during-step-2.json; "
            f"sleep 600 & echo $! >> {pids}; echo $$ >> {pids}; sleep 600")
    steps = [step("first", f"echo first > {tmp_path}/first.txt"), step("hang", hang, limit=100), step("after", "true")]
    start = time.monotonic()
    left = lambda: 8 - (time.monotonic() - start)  # noqa: E731 - an 8 s deadline

    failed = gpu_check.run_steps(steps, report, left, rehearse=True)

    assert time.monotonic() - start < 12
    assert failed == ["hang", "after"]
    records = json.loads((out / "gpu-check-t.json").read_text())["steps"]
    assert [(r["step"], r["rc"]) for r in records] == [("first", 0), ("hang", 124), ("after", None)]
    assert records[1]["timed_out"] is True and "[killed after" in records[1]["tail"]
    assert records[2]["skipped"] == "no time left"
    child_and_grandchild = [int(p) for p in pids.read_text().split()]
    assert len(child_and_grandchild) == 2
    deadline = time.monotonic() + 5
    while any(map(alive, child_and_grandchild)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(alive, child_and_grandchild)), child_and_grandchild
    seen = json.loads((tmp_path / "seen-during-step-2.json").read_text())
    assert [(r["step"], r["rc"]) for r in seen["steps"]] == [("first", 0)]


def test_every_step_copies_the_report_and_its_files_to_out(tmp_path):
    out = tmp_path / "out"
    report = gpu_check.Report(tmp_path / "results" / "gpu-check-t.json", out, {}, True, 60)
    report.write()  # as main does before the first step
    made = tmp_path / "results" / "made.json"
    writes = gpu_check.Step("writes", 30, ["false"], ["bash", "-c", f"echo '{{}}' > {made}"], [str(made)])
    fails = step("fails", "exit 3")

    failed = gpu_check.run_steps([writes, fails], report, lambda: 60, rehearse=True)

    assert failed == ["fails"]
    assert (out / "made.json").read_text() == "{}\n"
    assert [r["rc"] for r in json.loads((out / "gpu-check-t.json").read_text())["steps"]] == [0, 3]


@pytest.mark.slow
def test_a_failed_preflight_still_writes_the_report_with_its_error_to_out(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(ROOT)}
    # A preflight too short for any import (0.5 s): the children are killed and the check stops.
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--rehearse", "--preflight", "0.5", "--results",
                           str(tmp_path / "results")], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpu-check: preflight: importing the check's modules passed the preflight's 0.5 s"]
    report = json.loads((out / "gpu-check-rehearsal-cpu.json").read_text())
    assert report["preflight"]["error"].startswith("importing the check's modules passed")
    assert report["preflight"]["seconds"] < 5
    assert report["steps"] == []


def test_the_kernel_bench_on_a_gpu_measures_both_target_cases_at_every_shape_and_dtype_first():
    import kernels  # bench/kernels.py

    order = kernels.cases("cuda", kernels.GPU_SHAPES, kernels.GPU_TENANTS, kernels.GPU_ROWS_PER_TENANT, ("fp16", "bf16"))
    targets = [(t, r) for _, _, t, r, _ in order[:12]]
    assert set(targets) == {(16, 1), (1, 1)} and targets[:6] == [(16, 1)] * 6  # 3 shapes x 2 dtypes x 2 cases
    assert {(n, k, dt) for n, k, _, _, dt in order[:12]} == {(n, k, dt) for n, k in kernels.GPU_SHAPES for dt in ("fp16", "bf16")}
    rest = order[12:]
    assert all((t, r) not in kernels.TARGETS and dt == "fp16" and t * r <= kernels.GPU_MAX_ROWS for _, _, t, r, dt in rest)
    assert len(set(order)) == len(order) == 12 + 3 * 8  # each shape: the 8 other (T, rows) with T x rows <= 64


def test_compare_puts_the_committed_triton_36_and_39_reports_side_by_side():
    proc = subprocess.run([sys.executable, "bench/compiled_kernels.py", "--compare"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "sm_90, N = K = 4096, float16: Triton 3.6.0 → 3.9.0"
    row = next(ln for ln in lines if ln.startswith("| new decode ROWS=16 BN=8 |")).split(" | ")
    # registers, spills, shared bytes, loop instructions per warp-step: the committed figures
    assert row[1:5] == ["96 → 128", "0/0 → 0/0", "25600 → 25600", "578 → 578"]
    assert len([ln for ln in lines if ln.startswith("| ")]) == 1 + 15  # header + every kernel of the 3.6 report


def test_the_gpu_fit_preset_runs_as_many_tenants_as_the_devices_free_memory_holds_up_to_the_cap():
    import serving  # bench/serving.py

    p = serving.PRESETS["gpu-fit"]
    one = serving.tenants_that_fit(p, "cuda", free_bytes=0)
    # [bytes] a 7B-wide tenant: 8 layers' linears at 1 bit (4 x 4096^2 + 3 x 4096 x 11008 each) + 17 norms in fp16
    assert one["tenant_bytes"] == 8 * (4 * 4096 * 4096 + 3 * 4096 * 11008) // 8 + 17 * 4096 * 2
    room_for_10 = (one["base_bytes"] + one["kv_bytes"] + 10.5 * one["tenant_bytes"]) / 0.9
    assert serving.tenants_that_fit(p, "cuda", free_bytes=room_for_10)["fit"] == 10
    h100 = serving.tenants_that_fit(p, "cuda", free_bytes=79 * 2**30)
    assert h100["fit"] > serving.FIT_CAP["cuda"] == h100["run"]
    tiny = serving.resolve_tenants(serving.PRESETS["tiny"], "cpu")  # the rehearsal: a small number
    assert tiny["tenants"] == [1, 16, serving.FIT_CAP["cpu"]] and tiny["tenants_fit"]["run"] == serving.FIT_CAP["cpu"]
