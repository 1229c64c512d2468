"""The delta file (`delta.safetensors`): how a compressed fine-tune is written and read back.

Tensors (safetensors only; nothing is ever unpickled):
    <module>.sign   int32 [N, K // 32]  packed signs of W_ft - W_base (layout: kernels/packing.py)
    <module>.scale  float32 [] (one per matrix, as in the paper) or [N] (one per output row)
    <param>         a parameter that differs from the base but is not 1-bit compressed
                    (embeddings, lm_head, norms, biases), stored whole at the fine-tune's value.
`<module>` is the module path of an nn.Linear (or nn.Embedding), e.g.
`model.layers.0.self_attn.q_proj`; `<param>` is a full parameter name ending in
`.weight`/`.bias`, so the two kinds never collide.

`__metadata__` (all strings; JSON where structured): format_version, method, base_model,
base_fingerprint (compress/fingerprint.py), finetuned_model, settings, fidelity, sizes,
content_sha256 (a hash of every tensor's name, dtype, shape and bytes and of every other
metadata field, so a tampered or corrupt file is refused even when it still parses).

Files are written through compress/files.py `write_atomic` (a temporary name in the same
folder, fsynced, renamed, the folder fsynced), so a crash never leaves a file that looks valid.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import write_atomic
from .result import DELTA_FILE

FORMAT_VERSION = "1"
METHOD = "bitdelta"
SIGN, SCALE = ".sign", ".scale"


class DeltaError(ValueError):
    """A delta that cannot be used; the message is one line that says what and where."""


class DeltaMissing(DeltaError):
    """No file at the path (yet): a replica retries this one (a network volume may show it
    late); everything else a DeltaError says is wrong with the file itself."""


@dataclass
class Delta:
    base_model: str
    base_fingerprint: str
    finetuned_model: str
    signs: dict[str, torch.Tensor] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    fidelity: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, t in self.signs.items():
            out[name + SIGN] = t
            out[name + SCALE] = self.scales[name]
        out.update(self.whole)
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> "Delta":
        # non_blocking only host->device: a non-blocking device->host copy may be read before it lands
        non_blocking = torch.device(device).type != "cpu"
        move = lambda d: {k: v.to(device, non_blocking=non_blocking) for k, v in d.items()}  # noqa: E731
        return Delta(**{**self.__dict__, "signs": move(self.signs), "scales": move(self.scales), "whole": move(self.whole)})


def content_hash(tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> str:
    """sha256 over the tensors and the metadata (all but content_sha256 itself): a changed
    fingerprint or fidelity figure is as much tampering as a changed weight."""
    h = hashlib.sha256()
    for key in sorted(meta or {}):
        if key != "content_sha256":
            h.update(f"meta|{key}|{meta[key]}\n".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")  # reshape: 0-d scales
    return h.hexdigest()


def save_delta(delta: Delta, path: str | os.PathLike) -> Path:
    """Write atomically and durably (compress/files.py write_atomic)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in delta.tensors().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "method": METHOD,
        "base_model": delta.base_model,
        "base_fingerprint": delta.base_fingerprint,
        "finetuned_model": delta.finetuned_model,
        "settings": json.dumps(delta.settings, sort_keys=True),
        "fidelity": json.dumps(delta.fidelity, sort_keys=True),
        "sizes": json.dumps(delta.sizes, sort_keys=True),
    }
    meta["content_sha256"] = content_hash(tensors, meta)
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The file's metadata, JSON fields decoded, without reading tensors."""
    path = _existing(path)
    return _decode_meta(path, _raw_metadata(path))


def _raw_metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise DeltaError(f"{path}: not a readable safetensors delta ({_one_line(e)})") from None


def load_delta(
    path: str | os.PathLike,
    expected_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
) -> Delta:
    """Read, verify (format, content hash, structure, base fingerprint) and return a Delta."""
    path = _existing(path)
    raw = _raw_metadata(path)
    meta = _decode_meta(path, raw)
    if expected_fingerprint is not None and meta["base_fingerprint"] != expected_fingerprint:
        raise DeltaError(
            f"{path}: delta was built for base {meta['base_model']!r} (fingerprint {meta['base_fingerprint']}), "
            f"but the loaded base has fingerprint {expected_fingerprint}: wrong base model"
        )
    try:
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise DeltaError(f"{path}: truncated or corrupt tensor data ({_one_line(e)})") from None
    if content_hash(tensors, raw) != meta["content_sha256"]:
        raise DeltaError(f"{path}: content hash mismatch: the file was modified or corrupted after it was written")
    delta = Delta(
        base_model=meta["base_model"],
        base_fingerprint=meta["base_fingerprint"],
        finetuned_model=meta["finetuned_model"],
        settings=meta["settings"],
        fidelity=meta["fidelity"],
        sizes=meta["sizes"],
        path=str(path),
    )
    for name, t in tensors.items():
        if name.endswith(SIGN):
            delta.signs[name[: -len(SIGN)]] = t
        elif name.endswith(SCALE):
            delta.scales[name[: -len(SCALE)]] = t
        else:
            delta.whole[name] = t
    _check_structure(path, delta)
    return delta.to(device) if str(device) != "cpu" else delta


