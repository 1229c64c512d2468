"""Fixtures of the BitDelta core tests: the cached toy pairs of two of the five families (llama, qwen2), compressed once
per session with fast settings (the compression itself is under test, so it runs here
rather than coming from the toy_delta cache)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

FAMILIES = ["llama", "qwen2"]


@dataclass
class Compressed:
    family: str
    base: Path
    finetuned: Path
    out: Path
    result: object  # CompressResult
    settings: object  # CompressSettings


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def pair(family):
    from deltafleet.toymodels import toy_pair

    return toy_pair(family)


@pytest.fixture(scope="session")
def compressed(family, pair, tmp_path_factory) -> Compressed:
    from deltafleet.compress import compress
    from deltafleet.toymodels import toy_compress_settings

    out = tmp_path_factory.mktemp(f"delta-{family}")
    settings = toy_compress_settings(family)
    result = compress(str(pair[0]), str(pair[1]), out, settings)
    return Compressed(family, pair[0], pair[1], out, result, settings)


@pytest.fixture(scope="session")
def eval_samples(compressed):
    from deltafleet.compress.api import load_tokenizer
    from deltafleet.compress.calibration import pick, windows_from_text

    s = compressed.settings
    tok = load_tokenizer(compressed.finetuned)
    return pick(windows_from_text(s.eval_data, tok, s.seq_len), s.eval_samples, s.seed + 1)
