"""Operator settings: flags with env defaults, each env var named DELTAFLEET_ + its flag, as the
chart's Deployment sets them."""

import re
from pathlib import Path

import pytest

from deltafleet.operator.settings import build_parser, parse_settings
from deltafleet.operator.validation import spec_problems
from op_factories import finetune

CHART = Path(__file__).resolve().parents[2] / "charts" / "deltafleet" / "templates" / "deployment.yaml"


def test_env_defaults_and_flags_override():
    env = {"DELTAFLEET_SERVE_BACKEND": "ray-api", "DELTAFLEET_RAY_DASHBOARD_URL": "http://ray:8265/",
           "DELTAFLEET_NAMESPACES": "b, a", "DELTAFLEET_STORE_HOST_PATH": "/srv/m",
           "DELTAFLEET_SERVE_MAX_BATCH_SIZE": "32"}
    s, _ = parse_settings([], env)
    assert (s.backend, s.ray_dashboard_url, s.namespaces, s.store_host_path, s.max_batch_size) == ("ray-api", "http://ray:8265", ("a", "b"), "/srv/m", 32)
    assert s.endpoint_base == "http://ray:8000"
    s, _ = parse_settings(["--serve-backend", "rayservice", "-n", "x"], env)
    assert s.backend == "rayservice" and s.namespaces == ("x",)
    assert s.endpoint_base == "http://deltafleet-serve-svc.deltafleet.svc:8000"


def test_every_env_var_is_deltafleet_and_its_flag():
    for action in build_parser({})._actions:
        flags = [o for o in action.option_strings if o.startswith("--")]
        envs = re.findall(r"\[env (DELTAFLEET_[A-Z_]+)", action.help or "")
        if action.dest in ("help", "check", "verbose"):
            assert not envs
        elif action.dest == "namespaces":  # the repeatable --namespace: the list, comma-separated
            assert envs == ["DELTAFLEET_NAMESPACES"]
        else:
            assert envs == ["DELTAFLEET_" + flags[0][2:].upper().replace("-", "_")], flags


def test_a_former_name_still_works_and_the_new_name_wins():
    s, _ = parse_settings([], {"DELTAFLEET_SERVE_ENDPOINT": "http://old:8000", "DELTAFLEET_HEALTH_PORT": "9090"})
    assert (s.serve_url, s.liveness_port) == ("http://old:8000", 9090)
    both = {"DELTAFLEET_SERVE_ENDPOINT": "http://old:8000", "DELTAFLEET_SERVE_URL": "http://new:8000"}
    s, _ = parse_settings([], both)
    assert s.serve_url == "http://new:8000"
    former_flags = ["--backend", "ray-api", "--device", "cpu", "--dtype", "float32", "--max-batch-size", "4"]
    s, _ = parse_settings(former_flags, {})
    assert (s.backend, s.device, s.dtype, s.max_batch_size) == ("ray-api", "cpu", "float32", 4)
    help_text = " ".join(build_parser({}).format_help().split())
    for former in ("--backend", "DELTAFLEET_SERVE_ENDPOINT", "DELTAFLEET_MODEL_STORE_CLAIM", "DELTAFLEET_HEALTH_PORT"):
        assert help_text.count(former + " ") + help_text.count(former + "]") == 1, former  # listed once


def test_conflicting_store_flags_are_refused():
    with pytest.raises(SystemExit, match="not both"):
        parse_settings(["--store-claim", "a", "--store-host-path", "/b"], {})


def test_every_env_the_chart_sets_is_read():
    if not CHART.exists():
        pytest.skip("chart not present")
    chart_env = set(re.findall(r"- name: (DELTAFLEET_[A-Z_]+)", CHART.read_text()))
    help_text = build_parser({}).format_help()
    read = set(re.findall(r"DELTAFLEET_[A-Z_]+", help_text.replace("\n", " ").replace(" ", "")))
    assert chart_env <= read, f"chart sets env the operator ignores: {sorted(chart_env - read)}"


def test_spec_problems_name_the_field():
    s, _ = parse_settings([], {})
    problems = spec_problems(finetune(finetuned="bases/tiny"), s)
    assert any(p.startswith("spec.fineTunedModel:") for p in problems)
    assert any(p.startswith("spec.modelStore:") for p in problems)
    s, _ = parse_settings(["--store-host-path", "/srv"], {})
    assert spec_problems(finetune(), s) == []
    # The schema refuses malformed names; what it cannot say is that "base" belongs to the pool.
    assert any("modelName" in p for p in spec_problems(finetune(spec={"serving": {"modelName": "base"}}), s))


def test_a_bad_env_value_is_one_line_naming_the_variable(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_settings([], {"DELTAFLEET_JOB_RUN_AS_USER": "abc"})
    assert exit_.value.code == 2
    assert "env DELTAFLEET_JOB_RUN_AS_USER='abc' is not a valid int" in capsys.readouterr().err
