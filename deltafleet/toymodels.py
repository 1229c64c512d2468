"""Honest tiny test models: real Hugging Face architectures, a tokenizer trained here, real training.

The "base" is pre-trained on English prose (the topic pages of Python's own docs,
`pydoc_data.topics`); the "fine-tune" continues training *all* of its weights on another
domain, Python source code from the standard library. Both are written with
`save_pretrained` and read back by callers with the real `from_pretrained`, so the
compression path sees exactly what it would see with a hub checkpoint.

Pairs are cached under `$DELTAFLEET_CACHE` (default `~/.cache/deltafleet`) keyed by a hash
of their recipe, and built under a file lock into a temporary folder that is renamed into
place, so concurrent pytest workers and benchmarks never see half a model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from deltafleet.compress.result import DELTA_FILE, RESULT_FILE

# Llama; Qwen2 (biased q/k/v projections); Mistral (sliding-window attention, narrower than the
# test prompts plus completions so the window is exercised; otherwise it is Llama); Gemma (tied
# embeddings, (1 + w) RMSNorm, embeddings scaled by sqrt(hidden) inside the embedding module);
# GPT-NeoX (Pythia: fused query_key_value with biases, LayerNorm with bias, parallel residual,
# partial rotary, and checkpoint keys transformers 5 renames on load: embed_out -> lm_head).
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gpt_neox")
# Bump when the training code changes in a way the recipe fields do not capture.
BUILD_VERSION = "2"  # 2: Mistral's sliding window
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>"]
MISTRAL_WINDOW = 16  # tokens each position attends to


@dataclasses.dataclass(frozen=True)
class ToyRecipe:
    """Everything that decides a pair's weights. Benchmarks build larger pairs by changing it."""

    hidden: int = 128  # multiple of 32: the 1-bit layout packs 32 input columns per word
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    vocab: int = 512
    seq_len: int = 128
    batch: int = 8
    base_steps: int = 250
    base_lr: float = 3e-3
    ft_steps: int = 100
    ft_lr: float = 1e-3
    seed: int = 0

    def key(self, family: str) -> str:
        blob = json.dumps(
            {"family": family, "recipe": dataclasses.asdict(self), "build": BUILD_VERSION,
             "python": sys.version_info[:2], "torch": _torch_version()},
            sort_keys=True,
        )
        return f"{family}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def cache_root() -> Path:
    return Path(os.environ.get("DELTAFLEET_CACHE") or Path.home() / ".cache" / "deltafleet")


# --- corpora -------------------------------------------------------------------------------

def prose_text() -> str:
    """The base's domain: the English prose of Python's documentation topics."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _stdlib_files() -> list[Path]:
    lib = Path(os.__file__).parent
    return sorted(p for p in lib.glob("*.py") if p.stat().st_size > 2000)


def code_text(split: str) -> str:
    """The fine-tune's domain: stdlib Python sources. Every 10th file is held out for eval."""
    files = _stdlib_files()
    keep = {"train": lambda i: i % 10 != 0, "eval": lambda i: i % 10 == 0}[split]
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for i, p in enumerate(files) if keep(i))


# --- public entry points ----------------------------------------------------------------------

def toy_pair(family: str = "llama", recipe: ToyRecipe | None = None) -> tuple[Path, Path]:
    """(base_dir, finetuned_dir): `save_pretrained` folders with a tokenizer, built once and cached."""
    folder = _pair_dir(family, recipe or ToyRecipe())
    return folder / "base", folder / "finetuned"


def toy_eval_text(family: str = "llama", recipe: ToyRecipe | None = None) -> Path:
    """A text file of held-out fine-tune-domain text (stdlib files the fine-tune never saw)."""
    return _pair_dir(family, recipe or ToyRecipe()) / "eval.txt"


def toy_train_text(family: str = "llama", recipe: ToyRecipe | None = None) -> Path:
    """The fine-tune's own training text (a calibration source for tests that want real data)."""
    return _pair_dir(family, recipe or ToyRecipe()) / "train.txt"


# Fast stage-2 settings for the tiny models (the CLI defaults stay the paper's).
TOY_COMPRESS_SETTINGS = dict(steps=40, lr=1e-3, batch_size=4, seq_len=128, samples=64, eval_samples=32)


def toy_compress_settings(family: str = "llama", **overrides):
    """CompressSettings for a toy pair: the fast settings, calibrated on the fine-tune's training
    text and evaluated on its held-out text (sampling the model would dominate test time)."""
    from deltafleet.compress import CompressSettings

    defaults = {**TOY_COMPRESS_SETTINGS, "calibration": str(toy_train_text(family)), "eval_data": str(toy_eval_text(family))}
    return CompressSettings(**{**defaults, **overrides})


