"""A Hub base is kept in the model store at the commit it resolved to, and result.json names that
folder (compress/basestore.py). The Hub is a local cache in Hugging Face's own layout, read
offline through the real `snapshot_download`."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from deltafleet.compress.basestore import snapshot_folder, store_base
from deltafleet.compress.checkpoint import resolve_model_dir

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "acme/tiny-base"


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """HF_HUB_CACHE holding the toy base as `acme/tiny-base` at COMMIT (refs/main -> COMMIT),
    files linked into blobs as huggingface_hub lays them out."""
    from deltafleet.toymodels import toy_pair

    base, _ = toy_pair("llama")
    repo = tmp_path / "hub" / "models--acme--tiny-base"
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for f in base.iterdir():
        if f.is_file():
            blob = repo / "blobs" / f"blob-{f.name}"
            shutil.copyfile(f, blob)
            (snap / f.name).symlink_to(os.path.relpath(blob, snap))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    # huggingface_hub reads its env into `constants` at import, which an earlier test may have
    # done: set both (snapshot_download reads constants.HF_HUB_CACHE at each call).
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return base


def test_a_hub_base_is_copied_once_per_commit_with_its_bytes(hub, tmp_path):
    old = os.umask(0o002)
    try:
        snapshot = resolve_model_dir(HUB_ID, "base")
        assert snapshot.name == COMMIT
        root = tmp_path / "store" / "bases" / "hub"
        stored = store_base(snapshot, HUB_ID, root)
    finally:
        os.umask(old)
    assert stored == root / "acme--tiny-base" / COMMIT
    for f in hub.iterdir():
        if f.is_file():
            copy = stored / f.name
            assert not copy.is_symlink() and copy.read_bytes() == f.read_bytes()
            assert copy.stat().st_mode & stat.S_IRGRP  # the store's group (replicas) can read it
    assert stored.stat().st_mode & stat.S_IWGRP  # ... and the operator can delete in it
    assert not [p for p in stored.parent.iterdir() if p.name.startswith(".")]  # no partial folder left
    # Stored already: the second Job reuses it and copies nothing.
    marker = stored / "config.json"
    before = marker.stat().st_mtime_ns
    assert store_base(snapshot, HUB_ID, root) == stored and marker.stat().st_mtime_ns == before


def test_only_resolved_commits_name_a_stored_base(tmp_path):
    with pytest.raises(ValueError, match="not a resolved commit"):
        snapshot_folder(tmp_path, HUB_ID, "main")


def test_compress_records_the_stored_base_and_it_loads_as_the_base(hub, tmp_path):
    """The CLI a Job runs: `--base <hub id> --base-store DIR` -> result.json's base_snapshot,
    a folder `from_pretrained` loads without the Hub, with the weights the delta was built on."""
    from deltafleet.compress.cli import main
    from deltafleet.compress.fingerprint import fingerprint_model
    from deltafleet.compress.api import load_model
    from deltafleet.toymodels import toy_pair

    import torch

    _, finetuned = toy_pair("llama")
    data = tmp_path / "cal.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    out, store = tmp_path / "out", tmp_path / "store" / "bases" / "hub"
    assert main(["--base", HUB_ID, "--finetuned", str(finetuned), "--out", str(out), "--base-store", str(store),
                 "--steps", "0", "--samples", "4", "--seq-len", "16", "--calibration", str(data)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["base_snapshot"] == str(store / "acme--tiny-base" / COMMIT)
    assert result["base_model"] == HUB_ID
    model = load_model(Path(result["base_snapshot"]), torch.device("cpu"), torch.float32)
    assert fingerprint_model(model) == result["base_fingerprint"]


def test_a_local_base_is_not_copied(tmp_path):
    from deltafleet.compress.cli import main
    from deltafleet.toymodels import toy_pair

    base, finetuned = toy_pair("llama")
    data = tmp_path / "cal.txt"
    data.write_text("def f(x):\n    return x + 1\n" * 200)
    store = tmp_path / "store"
    assert main(["--base", str(base), "--finetuned", str(finetuned), "--out", str(tmp_path / "out"), "--base-store", str(store),
                 "--steps", "0", "--samples", "4", "--seq-len", "16", "--calibration", str(data)]) == 0
    assert json.loads((tmp_path / "out" / "result.json").read_text())["base_snapshot"] is None
    assert not store.exists() or not any(store.iterdir())
