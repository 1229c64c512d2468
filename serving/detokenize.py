"""Incremental detokenization: each new token costs O(1) decode work, not a decode of the whole completion.

Decoding token by token is wrong (a character can span tokens; sentencepiece drops the
leading space of a lone piece), decoding everything each step is O(n²). So, as vLLM and TGI
do: decode a short window ending at the new token and the same window without it; the
difference is the new text. The window starts at the previous emission point, so pieces
keep their left context. Text that ends in U+FFFD (an incomplete UTF-8 sequence) is held
back until the next token completes it.
"""

from __future__ import annotations


class IncrementalText:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""  # everything emitted so far
        self._prefix = 0  # window start: the token where the last emission's window began
        self._read = 0  # tokens already turned into text

    def add(self, token: int) -> str:
        """Append a token; returns the text it completes ("" while a character is incomplete)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        new = after[len(before) :]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new

    def flush(self) -> str:
        """The text of tokens not yet emitted, incomplete characters included (at the end of a sequence)."""
        before = self.tokenizer.decode(self.ids[self._prefix : self._read], skip_special_tokens=True)
        after = self.tokenizer.decode(self.ids[self._prefix :], skip_special_tokens=True)
        new = after[len(before) :]
        self._prefix = self._read = len(self.ids)
        self.text += new
        return new
