"""Read a Hugging Face checkpoint one tensor at a time (safetensors `safe_open`), never whole.

Stage 1 streams base and fine-tune tensor by tensor through this, so a 7B pair never has
to sit in accelerator memory at once. Only safetensors checkpoints are read (never pickle).

A checkpoint's keys are not always the loaded model's parameter names: transformers 5 renames
some on load (GPT-NeoX's file holds `embed_out.weight`, the model calls it `lm_head.weight`;
a `ForCausalLM` may load a base model's file without the `model.` prefix). `param()` reads by
parameter name through transformers' own mapping for the architecture (`checkpoint_keys`), so
there is no second list of renames here. Keys that transformers converts (splits, merges,
permutes) rather than renames are refused: their tensors cannot be read one at a time.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .modelref import looks_like_hub_id, split_revision

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


class InputError(ValueError):
    """Bad input to compress/merge; the message is one line that says what and where."""


def resolve_model_dir(path_or_id: str, what: str) -> Path:
    """A local folder, or a Hugging Face model id (optionally `id@revision`) resolved through the hub cache / the hub."""
    p = Path(path_or_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise InputError(f"{what} {path_or_id}: is a file; expected a model folder (config.json + *.safetensors) or a hub id")
    if not looks_like_hub_id(path_or_id):
        raise InputError(f"{what} {path_or_id}: no such folder")
    repo, revision = split_revision(path_or_id)
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "*.model", "*.txt"]
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except Exception as e:  # offline, unknown repo, auth: all mean "cannot use this input"
        msg = " ".join(str(e).split())[:160]
        raise InputError(f"{what} {path_or_id}: no such folder, and not available as a Hugging Face model id ({msg})") from None


class Checkpoint:
    """Tensor names, shapes and lazy reads over one safetensors checkpoint (single file or sharded)."""

    def __init__(self, path_or_id: str, what: str = "model"):
        self.what = what
        self.source = str(path_or_id)
        self.dir = resolve_model_dir(str(path_or_id), what)
        self.config = self._read_config()
        self._file_of: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        self._model_keys: dict[str, str] | None = None
        index = self.dir / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise InputError(f"{what} {index}: not a valid safetensors index ({e})") from None
            for name, fname in weight_map.items():
                self._file_of[name] = self.dir / fname
        elif (self.dir / SINGLE).is_file():
            for name in self._open(self.dir / SINGLE).keys():
                self._file_of[name] = self.dir / SINGLE
        else:
            has_bin = any(self.dir.glob("*.bin"))
            hint = " (only pickle .bin weights found; convert them to safetensors first)" if has_bin else ""
            raise InputError(f"{what} {self.dir}: no {SINGLE} or {INDEX}{hint}")

    def _read_config(self) -> dict:
        cfg = self.dir / "config.json"
        if not cfg.is_file():
            raise InputError(f"{self.what} {self.dir}: no config.json (not a Hugging Face model folder)")
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise InputError(f"{self.what} {cfg}: invalid JSON ({e})") from None

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise InputError(f"{self.what} {file}: shard listed in the index is missing")
            try:
                self._handles[file] = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise InputError(f"{self.what} {file}: not a readable safetensors file ({' '.join(str(e).split())[:160]})") from None
        return self._handles[file]

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or [self.config.get("model_type", "?")]
        return archs[0]

    def names(self) -> list[str]:
        """The file's tensor keys (not necessarily the model's parameter names: see `param`)."""
        return sorted(self._file_of)

    def model_keys(self) -> dict[str, str]:
        """{model parameter name: file key}, as `from_pretrained` maps them (built once)."""
        if self._model_keys is None:
            self._model_keys = checkpoint_keys(empty_model(self.dir), self.names(), f"{self.what} {self.dir}")
        return self._model_keys

    def param(self, name: str) -> torch.Tensor:
        """The tensor `from_pretrained` would load into the model parameter `name`."""
        keys = self.model_keys()
        if name not in keys:
            raise InputError(f"{self.what} {self.dir}: checkpoint has no tensor for parameter {name!r} of {self.architecture}")
        return self.get(keys[name])

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise InputError(f"{self.what} {self.dir}: has no tensor {name!r}")
        try:
            return self._open(self._file_of[name]).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise InputError(f"{self.what} {self._file_of[name]}: cannot read {name} ({' '.join(str(e).split())[:160]})") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._open(self._file_of[name]).get_slice(name).get_shape())

    def nbytes(self) -> int:
        """Bytes of all parameters at their stored dtype (the size of the full fine-tune)."""
        total = 0
        for name in self._file_of:
            sl = self._open(self._file_of[name]).get_slice(name)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            total += numel * _DTYPE_BYTES.get(sl.get_dtype(), 4)
        return total

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def check_compatible(base: Checkpoint, ft: Checkpoint) -> None:
    """Refuse a pair that is not the same architecture with the same tensor shapes."""
    if base.architecture != ft.architecture:
        raise InputError(
            f"different architectures: base {base.dir} is {base.architecture}, fine-tune {ft.dir} is {ft.architecture}"
        )
    only_base = sorted(set(base.names()) - set(ft.names()))
    only_ft = sorted(set(ft.names()) - set(base.names()))
    if only_base or only_ft:
        side, names = ("base", only_base) if only_base else ("fine-tune", only_ft)
        raise InputError(
            f"tensor names differ: {len(names)} only in the {side} (e.g. {names[0]!r}); base {base.dir}, fine-tune {ft.dir}"
        )
    for name in base.names():
        if base.shape(name) != ft.shape(name):
            raise InputError(
                f"different shapes for {name}: base {base.shape(name)} ({base.dir}) vs fine-tune {ft.shape(name)} ({ft.dir})"
            )


def check_supported(ck: Checkpoint) -> None:
    """Refuse, before any slow work, a model deltafleet cannot compress and serve; and read its
    parameter names as transformers maps them (a converted key is refused here too)."""
    from .support import unsupported_reason

    reason = unsupported_reason(empty_model(ck.dir))
    if reason:
        raise InputError(f"{ck.what} {ck.dir}: {reason}")
    ck.model_keys()


def empty_model(config_dir: Path):
    """The model's module tree on the meta device: names, types and shapes, no memory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(config_dir)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as e:  # unknown model_type, not a causal LM, bad config
        raise InputError(f"model {config_dir}: transformers cannot build it as a causal LM ({' '.join(str(e).split())[:160]})") from None


def checkpoint_keys(model, file_keys: list[str], where: str) -> dict[str, str]:
    """{parameter name of `model`: checkpoint key}, renamed exactly as `from_pretrained` renames
    (transformers' conversion mapping for the architecture, then its base-model-prefix rule).
    A key that transformers converts rather than renames is an InputError naming it."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]
    expected = model.state_dict()  # meta tensors: names only
    params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    prefix = model.base_model_prefix
    keys: dict[str, str] = {}
    for key in file_keys:
        name, converted = rename_source_key(key, renamings, converters, prefix, expected)
        if name not in expected and key in expected:  # as from_pretrained: a key that should not have been renamed
            name, converted = rename_source_key(key, [], [], prefix, expected)
        if converted is not None and name in params:
            conv = next(c for c in converters if converted in c.source_patterns)
            ops = ", ".join(type(op).__name__ for op in conv.operations) or "a conversion"
            raise InputError(f"{where}: transformers converts checkpoint tensor {key!r} into {name!r} on load ({ops}); "
                             f"deltafleet reads tensors one at a time and supports renamed keys only")
        if name in params:
            keys.setdefault(name, key)
    return keys
