"""The delta file: atomic, durable writes, and truncated / tampered / foreign files refused with one line."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deltafleet.compress import format as fmt
from deltafleet.compress.format import Delta, DeltaError, load_delta, read_metadata, save_delta
from deltafleet.kernels.packing import pack_signs


def small_delta(seed: int = 0) -> Delta:
    g = torch.Generator().manual_seed(seed)
    return Delta(
        base_model="base", base_fingerprint="ab" * 16, finetuned_model="ft",
        signs={"blocks.0.proj": pack_signs(torch.randn(8, 64, generator=g))},
        scales={"blocks.0.proj": torch.tensor(0.01)},
        whole={"norm.weight": torch.randn(64, generator=g)},
        settings={"steps": 1}, fidelity={"retained_improvement": 0.9}, sizes={"finetuned_bytes": 1},
    )


def test_round_trip(tmp_path):
    d = small_delta()
    path = save_delta(d, tmp_path / "delta.safetensors")
    back = load_delta(path, expected_fingerprint=d.base_fingerprint)
    assert torch.equal(back.signs["blocks.0.proj"], d.signs["blocks.0.proj"])
    assert torch.equal(back.whole["norm.weight"], d.whole["norm.weight"])
    assert back.fidelity == d.fidelity and back.settings == d.settings
    assert read_metadata(path)["base_fingerprint"] == d.base_fingerprint
    assert [p.name for p in tmp_path.iterdir()] == ["delta.safetensors"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def half_then_fail(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    monkeypatch.setattr(fmt, "save_file", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_delta(small_delta(), tmp_path / "delta.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_the_delta_is_fsynced_before_its_rename_and_the_rename_after(tmp_path, monkeypatch):
    is_dir = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (is_dir.append(stat.S_ISDIR(os.fstat(fd).st_mode)), real(fd))[1])
    save_delta(small_delta(), tmp_path / "delta.safetensors")
    assert is_dir == [False, True]  # compress/files.py write_atomic: the file, then its folder


KILLED_WRITER = """
import sys, torch
from deltafleet.compress.format import Delta, save_delta
big = torch.randn(48 * 1024 * 1024)  # ~200 MB: the write takes long enough to be killed mid-way
save_delta(Delta("base", "cd" * 16, "ft", whole={"big.weight": big}), sys.argv[1])
"""


def test_killed_write_keeps_old_file_valid(tmp_path):
    target = tmp_path / "delta.safetensors"
    old = small_delta()
    save_delta(old, target)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(target)])
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(p.name.endswith(".partial") and p.stat().st_size > 0 for p in tmp_path.iterdir()):
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    # Whatever the timing, the real name holds a complete, valid delta: the old one unless the
    # writer finished. A leftover temp file has a hidden `.partial` name no loader picks up.
    back = load_delta(target)
    assert back.base_fingerprint in (old.base_fingerprint, "cd" * 16)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != target.name]
    assert all(n.startswith(".delta.safetensors.") and n.endswith(".partial") for n in leftovers)
    if proc.returncode == -signal.SIGKILL:
        assert back.base_fingerprint == old.base_fingerprint


def test_truncated_file_refused(tmp_path):
    path = save_delta(small_delta(), tmp_path / "delta.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(DeltaError, match="delta.safetensors") as e:
        load_delta(path)
    assert "\n" not in str(e.value)


def test_tampered_tensor_refused(tmp_path):
    path = save_delta(small_delta(), tmp_path / "delta.safetensors")
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # flip bits inside the tensor data: the file still parses
    path.write_bytes(bytes(data))
    with pytest.raises(DeltaError, match="content hash mismatch"):
        load_delta(path)


def test_tampered_metadata_refused(tmp_path):
    path = save_delta(small_delta(), tmp_path / "delta.safetensors")
    data = path.read_bytes()
    forged = data.replace(b"ab" * 16, b"ef" * 16)  # claim another base; same length, still parses
    assert forged != data
    path.write_bytes(forged)
    with pytest.raises(DeltaError, match="content hash mismatch"):
        load_delta(path)


def test_wrong_base_refused(tmp_path):
    path = save_delta(small_delta(), tmp_path / "delta.safetensors")
    with pytest.raises(DeltaError, match="wrong base model"):
        load_delta(path, expected_fingerprint="00" * 16)


def test_not_a_delta_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(DeltaError, match="not a deltafleet delta"):
        load_delta(tmp_path / "model.safetensors")
    with pytest.raises(DeltaError, match="no such delta file"):
        load_delta(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(DeltaError, match="not a readable safetensors delta"):
        load_delta(tmp_path / "junk.safetensors")
