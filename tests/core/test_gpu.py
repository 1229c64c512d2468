"""Compression on CUDA (bf16 models, streamed stage 1 on the GPU). Skipped without a GPU."""

import pytest
import torch

from deltafleet.compress.format import load_delta

pytestmark = pytest.mark.gpu


def test_compress_on_cuda_matches_cpu_fidelity(compressed, tmp_path):
    import dataclasses

    from deltafleet.compress import compress

    settings = dataclasses.replace(compressed.settings, device="cuda", dtype="bfloat16")
    result = compress(str(compressed.base), str(compressed.finetuned), tmp_path, settings)
    assert result.fidelity.retained_improvement >= 0.9
    assert abs(result.fidelity.loss_delta - compressed.result.fidelity.loss_delta) < 0.05
    delta = load_delta(tmp_path / "delta.safetensors", device="cuda")
    assert all(t.device.type == "cuda" for t in delta.signs.values())
    cpu = load_delta(compressed.out / "delta.safetensors")
    assert all(torch.equal(delta.signs[n].cpu(), cpu.signs[n]) for n in cpu.signs)  # same signs on every device
