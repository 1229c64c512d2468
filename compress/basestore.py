"""Bases in the model store. A compression Job whose base is a Hugging Face id copies the exact
snapshot it compressed against into `<root>/<org>--<name>/<commit>/`, once per commit, and
result.json records that folder. Serving replicas then load the base from the store: no token,
no network, and never another revision than the one the deltas were made against.

Layout (below the folder --base-store names; the operator's is operator/compression.py
`base_store_dir()`): `<org>--<name>/<40-hex commit>/` holding the
snapshot's files (config, tokenizer, *.safetensors). A folder appears whole (copied under a
temporary name, fsynced, then renamed and the rename fsynced, as compress/files.py writes
single files), so a replica never sees half a base.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .files import chmod_as_created, fsync_path
from .modelref import split_revision

_COMMIT = re.compile(r"^[0-9a-f]{40}$")


def snapshot_folder(root: Path, hub_id: str, commit: str) -> Path:
    """`<root>/<org>--<name>/<commit>`: the Hub cache's own naming, one folder per commit."""
    repo, _ = split_revision(hub_id)
    if not _COMMIT.match(commit):
        raise ValueError(f"{hub_id}: {commit!r} is not a resolved commit")
    return root / repo.replace("/", "--") / commit


def store_base(snapshot: Path, hub_id: str, root: Path) -> Path:
    """Copy a resolved Hub snapshot (huggingface_hub's `.../snapshots/<commit>/`, whose files
    are links into the blob cache) into the store, unless that commit is there already.
    Returns the stored folder. Safe against another Job storing the same commit at once."""
    target = snapshot_folder(root, hub_id, snapshot.name)
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        chmod_as_created(tmp, directory=True)
        for f in sorted(snapshot.iterdir()):
            if f.is_file():  # follows the cache's links: the store gets the bytes
                shutil.copyfile(f, tmp / f.name)
                chmod_as_created(tmp / f.name)
                fsync_path(tmp / f.name)
        fsync_path(tmp, directory=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not "another Job won the race"
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(target.parent, directory=True)  # the rename survives a crash, as result.json that names it does
    return target
