"""Progress of long work: a live bar on a terminal, one line per stage in logs.

Job logs and `make demo`'s output are not terminals; there a bar that redraws itself turns
into thousands of lines, so `progress()` prints when a stage starts and when it ends.
`quiet_library_bars()` does the same for transformers' and huggingface_hub's own bars.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator


def on_terminal() -> bool:
    return sys.stderr.isatty()


class _Lines:
    """The part of tqdm's interface the stages use, as two lines: started, finished."""

    def __init__(self, items: Iterable, desc: str, total: int | None) -> None:
        self.items, self.desc, self.total = items, desc, total
        self.postfix: dict = {}

    def __iter__(self) -> Iterator:
        t0, n = time.monotonic(), 0
        print(f"[progress] {self.desc}: started ({self.total} steps)" if self.total else f"[progress] {self.desc}: started",
              file=sys.stderr, flush=True)
        for item in self.items:
            n += 1
            yield item
        extra = "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(f"[progress] {self.desc}: done, {n} in {time.monotonic() - t0:.1f}s{extra}", file=sys.stderr, flush=True)

    def set_postfix(self, **kw) -> None:
        self.postfix = kw


def progress(items: Iterable, desc: str, unit: str = "it"):
    total = len(items) if hasattr(items, "__len__") else None
    if on_terminal():
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, unit=unit, total=total, leave=False)
    return _Lines(items, desc, total)


def quiet_library_bars() -> None:
    """Off a terminal, silence transformers' and huggingface_hub's bars (weights loading, shards)."""
    if on_terminal():
        return
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:
        pass
