"""The decode kernel's compiled code for the H100/H200 (sm_90), checked here with no GPU.

Triton compiles for a target it does not have (bench/compiled_kernels.py): the SASS of the
16-row decode kernel's inner K loop is what every decode step of 16 tenants runs. Its budget:
at most 600 instructions per warp-step (578 with Triton 3.6 and 3.9, launch_table.DEFAULT), and
no layout conversion through shared memory in the loop (a store to shared and a load back; the
pipeline's async copies LDGSTS and the tensor-core operand loads LDSM are not conversions).
A config that regresses either (checked: BLOCK_K = 256 gives 1135 instructions; 8 warps gives 9
shared stores and 10 loads per iteration) fails here.

The paged attention kernel (decode and a prefill chunk) and the grouped lm_head GEMM must
compile for sm_90 with no spills (a spill is a local-memory round trip in the loop) and
within the H100's 227 KB of shared memory per block (more and the launch fails on the GPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LOOP_INSTRUCTIONS = 600

COMPILE = """
import json, sys
sys.path.insert(0, "bench")
import compiled_kernels
from deltafleet.kernels.launch_table import DEFAULT
print(json.dumps(compiled_kernels.decode_case(DEFAULT.decode[16], 90)))
"""


COMPILE_NEW_KERNELS = """
import json, sys
sys.path.insert(0, "bench")
import compiled_kernels
rows = [compiled_kernels.paged_attention_case(64, 1, 2048, 90), compiled_kernels.paged_attention_case(1, 512, 1024, 90),
        compiled_kernels.grouped_case(90)]
print(json.dumps(rows))
"""
H100_SHARED_BYTES = 227 * 1024  # the most shared memory one block may use on sm_90


def compiled_in_a_child(code: str):
    """The last stdout line of `code`, as JSON, run in a child that compiles for a GPU target."""
    # A child: this process has TRITON_INTERPRET=1 (conftest), under which nothing compiles for a GPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # as on the GPU (Triton's default), without 3.9's warning
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def decode_16_rows_sm90() -> dict:
    return compiled_in_a_child(COMPILE)


@pytest.mark.slow
def test_the_16_row_decode_loop_fits_600_instructions_per_warp_step_on_sm90(decode_16_rows_sm90):
    assert decode_16_rows_sm90["config"]["ROWS"] == 16
    assert decode_16_rows_sm90["inner_loop"]["instructions"] <= MAX_LOOP_INSTRUCTIONS, decode_16_rows_sm90["inner_loop"]


@pytest.mark.slow
def test_the_16_row_decode_loop_converts_no_layout_through_shared_memory_and_spills_nothing(decode_16_rows_sm90):
    loop = decode_16_rows_sm90["inner_loop"]
    assert (loop["shared_stores"], loop["shared_loads_not_ldsm"]) == (0, 0), loop
    assert (decode_16_rows_sm90["spill_store_bytes"], decode_16_rows_sm90["spill_load_bytes"]) in ((0, 0), (None, None))


@pytest.mark.slow
def test_paged_attention_and_the_grouped_lm_head_compile_for_sm90_without_spills_within_the_h100_shared_memory():
    rows = compiled_in_a_child(COMPILE_NEW_KERNELS)
    assert [r["kernel"] for r in rows] == ["paged attention Q=1 L=2048", "paged attention Q=512 L=1024",
                                           "grouped lm_head M=16 N=32000 E=16"]
    for row in rows:
        assert (row["spill_store_bytes"], row["spill_load_bytes"]) in ((0, 0), (None, None)), row
        assert row["stack_bytes"] == 0, row  # local memory: where spills would go
        assert 0 < row["shared_bytes"] <= H100_SHARED_BYTES, row
        assert row["inner_loop"]["instructions"] > 0, row  # the loop was found in the SASS
