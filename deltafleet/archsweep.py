"""The architecture sweep: every causal-LM architecture transformers ships, at a tiny size,
through `deltafleet compress` → `deltafleet merge` → reload → the served layers.

For each architecture in transformers' causal-LM auto mapping, a tiny random config is made
from its own config class (a few standard sizes shrunk; nothing else touched), a base is
built and saved with `save_pretrained`, and a "fine-tune" is the base with every parameter
moved by noise (a full fine-tune's kind of delta). Then, exactly as a user would:

- `deltafleet compress` (a few distillation steps) either refuses with one line naming what
  it does not support, or writes a delta;
- `deltafleet merge` writes a checkpoint that `from_pretrained` loads back to base + delta;
- the base with the delta registered in the served layers (`TenantScorer`: the bank, the
  delta-aware linears and per-slot whole tensors that answer requests) computes the merged
  checkpoint's logits.

Anything else — a traceback, or served ≠ merged — is a failure. Architectures whose tiny
config cannot be built or run by transformers itself on CPU are listed as not swept, with why.

    python -m deltafleet.archsweep [model_type ...]   # prints the table, writes JSON with --json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

from deltafleet.compress.result import DELTA_FILE

SUPPORTED, REFUSED, NOT_SWEPT, FAILED = "supported", "refused", "not swept", "FAILED"
# Shrunk in every config that has them (through the config's attribute_map for other spellings).
TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
            vocab_size=320, max_position_embeddings=256, head_dim=16,
            # mixtures of experts and latent attention, so they are small enough to reach compress's check
            num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            shared_expert_intermediate_size=64, n_shared_experts=1, q_lora_rank=32, kv_lora_rank=32,
            qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16)
SPECIAL_IDS = dict(bos_token_id=0, eos_token_id=1, pad_token_id=2)  # toymodels.SPECIAL_TOKENS' ids in the tokenizer
MAX_PARAMS = 8_000_000  # a "tiny" config that still builds more than this is not tiny (multimodal towers, ...)
SEQ = 24
PROMPT, GREEDY_TOKENS = "def read(path):\n    return", 8
TOLERANCE = 1e-4  # served vs merged logits, fp32 (as the served = merged tests)


@dataclass
class ArchResult:
    """What the sweep found for one model type (operator/jobs.py's Outcome is a Job's)."""

    model_type: str
    architecture: str
    result: str  # SUPPORTED / REFUSED / NOT_SWEPT
    detail: str = ""  # the refusal line, or why not swept, or the served-vs-merged max difference
    seconds: float = 0.0


def causal_lm_types() -> dict[str, str]:
    """{model_type: causal-LM class name} from transformers' own auto mapping."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


