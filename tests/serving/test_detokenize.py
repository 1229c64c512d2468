"""Incremental detokenization: the streamed pieces are exactly the whole completion's text."""

from __future__ import annotations

import pytest

from deltafleet.serving.detokenize import IncrementalText


@pytest.mark.parametrize("text", ["def add(a, b):\n    return a + b\n", "héllo wörld → ✓ ok", "  leading spaces and\ttabs"])
def test_streamed_pieces_join_to_the_whole_decode(toy, text):
    tok = toy.tokenizer
    ids = tok(text, add_special_tokens=False).input_ids
    inc = IncrementalText(tok)
    pieces = [inc.add(t) for t in ids] + [inc.flush()]
    assert "".join(pieces) == tok.decode(ids, skip_special_tokens=True) == inc.text
    assert all("\ufffd" not in p for p in pieces[:-1])  # an incomplete character is held back, never streamed
