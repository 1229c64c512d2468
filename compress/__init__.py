"""BitDelta compression. `compress(base, finetuned, out_dir, settings) -> CompressResult`.

Imports are lazy: the operator imports `deltafleet.compress.result` (pure pydantic) and must
not pull in torch through this package's __init__.
"""

from __future__ import annotations

from typing import Any

_LAZY = {
    "compress": "deltafleet.compress.api",
    "CompressSettings": "deltafleet.compress.api",
    "DeltaError": "deltafleet.compress.format",
    "InputError": "deltafleet.compress.checkpoint",
    "CompressResult": "deltafleet.compress.result",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deltafleet.compress' has no attribute {name!r}")