@dataclass(frozen=True)
class ModelShapes:
    """The shapes a delta is checked against: each module's weight (for its signs) and each
    parameter (for whole tensors), taken once. A serving replica takes them when it starts:
    read live, a parameter swapped by a per-token hook (torch.func.functional_call) mid-step
    would show the stack's shape and fail a good delta."""

    weights: dict[str, tuple[int, ...]]
    params: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, model: torch.nn.Module) -> ModelShapes:
        weights = {name: tuple(w.shape) for name, mod in model.named_modules()
                   if isinstance(w := getattr(mod, "weight", None), torch.Tensor)}
        return cls(weights, {name: tuple(p.shape) for name, p in model.named_parameters()})


def check_against_model(delta: Delta, model: torch.nn.Module | ModelShapes) -> None:
    """Refuse a delta whose tensors do not fit this model's modules and parameters."""
    shapes = model if isinstance(model, ModelShapes) else ModelShapes.of(model)
    where = delta.path or "delta"
    for name, packed in delta.signs.items():
        weight = shapes.weights.get(name)
        if weight is None:
            raise DeltaError(f"{where}: compressed module {name!r} does not exist in the base model")
        n, k = weight
        if tuple(packed.shape) != (n, k // 32) or k % 32:
            raise DeltaError(
                f"{where}: {name}.sign has shape {tuple(packed.shape)}, base weight {weight} "
                f"needs ({n}, {k // 32})"
            )
        if delta.scales[name].dim() == 1 and delta.scales[name].shape[0] != n:
            raise DeltaError(f"{where}: {name}.scale has {delta.scales[name].shape[0]} rows, base weight has {n}")
    for name, t in delta.whole.items():
        shape = shapes.params.get(name)
        if shape is None:
            raise DeltaError(f"{where}: parameter {name!r} does not exist in the base model")
        if shape != tuple(t.shape):
            raise DeltaError(f"{where}: {name} has shape {tuple(t.shape)}, the base has {shape}")


def _check_structure(path: Path, delta: Delta) -> None:
    if set(delta.signs) != set(delta.scales):
        missing = sorted(set(delta.signs) ^ set(delta.scales))[:3]
        raise DeltaError(f"{path}: every .sign needs a .scale and vice versa (unpaired: {missing})")
    for name, packed in delta.signs.items():
        scale = delta.scales[name]
        if packed.dtype != torch.int32 or packed.dim() != 2:
            raise DeltaError(f"{path}: {name}.sign must be a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
        if scale.dtype != torch.float32 or scale.dim() > 1 or (scale.dim() == 1 and scale.shape[0] != packed.shape[0]):
            raise DeltaError(f"{path}: {name}.scale must be float32 [] or [{packed.shape[0]}], got {scale.dtype} {tuple(scale.shape)}")


def _decode_meta(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    if raw.get("method") != METHOD or "format_version" not in raw:
        raise DeltaError(f"{path}: not a deltafleet delta (metadata has no method={METHOD!r})")
    if raw["format_version"] != FORMAT_VERSION:
        raise DeltaError(f"{path}: delta format version {raw['format_version']} is not supported (this build reads {FORMAT_VERSION})")
    required = ("base_model", "base_fingerprint", "finetuned_model", "content_sha256")
    missing = [k for k in required if not raw.get(k)]
    if missing:
        raise DeltaError(f"{path}: delta metadata is missing {', '.join(missing)}")
    meta: dict[str, Any] = dict(raw)
    for key in ("settings", "fidelity", "sizes"):
        try:
            meta[key] = json.loads(raw.get(key) or "{}")
        except json.JSONDecodeError:
            raise DeltaError(f"{path}: delta metadata field {key!r} is not valid JSON") from None
    return meta


def _existing(path: str | os.PathLike) -> Path:
    """The delta file at `path`, or inside it when `path` is a compress output folder."""
    p = Path(path)
    if p.is_dir():
        if (p / DELTA_FILE).is_file():
            return p / DELTA_FILE
        raise DeltaError(f"{p}: a folder without {DELTA_FILE} (give the delta file or the folder compress wrote)")
    if not p.is_file():
        raise DeltaMissing(f"{p}: no such delta file")
    return p


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:200]