def toy_delta(family: str = "llama", **compress_settings) -> Path:
    """A cached delta.safetensors compressed from `toy_pair(family)` (fast settings unless overridden)."""
    from deltafleet.compress import compress

    base, ft = toy_pair(family)
    settings = toy_compress_settings(family, **compress_settings)
    digest = hashlib.sha256(json.dumps(dataclasses.asdict(settings), sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = cache_root() / "deltas" / f"{base.parent.name}-{digest}"
    delta = out / DELTA_FILE
    with _locked(out.with_suffix(".lock")):
        if not (out / RESULT_FILE).is_file():
            compress(str(base), str(ft), out, settings)
    return delta


# --- building ------------------------------------------------------------------------------

def _pair_dir(family: str, recipe: ToyRecipe) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"unknown toy model family {family!r}; choose one of {', '.join(FAMILIES)}")
    root = cache_root() / "models"
    folder = root / recipe.key(family)
    if (folder / "DONE").is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / f"{folder.name}.lock"):
        if not (folder / "DONE").is_file():  # another process may have built it meanwhile
            tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=root))
            try:
                _build(family, recipe, tmp)
                os.chmod(tmp, 0o755)  # mkdtemp makes it private; readers may run as another user
                (tmp / "DONE").write_text(json.dumps(dataclasses.asdict(recipe)))
                shutil.rmtree(folder, ignore_errors=True)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def train_tokenizer(vocab: int, texts: list[str]):
    """A byte-level BPE tokenizer trained here with `tokenizers`, wrapped for `save_pretrained`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_config(family: str, recipe: ToyRecipe, tokenizer):
    from transformers import GemmaConfig, GPTNeoXConfig, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden, intermediate_size=recipe.intermediate,
        num_hidden_layers=recipe.layers, num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads,
        max_position_embeddings=max(256, recipe.seq_len), tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=MISTRAL_WINDOW)
    if family == "gpt_neox":  # multi-head attention only: no num_key_value_heads
        common.pop("num_key_value_heads")
        return GPTNeoXConfig(**common, use_parallel_residual=True, rotary_pct=0.25)
    if family == "gemma":
        return GemmaConfig(**{**common, "tie_word_embeddings": True}, head_dim=recipe.hidden // recipe.heads)
    return Qwen2Config(**common, use_sliding_window=False)


def _build(family: str, recipe: ToyRecipe, out: Path) -> None:
    import torch

    from deltafleet.compress.progress import quiet_library_bars

    quiet_library_bars()  # off a terminal: no "Writing model shards" bars in test and bench logs
    t0 = time.time()
    # One thread: on a shared 2-core machine, two OpenMP threads that spin-wait on a busy
    # core make these tiny matmuls several times slower, not faster.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _build_pair(family, recipe, out)
    finally:
        torch.set_num_threads(threads)
    print(f"[toymodels] built {family} pair in {time.time() - t0:.0f}s -> {out}", file=sys.stderr)


def _build_pair(family: str, recipe: ToyRecipe, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    prose, code, held_out = prose_text(), code_text("train"), code_text("eval")
    tokenizer = train_tokenizer(recipe.vocab, [prose, code])
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_config(make_config(family, recipe, tokenizer))

    prose_ids = _ids(tokenizer, prose)
    code_ids = _ids(tokenizer, code)
    _train(model, prose_ids, recipe, recipe.base_steps, recipe.base_lr, seed=recipe.seed, what=f"{family} base")
    _save(model, tokenizer, out / "base")
    _train(model, code_ids, recipe, recipe.ft_steps, recipe.ft_lr, seed=recipe.seed + 1, what=f"{family} fine-tune")
    _save(model, tokenizer, out / "finetuned")
    (out / "eval.txt").write_text(held_out)
    (out / "train.txt").write_text(code)


def _ids(tokenizer, text: str):
    import torch

    return torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)


def _train(model, ids, recipe: ToyRecipe, steps: int, lr: float, seed: int, what: str) -> None:
    """Plain next-token training on random windows: AdamW, warmup then cosine decay."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    warmup = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    model.train()
    for step in range(steps):
        starts = torch.randint(0, len(ids) - recipe.seq_len - 1, (recipe.batch,), generator=gen)
        batch = torch.stack([ids[s : s + recipe.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if os.environ.get("DELTAFLEET_TOY_VERBOSE") and (step % 50 == 0 or step == steps - 1):
            print(f"[toymodels] {what} step {step} loss {loss.item():.3f}", file=sys.stderr)
    model.eval()


def _save(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _torch_version() -> str:
    try:
        import torch

        return torch.__version__
    except ImportError:
        return "none"
