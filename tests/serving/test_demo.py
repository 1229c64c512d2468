"""The config-file path end to end: run_serving_demo deploys a generated pool config on a
real local Ray (as `deltafleet serve --config` does) and queries it with the openai client."""

from __future__ import annotations

import pytest

pytest.importorskip("ray")

from deltafleet.serving.demo import PROMPT, run_serving_demo  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_demo_serves_base_and_tenants_like_the_merged_models(toy, reference_greedy, capsys):
    tenants = {n: toy.deltas[n] for n in ("team-a/alpha", "team-b/gamma")}
    answers = run_serving_demo(toy.base_dir, tenants, pool="demo", max_tokens=10)
    ids = toy.tokenizer(PROMPT).input_ids
    dirs = {"demo": toy.base_dir, **{n: toy.merged_dirs[n] for n in tenants}}
    assert set(answers) == set(dirs)
    for model, d in dirs.items():
        assert answers[model] == toy.tokenizer.decode(reference_greedy(d, ids, 10), skip_special_tokens=True)
    assert "team-b/gamma" in capsys.readouterr().out
