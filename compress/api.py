"""`compress(base, finetuned, out_dir, settings) -> CompressResult`: the whole BitDelta pipeline.

1. check the pair (same architecture, same tensor names and shapes)
2. stage 1, streamed tensor by tensor: packed sign(Δ) + α = mean|Δ|; other changed params whole
3. load the fine-tune (teacher) and the base with the 1-bit delta attached (student) — two
   models on the device, never a third dense copy
4. calibration samples (local text, or sampled from the fine-tune) and held-out eval samples
5. eval base / stage 1; distill the scales; eval again
6. write delta.safetensors and result.json atomically and durably (compress/files.py write_atomic)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch

from .apply import attach_delta, read_scales, set_enabled
from .basestore import store_base
from .calibration import make_samples, read_windows
from .checkpoint import Checkpoint, InputError, check_compatible, check_supported
from .distill import distill_scales
from .fidelity import evaluate, retained
from .files import write_atomic
from .format import save_delta
from .result import DELTA_FILE, RESULT_FILE, CompressResult, Fidelity, Sizes
from .stage1 import extract


@dataclasses.dataclass
class CompressSettings:
    # Stage 2 defaults are the paper's: Adam, lr 1e-4, 200 steps, batch 4, 800 samples of 128 tokens.
    steps: int = 200
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 128
    samples: int = 800
    calibration: str | None = None  # .txt/.jsonl file or folder; None: sample the fine-tune
    eval_data: str | None = None  # held-out text; None: a split of calibration, or fresh samples
    eval_samples: int = 64
    loss: str = "mse"  # "mse" on logits (the paper) or "kl"
    scale_per_row: bool = False
    compress_embeddings: bool = False
    device: str = "auto"  # auto: cuda when available
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    seed: int = 0

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            dev = torch.device(self.device)
        except RuntimeError:
            raise InputError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N") from None
        if dev.type not in ("cpu", "cuda"):
            raise InputError(f"--device {self.device}: expected auto, cpu, cuda or cuda:N")
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise InputError(f"--device {self.device}: CUDA is not available on this machine")
        return dev

    def resolved_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
        if self.dtype not in dtypes:
            raise InputError(f"--dtype {self.dtype}: choose one of auto, {', '.join(dtypes)}")
        return dtypes[self.dtype]

    def validate(self) -> None:
        for name in ("batch_size", "seq_len", "samples", "eval_samples"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps < 0 or self.lr <= 0:
            raise InputError(f"--steps must be >= 0 and --lr > 0 (got {self.steps}, {self.lr})")
        if self.loss not in ("mse", "kl"):
            raise InputError(f"--loss {self.loss}: choose mse or kl")
        if self.seq_len < 2:
            raise InputError("--seq-len must be at least 2 (next-token loss needs two tokens)")
        for what, path in (("--calibration", self.calibration), ("--eval-data", self.eval_data)):
            if path and not Path(path).exists():  # fail before the slow steps, not after them
                raise InputError(f"{what} {path}: no such file or folder")


def log(msg: str) -> None:
    print(f"[compress] {msg}", file=sys.stderr, flush=True)


def load_model(folder: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.to(device).eval()


def load_tokenizer(*folders: Path):
    from transformers import AutoTokenizer

    for folder in folders:
        try:
            return AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):
            continue
    raise InputError(f"no tokenizer found in {' or '.join(str(f) for f in folders)}")


def check_output_dir(out_dir: Path, flag: str = "--out") -> None:
    """The output folder exists or can be made, and is writable — checked before any slow work."""
    for p in (out_dir, *out_dir.parents):
        if p.exists():
            if not p.is_dir():
                raise InputError(f"{flag} {out_dir}: {p} is a file, not a folder")
            if not os.access(p, os.W_OK | os.X_OK):
                raise InputError(f"{flag} {out_dir}: {p} is not writable")
            return


def open_inputs(base: str, finetuned: str, out_dir: Path, base_store) -> tuple[Checkpoint, Checkpoint]:
    """Every check that needs no weights, before any slow work: the output folders, the two
    checkpoints found, distinct, compatible and of a supported architecture."""
    check_output_dir(out_dir)
    if base_store is not None:
        check_output_dir(Path(base_store), "--base-store")
    base_ck, ft_ck = Checkpoint(base, "base"), Checkpoint(finetuned, "fine-tune")
    if base_ck.dir.resolve() == ft_ck.dir.resolve():
        raise InputError(f"--base and --finetuned are the same model ({base_ck.dir}): there is no delta to compress")
    check_compatible(base_ck, ft_ck)
    check_supported(base_ck)
    return base_ck, ft_ck


def compress(base: str, finetuned: str, out_dir: str | os.PathLike, settings: CompressSettings | None = None,
             base_store: str | os.PathLike | None = None) -> CompressResult:
    """Compress `finetuned` against `base` into out_dir; with `base_store`, a Hub base's snapshot
    is kept there too (compress/basestore.py) and named in the result."""
    settings = settings or CompressSettings()
    settings.validate()
    t0 = time.time()
    out_dir = Path(out_dir)
    base_ck, ft_ck = open_inputs(base, finetuned, out_dir, base_store)
    device = settings.resolved_device()
    dtype = settings.resolved_dtype(device)
    torch.manual_seed(settings.seed)
    tokenizer = load_tokenizer(ft_ck.dir, base_ck.dir)
    texts = read_windows(settings, tokenizer)

    log(f"stage 1: {base_ck.dir} -> {ft_ck.dir} on {device}")
    delta = extract(base_ck, ft_ck, settings.scale_per_row, settings.compress_embeddings, device)
    log(f"stage 1: {len(delta.signs)} matrices at 1 bit, {len(delta.whole)} parameters whole")

    teacher = load_model(ft_ck.dir, device, dtype)
    cal, held_out = make_samples(settings, teacher, tokenizer, texts)
    log(f"samples: {len(cal)} calibration, {len(held_out)} eval, {settings.seq_len} tokens each")

    student = load_model(base_ck.dir, device, dtype)
    base_stats = evaluate(student, teacher, held_out, settings.batch_size)
    wrappers = attach_delta(student, delta)
    initial = evaluate(student, teacher, held_out, settings.batch_size)
    if settings.steps:
        stage2(student, teacher, wrappers, cal, settings)
    final = evaluate(student, teacher, held_out, settings.batch_size)
    delta.scales = read_scales(wrappers)
    set_enabled(wrappers, True)
    del student, teacher

    fidelity = fidelity_of(base_stats, initial, final)
    if base_stats.loss <= base_stats.teacher_loss:
        log("warning: the fine-tune is no better than the base on the eval text; retained improvement reads 0")
    finetuned_bytes = ft_ck.nbytes()
    delta.settings = {**dataclasses.asdict(settings), "dtype_used": str(dtype).removeprefix("torch."), "device_used": str(device)}
    delta.fidelity = fidelity.model_dump()
    delta.sizes = sizes_of(delta, finetuned_bytes)
    path = save_delta(delta, out_dir / DELTA_FILE)
    delta_bytes = path.stat().st_size
    snapshot = None
    if base_store is not None and base_ck.dir.resolve() != Path(base).expanduser().resolve():  # a Hub id, not a folder
        snapshot = store_base(base_ck.dir, base, Path(base_store))
        log(f"base: {base} is kept in the store at {snapshot}")
    result = CompressResult(
        delta_uri=str(path.resolve()),
        base_model=base_ck.source,
        finetuned_model=ft_ck.source,
        base_fingerprint=delta.base_fingerprint,
        base_snapshot=str(snapshot) if snapshot else None,
        sizes=Sizes(delta_bytes=delta_bytes, finetuned_bytes=finetuned_bytes,
                    compression_ratio=finetuned_bytes / delta_bytes),
        fidelity=fidelity,
        seconds=time.time() - t0,
    )
    write_atomic(out_dir / RESULT_FILE, (json.dumps(result.model_dump(), indent=2) + "\n").encode())
    log(f"done in {result.seconds:.0f}s: retained {fidelity.retained_improvement:.1%} "
        f"(stage 1 {fidelity.retained_improvement_initial:.1%}), ratio {result.sizes.compression_ratio:.1f}x")
    return result


def stage2(student, teacher, wrappers: dict, cal: list, settings: CompressSettings) -> None:
    """Scale distillation: train only the scales to match the fine-tune's logits."""
    history = distill_scales(student, teacher, [w.scale for w in wrappers.values()], cal, settings.steps,
                             settings.lr, settings.batch_size, settings.loss, settings.seed)
    skipped = sum(1 for v in history if v != v)
    if skipped:
        log(f"warning: stage 2 skipped {skipped} of {len(history)} steps whose loss or gradient was not finite")


def fidelity_of(base_stats, initial, final) -> Fidelity:
    """The result's fidelity figures from the three evaluations (base, after stage 1, after stage 2)."""
    return Fidelity(
        loss_base=base_stats.loss,
        loss_finetuned=base_stats.teacher_loss,
        loss_initial=initial.loss,
        loss_delta=final.loss,
        retained_improvement=retained(base_stats.loss, base_stats.teacher_loss, final.loss),
        retained_improvement_initial=retained(base_stats.loss, base_stats.teacher_loss, initial.loss),
        kl=final.kl,
        kl_initial=initial.kl,
        eval_tokens=final.tokens,
        top1_agreement_base=base_stats.top1_agreement,
        top1_agreement=final.top1_agreement,
    )


def sizes_of(delta, finetuned_bytes: int) -> dict:
    """The delta file's byte counts (its __metadata__)."""
    return {
        "tensor_bytes": delta.nbytes(),
        "sign_bytes": sum(t.numel() * 4 for t in delta.signs.values()),
        "whole_bytes": sum(t.numel() * t.element_size() for t in delta.whole.values()),
        "compressed_matrices": len(delta.signs),
        "whole_params": len(delta.whole),
        "finetuned_bytes": finetuned_bytes,
    }
