"""Calibration text from .txt / .jsonl files and folders, cut into fixed windows; bad files named."""

import json

import pytest

from deltafleet.compress.calibration import pick, read_texts, windows_from_text
from deltafleet.compress.checkpoint import InputError


def test_txt_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "beta"}) + "\n\n" + json.dumps({"text": "gamma", "id": 2}) + "\n")
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert read_texts(tmp_path / "a.txt") == ["alpha text"]
    assert read_texts(tmp_path / "b.jsonl") == ["beta", "gamma"]
    assert read_texts(tmp_path) == ["alpha text", "beta", "gamma"]


def test_bad_files_named_with_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2: not valid JSON"):
        read_texts(bad)
    bad.write_text('{"prompt": "no text field"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: .*\"text\" field"):
        read_texts(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="folder has no"):
        read_texts(tmp_path / "empty")


def test_windows(pair, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(pair[0])
    (tmp_path / "t.txt").write_text("def f(x):\n    return x\n" * 200)
    w = windows_from_text(tmp_path / "t.txt", tok, 32)
    assert w.shape[1] == 32 and len(w) > 10
    assert len(pick(w, 5, seed=0)) == 5 and len(pick(w, 10_000, seed=0)) == len(w)
    (tmp_path / "short.txt").write_text("x")
    with pytest.raises(InputError, match="fewer than one 32-token sample"):
        windows_from_text(tmp_path / "short.txt", tok, 32)