def tiny_configs(model_type: str):
    """The architecture's own config class at the TINY sizes, two ways (configs differ in which
    one validates): built from its fields with per-layer lists (layer_types, ...) cut to the new
    layer count; and the default instance with the sizes set as attributes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cls = CONFIG_MAPPING[model_type]
    alias = getattr(cls, "attribute_map", {})

    def from_fields():
        fields = cls().to_dict()
        layers_key = "num_hidden_layers" if "num_hidden_layers" in fields else alias.get("num_hidden_layers")
        old_layers = fields.get(layers_key)
        for key, value in TINY.items():
            key = key if key in fields else alias.get(key, key)
            if isinstance(fields.get(key), int):
                fields[key] = value
        for key, value in list(fields.items()):
            if isinstance(value, list) and old_layers and len(value) == old_layers:
                fields[key] = value[: TINY["num_hidden_layers"]]
        return cls(**{**fields, **SPECIAL_IDS})

    def by_attributes():
        cfg = cls()
        for key, value in {**TINY, **SPECIAL_IDS}.items():
            if hasattr(cfg, key) or key in alias:
                with contextlib.suppress(Exception):  # a derived or per-layer attribute: leave it
                    setattr(cfg, key, value)
        return cfg

    return [from_fields, by_attributes]


def tokenizer(folder: Path):
    """One tiny byte-level BPE tokenizer (vocab ≤ the tiny configs'), trained once per folder."""
    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").is_file():
        from deltafleet.toymodels import prose_text, train_tokenizer

        train_tokenizer(TINY["vocab_size"], [prose_text()[:100_000]]).save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(folder)


def build_pair(model_type: str, work: Path, tok) -> tuple[Path, Path] | str:
    """Save a tiny base and its noisy fine-tune; a string says why this architecture is not swept."""
    import torch

    why = ""
    for make in tiny_configs(model_type):
        try:
            model = _tiny_model(make(), work / "base")
        except Exception as e:  # transformers' own model at a shrunk size: not ours to fix
            why = f"transformers cannot run it at a tiny size ({type(e).__name__}: {_line(e)[:90]})"
            continue
        if isinstance(model, str):
            why = model
            continue
        tok.save_pretrained(work / "base")
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                spread = p.float().std() if p.numel() > 1 else p.float().abs().reshape(())
                p.add_(0.02 * (spread + 1e-3) * torch.randn(p.shape, generator=g))
        model.save_pretrained(work / "finetuned")
        tok.save_pretrained(work / "finetuned")
        return work / "base", work / "finetuned"
    return why


def _tiny_model(cfg, folder: Path):
    """The model of `cfg`, run once and saved to `folder`; a string when it is not tiny."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
    if n > MAX_PARAMS:
        return f"its smallest config from these sizes has {n / 1e6:.0f}M parameters"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).float().eval()
    ids = torch.randint(3, cfg.get_text_config().vocab_size, (1, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    model.save_pretrained(folder)  # validates the config too
    return model


def run_cli(argv: list[str]) -> tuple[int, str]:
    """The `deltafleet` CLI in this process: (exit code, stderr)."""
    from deltafleet.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


def round_trip(model_type: str, work: Path, calibration: Path, tok) -> ArchResult:
    """One architecture through compress → merge → reload → served; raises on a failure."""
    import torch
    from transformers import AutoModelForCausalLM

    from deltafleet.compress.apply import merge_delta
    from deltafleet.compress.format import load_delta
    from deltafleet.serving.served import TenantScorer, build_served_model

    arch = causal_lm_types()[model_type]
    t0 = time.time()
    pair = build_pair(model_type, work, tok)
    if isinstance(pair, str):
        return ArchResult(model_type, arch, NOT_SWEPT, pair, time.time() - t0)
    base, ft = pair
    rc, err = run_cli(["compress", "--base", str(base), "--finetuned", str(ft), "--out", str(work / "delta"),
                       "--steps", "2", "--samples", "8", "--eval-samples", "4", "--seq-len", "32",
                       "--calibration", str(calibration), "--device", "cpu"])
    if rc != 0:
        lines = [ln for ln in err.splitlines() if ln.startswith("deltafleet compress: error:")]
        assert rc == 2 and len(lines) == 1, f"{model_type}: compress exited {rc} without one error line:\n{err[-2000:]}"
        why = re.sub(r"^(base|fine-tune) \S+: ", "", lines[0].removeprefix("deltafleet compress: error: "))
        return ArchResult(model_type, arch, REFUSED, why, time.time() - t0)
    delta_path = work / "delta" / DELTA_FILE
    rc, err = run_cli(["merge", "--base", str(base), "--delta", str(delta_path), "--out", str(work / "merged"),
                       "--dtype", "float32"])
    assert rc == 0, f"{model_type}: merge exited {rc}:\n{err[-2000:]}"

    from deltafleet.compress.checkpoint import Checkpoint

    # merge writes the checkpoint layout transformers writes (GPT-NeoX: `embed_out`, not `lm_head`)
    assert Checkpoint(str(work / "merged")).names() == Checkpoint(str(base)).names(), f"{model_type}: merged keys differ"
    expected = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    merge_delta(expected, load_delta(delta_path))
    merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()
    want = expected.state_dict()
    for name, t in merged.state_dict().items():
        assert torch.equal(t, want[name]), f"{model_type}: merged checkpoint reloads {name} differently"

    ids = torch.randint(3, len(tok), (2, SEQ), generator=torch.Generator().manual_seed(2))
    scorer = TenantScorer(build_served_model(str(base), device="cpu", dtype="float32"), "t", delta_path)
    with torch.inference_mode():
        got = scorer(input_ids=ids).logits.float()
        ref = merged(input_ids=ids).logits.float()
        base_logits = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()(input_ids=ids).logits
    diff = (got - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert diff <= TOLERANCE * max(1.0, scale), f"{model_type}: served differs from merged by {diff:.2e}"
    moved = (ref - base_logits).abs().max().item()
    assert moved > 1e-3, f"{model_type}: the merged model equals the base (max logit change {moved:.1e})"
    engine_tokens, merged_tokens = engine_greedy(base, delta_path, merged, tok)
    assert engine_tokens == merged_tokens, f"{model_type}: the engine generates {engine_tokens}, merged {merged_tokens}"
    return ArchResult(model_type, arch, SUPPORTED, f"served = merged within {diff:.0e}; engine greedy = merged",
                   time.time() - t0)


def engine_greedy(base: Path, delta_path: Path, merged, tok) -> tuple[list[int], list[int]]:
    """Greedy tokens of the tenant through the serving engine (paged KV, packed steps) and of
    the merged checkpoint through `generate`, for one prompt."""
    import torch

    from deltafleet.serving.engine import Engine
    from deltafleet.serving.sampling import SamplingParams

    engine = Engine(str(base), device="cpu", dtype="float32", max_batch_size=2, kv_cache_bytes=8 << 20)
    try:
        engine.set_tenants({"t": delta_path})
        assert engine.wait_ready() == {"t": "ready"}
        ids = engine.encode(PROMPT)
        got = []
        for ev in engine.submit("t", PROMPT, SamplingParams(max_tokens=GREEDY_TOKENS, temperature=0)):
            if ev.error is not None:
                raise ev.error
            got += ev.token_ids
    finally:
        engine.close()
    with torch.inference_mode():
        out = merged.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                              max_new_tokens=GREEDY_TOKENS, do_sample=False, pad_token_id=SPECIAL_IDS["pad_token_id"])
    want = out[0, len(ids):].tolist()
    eos = merged.config.eos_token_id
    return got, want[: want.index(eos)] if eos in want else want


def sweep(model_types: list[str], root: Path) -> list[ArchResult]:
    from deltafleet.compress.progress import quiet_library_bars
    from deltafleet.toymodels import code_text

    quiet_library_bars()
    calibration = root / "calibration.txt"
    calibration.write_text(code_text("eval")[:200_000])
    tok = tokenizer(root / "tokenizer")
    out = []
    for mt in model_types:
        work = root / mt
        work.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out.append(round_trip(mt, work, calibration, tok))
            except Exception as e:  # noqa: BLE001 - reported per architecture; the test fails on it
                import traceback
                tb = traceback.extract_tb(e.__traceback__)[-1]
                out.append(ArchResult(mt, causal_lm_types()[mt], FAILED, f"{type(e).__name__}: {_line(e)[:200]} "
                                   f"({Path(tb.filename).name}:{tb.lineno})"))
        print(f"{mt:28s} {out[-1].result:10s} {out[-1].seconds:5.1f}s  {out[-1].detail[:150]}", file=sys.stderr)
    return out


TABLE_HEADER = ["| architecture | model_type | result | why |", "|---|---|---|---|"]


def markdown(outcomes: list[ArchResult]) -> str:
    rows = list(TABLE_HEADER)
    for o in outcomes:
        rows.append(f"| {o.architecture} | `{o.model_type}` | {o.result} | {o.detail.replace('|', '/')} |")
    return "\n".join(rows)


def documented(page: Path) -> dict[str, str]:
    """{model_type: result} from the table on `page` (docs/architectures.md)."""
    out = {}
    for line in page.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[1].startswith("`"):
            out[cells[1].strip("`")] = cells[2]
    return out


def _line(e: BaseException) -> str:
    return " ".join(str(e).split())


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(prog="python -m deltafleet.archsweep", description=__doc__.split("\n\n")[0])
    p.add_argument("model_types", nargs="*", help="model types to sweep (default: every causal LM transformers ships)")
    p.add_argument("--json", help="also write the outcomes here")
    p.add_argument("--docs", help="rewrite the table of this page (docs/architectures.md) with the outcomes")
    args = p.parse_args(argv)
    types = args.model_types or list(causal_lm_types())
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="archsweep-") as tmp:
        outcomes = sweep(types, Path(tmp))
    print(markdown(outcomes))
    counts = {r: sum(o.result == r for o in outcomes) for r in (SUPPORTED, REFUSED, NOT_SWEPT, FAILED)}
    print(f"\n{counts} in {time.time() - t0:.0f}s", file=sys.stderr)
    if args.docs:
        page = Path(args.docs)
        head = page.read_text().split(TABLE_HEADER[0])[0]
        page.write_text(head + markdown(outcomes) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": time.time() - t0, "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
