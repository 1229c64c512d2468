"""The TenantDirectory's bookkeeping, fed replica reports directly (no Ray): which tenants are
ready, failed or loading, which replicas hold each now, and the load checks it runs.
Its body is what the operator's parser reads (one model on both sides)."""

from __future__ import annotations

import time

import pytest

pytest.importorskip("ray")
from deltafleet.operator.replica_status import parse_report  # noqa: E402
from deltafleet.serving import directory as directory_module  # noqa: E402
from deltafleet.serving.directory import GONE_AFTER_S, TenantDirectory  # noqa: E402

A, B = "file:///store/a/delta.safetensors", "file:///store/b/delta.safetensors"


class FakeEngine:
    """The DeltaServer handle as the directory calls it: `.options(multiplexed_model_id=t).check.remote(t).result()`."""

    def __init__(self, answers: dict[str, dict]):
        self.answers, self.asked = answers, []

    def options(self, multiplexed_model_id: str):
        assert multiplexed_model_id  # a check is routed like a request for that tenant
        return self

    @property
    def check(self):
        engine = self

        class Call:
            @staticmethod
            def remote(tenant):
                engine.asked.append(tenant)

                class Response:
                    @staticmethod
                    def result(timeout_s):
                        return engine.answers[tenant]

                return Response()

        return Call


def _directory(placement: str, engine=None) -> TenantDirectory:
    d = TenantDirectory.func_or_class({"pool": "p", "base_model": "/base", "placement": placement}, engine)
    d.reconfigure({"tenants": {"team/a": {"uri": A}, "team/b": {"uri": B}}})
    return d


def _held(state: str, uri: str, error: str | None = None) -> dict:
    return {"state": state, "error": error, "uri": uri}


def test_a_tenant_is_loading_until_a_replica_has_loaded_it_and_then_lists_its_holders():
    d = _directory("all")
    assert {n: t["state"] for n, t in d.states()["tenants"].items()} == {"team/a": "loading", "team/b": "loading"}
    d.report("r1", {"team/a": _held("ready", A), "team/b": _held("loading", B)})
    d.report("r2", {"team/a": _held("ready", A)})
    states = d.states("ingress-1")
    assert states["replica"] == "ingress-1" and states["replicas"] == ["r1", "r2"]
    assert states["tenants"]["team/a"] == {"state": "ready", "error": None, "replicas": ["r1", "r2"]}
    assert states["tenants"]["team/b"] == {"state": "loading", "error": None, "replicas": []}
    report = parse_report(states, "here")
    assert report.replicas == 2 and report.tenants["team/a"].replicas == 2 and report.tenants["team/b"].state == "loading"


def test_a_delta_that_fails_on_any_replica_is_failed_with_that_replicas_message():
    d = _directory("all")
    d.report("r1", {"team/a": _held("ready", A)})
    d.report("r2", {"team/a": _held("failed", A, "base fingerprint mismatch")})
    t = d.states()["tenants"]["team/a"]
    assert t["state"] == "failed" and t["error"] == "replica r2: base fingerprint mismatch" and t["replicas"] == ["r1"]


def test_a_replica_that_stops_reporting_is_gone_and_holds_nothing(monkeypatch):
    d = _directory("all")
    d.report("r1", {"team/a": _held("ready", A)})
    later = time.monotonic() + GONE_AFTER_S + 1
    monkeypatch.setattr(directory_module.time, "monotonic", lambda: later)
    d.report("r2", {})
    states = d.states()
    assert states["replicas"] == ["r2"]
    assert states["tenants"]["team/a"] == {"state": "ready", "error": None, "replicas": []}  # verified once: still loadable
    assert d.figures() == {"r2": {}}


def test_a_new_delta_is_loading_until_that_uri_is_loaded():
    d = _directory("all")
    d.report("r1", {"team/a": _held("ready", A)})
    new = "file:///store/a/g2/delta.safetensors"
    d.reconfigure({"tenants": {"team/a": {"uri": new}}})
    assert d.states()["tenants"] == {"team/a": {"state": "loading", "error": None, "replicas": []}}  # r1 holds the old one
    d.report("r1", {"team/a": _held("ready", new)})
    assert d.states()["tenants"]["team/a"]["state"] == "ready"


def test_routed_pools_check_every_tenant_once_through_the_engines_routing(monkeypatch):
    engine = FakeEngine({"team/a": {"state": "ready", "error": None, "replica": "r1"},
                         "team/b": {"state": "failed", "error": "model 'team/b' failed to load: no such file", "replica": "r2"}})
    d = _directory("routed", engine)
    assert not d.checking  # no replica yet: a check now would wait for the first one and land there
    d.report("r1", {})
    assert not d.checking and not engine.asked  # a replica just joined: the others are starting too
    later = time.monotonic() + directory_module.SETTLE_S + 1
    monkeypatch.setattr(directory_module.time, "monotonic", lambda: later)
    d.report("r1", {})  # no new replica for SETTLE_S: the checks start
    deadline = time.monotonic() + 10
    while d.checking and time.monotonic() < deadline:
        time.sleep(0.01)
    states = d.states()["tenants"]
    assert states["team/a"]["state"] == "ready"
    assert states["team/b"] == {"state": "failed", "error": "replica r2: model 'team/b' failed to load: no such file",
                                "replicas": []}
    d.report("r1", {"team/a": _held("ready", A)})  # a report starts no second check of a checked tenant
    time.sleep(0.1)
    assert sorted(engine.asked) == ["team/a", "team/b"]
