"""The architecture sweep (deltafleet/archsweep.py): every causal-LM architecture transformers
ships, at a tiny size, through `deltafleet compress` → `deltafleet merge` → reload → the served
layers and the engine. Each one is either served exactly as merged, or refused by compress in
one line naming what it does not support, or not swept because transformers itself cannot run
it at a tiny size — never a traceback, never a wrong model. docs/architectures.md is the
table users read; each case checks its own row, so a transformers bump that changes an
outcome fails here until the page is regenerated (`python -m deltafleet.archsweep --docs
docs/architectures.md`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deltafleet import archsweep

PAGE = Path(__file__).parents[2] / "docs" / "architectures.md"
TYPES = list(archsweep.causal_lm_types())
# What must be true whatever transformers adds: the five test families are served; the classic
# refusals say why in their own words.
MUST = {"llama": archsweep.SUPPORTED, "qwen2": archsweep.SUPPORTED, "mistral": archsweep.SUPPORTED,
        "gemma": archsweep.SUPPORTED, "gpt_neox": archsweep.SUPPORTED}
REASONS = {"gpt2": "Conv1D", "mixtral": "MoE experts", "mamba": "AttentionInterface", "gemma2": "soft-caps"}


@pytest.fixture(scope="module")
def sweep_root(tmp_path_factory):
    from deltafleet.compress.progress import quiet_library_bars
    from deltafleet.toymodels import code_text

    quiet_library_bars()
    root = tmp_path_factory.mktemp("archsweep")
    calibration = root / "calibration.txt"
    calibration.write_text(code_text("eval")[:200_000])
    return root, calibration, archsweep.tokenizer(root / "tokenizer")


@pytest.mark.parametrize("model_type", TYPES)
def test_an_architecture_is_served_as_merged_or_refused_in_one_line(model_type, sweep_root):
    import warnings

    root, calibration, tok = sweep_root
    work = root / model_type
    work.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outcome = archsweep.round_trip(model_type, work, calibration, tok)  # raises on served != merged
    assert outcome.result in (archsweep.SUPPORTED, archsweep.REFUSED, archsweep.NOT_SWEPT)
    assert outcome.detail and "\n" not in outcome.detail
    if model_type in MUST:
        assert outcome.result == MUST[model_type], outcome
    if model_type in REASONS:
        assert outcome.result == archsweep.REFUSED and REASONS[model_type] in outcome.detail, outcome
    doc = archsweep.documented(PAGE).get(model_type)
    assert doc == outcome.result, (f"docs/architectures.md says {model_type} is {doc!r}, the sweep found "
                                   f"{outcome.result!r} ({outcome.detail}); regenerate the page")


def test_the_page_lists_exactly_the_architectures_transformers_ships():
    assert sorted(archsweep.documented(PAGE)) == sorted(TYPES)
