"""The operator's side of the tenant-status route: the status key in the serve config (fed to
serving's own validation) and reading the route over real HTTP (a loopback server that answers
as a replica would, or does not)."""

from __future__ import annotations

import copy
import json

import pytest
from fake_replica import NOT_FOUND, FakeReplicas
from op_factories import delta_status, finetune
from op_harness import free_port

from deltafleet.operator import replica_status as rs
from deltafleet.operator import serveconfig as sc
from deltafleet.operator.backend import AppStatus, BackendError, TenantState
from deltafleet.operator.settings import Settings
from deltafleet.serving.config import key_digest, parse_args, parse_tenants

SETTINGS = Settings(replica_store_path="/mnt/store")


def _config() -> dict:
    ft = finetune(name="bot", spec={"serving": {"pool": "tiny"}},
                  status={"delta": delta_status("file:///models/deltas/team-a/bot/g1/delta.safetensors")})
    return sc.build_serve_config([sc.tenant_of(ft, "", SETTINGS, ("a" * 64,))], SETTINGS)


def test_the_status_keys_digest_travels_in_every_pools_config_and_serving_accepts_it():
    config = _config()
    before = copy.deepcopy(config)
    out = rs.with_status_key(config, "status-secret")
    assert config == before  # pure
    for app in out["applications"]:
        parse_args(app["args"])  # the replica's own validation of both parts
        user_config = parse_tenants(app["deployments"][0]["user_config"], pool=app["args"]["pool"])
        assert user_config.status_key_sha256 == key_digest("status-secret")
        assert user_config.tenants["team-a/bot"].key_sha256 == ["a" * 64]
    assert "status-secret" not in json.dumps(out)
    assert rs.with_status_key(config, None) is config
    assert sc.config_hash(rs.with_status_key(config, "k1")) != sc.config_hash(rs.with_status_key(config, "k2"))  # rotation re-applies


def test_serving_refuses_a_status_digest_that_is_not_one():
    from deltafleet.serving.config import ConfigError

    with pytest.raises(ConfigError, match="status_key_sha256 must be 64 lowercase hex"):
        parse_tenants({"tenants": {}, "status_key_sha256": "the-key-itself"})


def test_the_status_key_comes_from_its_file_and_a_bad_file_says_which(tmp_path):
    assert rs.status_key(SETTINGS) is None
    f = tmp_path / "key"
    f.write_text("s3cret\n")
    assert rs.status_key(Settings(serve_status_key_file=str(f))) == "s3cret"
    with pytest.raises(BackendError, match=f"pool status key file {tmp_path}/missing: No such file"):
        rs.status_key(Settings(serve_status_key_file=str(tmp_path / "missing")))
    f.write_text("  \n")
    with pytest.raises(BackendError, match="is empty"):
        rs.status_key(Settings(serve_status_key_file=str(f)))


class Replica:
    """One pool's replica with auth: keys and status key "status-secret" (tests set answer/status)."""

    def __init__(self):
        self.answer, self.status = {"replica": "r1", "tenants": {}}, 200
        digest = key_digest("status-secret")
        self.fake = FakeReplicas(lambda pool, key: (self.status, self.answer) if key and key_digest(key) == digest else (404, NOT_FOUND))
        self.url, self.seen = self.fake.url, self.fake.seen


@pytest.fixture
def replica():
    r = Replica()
    yield r
    r.fake.close()


def test_a_replicas_states_are_read_with_the_status_key(replica):
    replica.answer = {"replica": "r7", "tenants": {"a/b": {"state": "ready", "error": None},
                                                   "a/c": {"state": "failed", "error": "no such file"}}}
    report = rs.read_report(replica.url + "/", "tiny", "status-secret")
    assert report.tenants == {"a/b": TenantState("ready"), "a/c": TenantState("failed", "no such file")}
    assert report.replica == "r7" and report.error == ""
    assert replica.seen[-1] == ("/tiny/-/tenants", "Bearer status-secret")


def test_a_refused_key_says_what_to_set(replica):
    report = rs.read_report(replica.url, "tiny", None)
    assert report.tenants is None and "HTTP 404" in report.error and "--serve-status-key-file" in report.error


