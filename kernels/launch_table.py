"""Launch configs chosen ahead of time: nothing is autotuned on the serving path.

A table per GPU model (`kernels/tuned/<gpu-slug>.json`, written by `bench/tune_kernels.py`
on that GPU) maps a batch bucket to the decode kernel's tile, and gives the prefill delta
kernel's tile and the row count above which the prefill path takes over. A GPU without a
table gets DEFAULT, which only assumes an sm_80+ part. Every choice is a function of host
integers (M, N, K, the device): a CUDA graph captured for a batch bucket always replays
the same grid, whatever the tenant mix.

DEFAULT's decode tiles were picked from the sm_90 compiled code (bench/compiled_kernels.py):
the fewest inner-loop instructions per sign byte without spills, >= 512 programs at N = 4096
so that no split-K is needed at 7B shapes, and registers and shared memory that still let
all of those programs be resident at once (4 per SM on 132 SMs: <= 128 registers at 2 warps
would allow 8; the chosen tiles use 72-148 registers and 26-50 KB).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

TUNED_DIR = Path(__file__).parent / "tuned"
BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class DecodeConfig:
    rows: int  # rows per program (ROWS); a batch of M rows uses ceil(M / rows) row blocks
    block_n: int
    block_k: int  # a multiple of 32 (whole sign words)
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 0  # 0: chosen from the shape so the grid fills the GPU (split_k_for)

    def rows_per_program(self, m: int) -> int:
        return min(self.rows, bucket(m))


@dataclass(frozen=True)
class PrefillConfig:
    block_m: int = 64
    block_n: int = 64
    block_k: int = 64
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class LaunchTable:
    gpu: str
    decode: dict[int, DecodeConfig]  # batch bucket -> config
    prefill: PrefillConfig = field(default_factory=PrefillConfig)
    decode_max_rows: int = 16  # batches of more rows: cuBLAS base GEMM + the prefill delta kernel

    def decode_config(self, m: int) -> DecodeConfig:
        """The config of M's bucket, or of the largest bucket below it that the table has."""
        fitting = [b for b in self.decode if b <= bucket(m)] or [min(self.decode)]
        return self.decode[max(fitting)]

    def to_json(self) -> dict:
        return {"gpu": self.gpu, "decode": {str(k): asdict(v) for k, v in sorted(self.decode.items())},
                "prefill": asdict(self.prefill), "decode_max_rows": self.decode_max_rows}

    @classmethod
    def from_json(cls, data: dict) -> "LaunchTable":
        return cls(gpu=data["gpu"], decode={int(k): DecodeConfig(**v) for k, v in data["decode"].items()},
                   prefill=PrefillConfig(**data["prefill"]), decode_max_rows=int(data["decode_max_rows"]))


DEFAULT = LaunchTable(
    gpu="default",
    decode={  # sm_90 compiled figures (fp16) in instructions per sign byte; all 512 programs at N = 4096
        1: DecodeConfig(rows=1, block_n=8, block_k=256, num_warps=2),  # 50.5, 72 registers
        2: DecodeConfig(rows=2, block_n=8, block_k=256, num_warps=2),  # 33.3, 96 registers
        4: DecodeConfig(rows=4, block_n=8, block_k=256, num_warps=2),  # 26.4, 110 registers
        8: DecodeConfig(rows=8, block_n=8, block_k=256, num_warps=2),  # 19.2, 148 registers
        16: DecodeConfig(rows=16, block_n=8, block_k=128, num_warps=2),  # 18.1, 128 registers
    },
)


def bucket(m: int) -> int:
    """Batch bucket: the next power of two (graphs are captured per bucket)."""
    return 1 << (max(m, 1) - 1).bit_length()


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


@lru_cache(maxsize=None)
def table_for(gpu_name: str) -> LaunchTable:
    """The tuned table of this GPU model, or DEFAULT."""
    path = TUNED_DIR / f"{slug(gpu_name)}.json"
    if path.is_file():
        return LaunchTable.from_json(json.loads(path.read_text()))
    return DEFAULT


@lru_cache(maxsize=None)
def device_facts(device) -> tuple[str, int]:
    """(GPU name, SM count) of a torch device; a CPU (the interpreter) counts as one SM."""
    import torch

    if device.type != "cuda":
        return "cpu", 1
    props = torch.cuda.get_device_properties(device)
    return props.name, props.multi_processor_count


def split_k_for(config: DecodeConfig, m: int, n: int, k: int, sms: int) -> int:
    """K splits so the grid has >= 2 programs per SM, keeping >= 2 K tiles per split.

    A split costs a zeroed fp32 output, atomics and a cast (two small launches): only where
    N alone leaves SMs idle (e.g. a 1024-wide k/v projection)."""
    if config.split_k:
        return config.split_k
    programs = -(-m // config.rows_per_program(m)) * -(-n // config.block_n)
    k_tiles = -(-k // config.block_k)
    split = 1
    while programs * split < 2 * sms and k_tiles // (split * 2) >= 2 and split < 16:
        split *= 2
    return split
