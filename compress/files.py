"""Files in the model store, written whole and durably: the one writer of `delta.safetensors`,
`result.json` and every other file a compression Job leaves there.

`write_atomic` writes a hidden temporary file in the target's folder, fsyncs it, renames it
over the target and fsyncs the folder, so after a crash the name holds the old file or the
complete new one, never a part, and a rename that was reported done is on disk (the operator's
fallback, result.json, cannot be lost while the delta it describes survives). Torch-free.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

PARTIAL = ".partial"  # suffix of a temporary name (hidden: `.<name>.<random>.partial`)


def write_atomic(path: str | os.PathLike, data: bytes | Callable[[str], object]) -> Path:
    """Write `path` whole or not at all, durably. `data`: the bytes, or a function that writes
    the temporary file at the path it is given (safetensors' `save_file`: a large file never
    held twice in memory). On any failure the temporary file is removed and nothing is renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=PARTIAL, dir=path.parent)
    os.close(fd)
    try:
        chmod_as_created(tmp)
        if callable(data):
            data(tmp)
        else:
            Path(tmp).write_bytes(data)
        fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent, directory=True)  # make the rename itself durable
    return path


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush a file's bytes, or a folder's entries (a rename, a new file), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        if not directory:
            raise  # some filesystems cannot fsync a directory; a rename there is still atomic
    finally:
        os.close(fd)


def chmod_as_created(path: str | os.PathLike, directory: bool = False) -> None:
    """Give a mkstemp file (always 0600) or mkdtemp folder (0700) the mode an ordinary new one
    gets under the umask, so the store's group (serving pods, the operator) can use it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if directory else 0o666) & ~umask)