@pytest.mark.parametrize("answer,status,error", [
    ("not json", 200, "not JSON"),
    ({"replica": "r"}, 200, "tenant states.tenants: Field required"),
    ({"tenants": {"a/b": {"state": "sleeping"}}}, 200, "tenant states.tenants.a/b.state: Input should be 'loading', 'ready' or 'failed'"),
    ({"tenants": {"a/b": "ready"}}, 200, "tenant states.tenants.a/b: Input should be a valid dictionary"),
    ([], 200, "tenant states: expected a mapping"),
    ({}, 503, "HTTP 503"),
], ids=["not JSON", "no tenants", "an unknown state", "a state that is not an object", "not an object", "a server error"])
def test_an_answer_that_is_not_a_replicas_is_unreadable_and_says_which_field(replica, answer, status, error):
    replica.answer, replica.status = answer, status
    report = rs.read_report(replica.url, "tiny", "status-secret")
    assert report.tenants is None and error in report.error and "\n" not in report.error, report.error


def test_the_body_the_route_builds_is_what_the_operator_reads():
    """One side's output fed to the other's validation, along the whole chain: an engine
    replica's own report of its bank (a tenant in each of the bank's states), taken by the
    pool's TenantDirectory, whose states() the route answers, as JSON, read by the operator's
    parser. The real route over Ray: tests/serving/test_ray_app.py."""
    pytest.importorskip("ray")
    from types import SimpleNamespace

    from deltafleet.serving.bank import FAILED, LOADING, READY
    from deltafleet.serving.directory import TenantDirectory
    from deltafleet.serving.replica import DeltaServer

    held = {"a/ready": SimpleNamespace(status=READY, error=None), "a/loading": SimpleNamespace(status=LOADING, error=None),
            "a/failed": SimpleNamespace(status=FAILED, error="no such file")}
    bank = SimpleNamespace(names=lambda: list(held), status=held.get)
    uris = {name: f"file:///store/{name}.safetensors" for name in [*held, "a/unloaded"]}
    replica = SimpleNamespace(engine=SimpleNamespace(bank=bank), dropped=set(), failures={}, uris=uris)
    reported = {name: r.model_dump() for name, r in DeltaServer.func_or_class.held(replica).items()}

    directory = TenantDirectory.func_or_class({"pool": "p", "base_model": "/base", "placement": "all"}, None)
    directory.reconfigure({"tenants": {name: {"uri": uri} for name, uri in uris.items()}})
    directory.report("r1", reported)
    body = json.loads(json.dumps(directory.states("ingress-1")))
    report = rs.parse_report(body, "the route")
    assert report.error == "" and report.replica == "ingress-1" and report.replicas == 1
    assert report.tenants == {"a/ready": TenantState("ready", replicas=1), "a/loading": TenantState("loading"),
                              "a/failed": TenantState("failed", "replica r1: no such file"), "a/unloaded": TenantState("loading")}


def test_nothing_listening_is_unreadable():
    report = rs.read_report(f"http://127.0.0.1:{free_port()}", "tiny", None, timeout=2)
    assert report.tenants is None and report.error.startswith("GET http://127.0.0.1:")


def test_only_running_applications_are_asked(replica, tmp_path):
    key = tmp_path / "key"
    key.write_text("status-secret")
    settings = Settings(serve_url=replica.url, serve_status_key_file=str(key))
    replica.answer = {"replica": "r1", "tenants": {"a/b": {"state": "loading"}}}
    out = rs.attach_reports({"tiny": AppStatus("RUNNING"), "other": AppStatus("DEPLOYING")}, settings)
    assert out["tiny"].replica.tenants == {"a/b": TenantState("loading")}
    assert out["other"].replica is None and [p for p, _ in replica.seen] == ["/tiny/-/tenants"]
    broken = rs.attach_reports({"tiny": AppStatus("RUNNING")}, Settings(serve_url=replica.url, serve_status_key_file=str(tmp_path / "none")))
    assert broken["tiny"].replica.tenants is None and "pool status key file" in broken["tiny"].replica.error
