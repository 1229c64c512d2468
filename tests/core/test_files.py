"""The one writer of store files (compress/files.py): whole or nothing, and durable (the file
fsynced before its rename, the folder after it), for the delta, result.json and stored bases."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest

from deltafleet.compress import files

COMPRESS = Path(files.__file__).parent


@pytest.fixture
def fsyncs(monkeypatch):
    """What os.fsync was called on, in order: ("dir" | "file", path)."""
    seen: list[tuple[str, str]] = []
    real = os.fsync

    def record(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        seen.append((kind, os.readlink(f"/proc/self/fd/{fd}")))
        return real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return seen


def test_the_file_is_complete_and_its_rename_durable(tmp_path, fsyncs):
    target = tmp_path / "out" / "result.json"
    assert files.write_atomic(target, b'{"a": 1}\n') == target
    assert target.read_bytes() == b'{"a": 1}\n'
    assert [p.name for p in target.parent.iterdir()] == ["result.json"]
    (kind, tmp), last = fsyncs
    assert kind == "file" and Path(tmp).name.startswith(".result.json.") and tmp.endswith(files.PARTIAL)
    assert last == ("dir", str(target.parent))  # after the rename: the new name survives a crash
    files.write_atomic(target, lambda path: Path(path).write_text("replaced"))  # a writer that needs a path
    assert target.read_text() == "replaced"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")

    def half_then_fail(path):
        Path(path).write_bytes(b"\x00" * 100)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.write_atomic(target, half_then_fail)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_new_files_get_the_umasks_mode_not_mkstemps(tmp_path):
    old = os.umask(0o002)
    try:
        path = files.write_atomic(tmp_path / "f", b"x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o664  # the store's group reads (and may delete) it


def test_no_other_module_of_compress_renames_files_into_place():
    """Every store file goes through write_atomic: no second temp-and-rename writer grows back."""
    writers = [p.name for p in COMPRESS.glob("*.py")
               if p.name not in ("files.py", "basestore.py")  # basestore renames a whole folder of files it fsyncs
               and re.search(r"os\.(replace|rename)\(|mkstemp\(", p.read_text())]
    assert writers == []


def test_the_delta_and_result_json_are_written_through_it():
    pytest.importorskip("torch")
    from deltafleet.compress import api, format

    assert api.write_atomic is files.write_atomic and format.write_atomic is files.write_atomic
