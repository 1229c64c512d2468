"""Controller.reconcile against fakes (tests/operator/fakes.py): the order of its writes, which
keeps every crash safe, and what it writes. No cluster: each test runs in milliseconds."""

from __future__ import annotations

import os

import pytest
from fakes import Crash, FakeBackend, FakeCluster
from op_factories import compress_result, delta_status, finetune_body

from deltafleet.operator import api
from deltafleet.operator import compression as comp
from deltafleet.operator.conditions import Reason
from deltafleet.operator.controller import Controller, InvalidSpec
from deltafleet.operator.decisions import parse_time
from deltafleet.operator.settings import Settings
from deltafleet.serving.config import key_digest

NOW = parse_time("2026-01-01T00:10:00Z")
SETTINGS = Settings(backend="ray-api", serve_auth="none", serve_url="http://svc:8000", store_host_path="/srv/models",
                    operator_store_path="", namespaces=("team-a",))
G1_URI = "file:///models/deltas/team-a/bot/g1/delta.safetensors"


def spec_hash(body: dict) -> str:
    return comp.compression_hash(api.FineTune.model_validate(body).spec)


class World:
    """One fake API server, one fake serve backend, one journal of their writes, the Events posted."""

    def __init__(self, settings: Settings = SETTINGS):
        self.journal: list = []
        self.cluster = FakeCluster(self.journal)
        self.backend = FakeBackend(self.journal)
        self.events: list[tuple[str, str]] = []
        self.settings = settings

    def controller(self, settings: Settings | None = None) -> Controller:
        """A fresh operator process (nothing applied yet, in its memory)."""
        def post(body, *, type, reason, message):
            self.events.append((type, reason))
        return Controller(settings or self.settings, self.backend, kube=self.cluster.kube, clock=lambda: NOW,
                          post_event=post)

    def add(self, *, current_hash: bool = False, **kw) -> dict:
        body = finetune_body("bot", **kw)
        if current_hash:
            body["metadata"]["annotations"][comp.HASH_ANNOTATION] = spec_hash(body)
        self.cluster.add_finetune(body)
        return body

    def ft(self) -> dict:
        return self.cluster.finetune("team-a", "bot")

    def condition(self, type_: str) -> dict:
        return next(c for c in self.ft()["status"]["conditions"] if c["type"] == type_)

    def kinds(self) -> list[str]:
        return [entry[0] for entry in self.journal]

    def first(self, match) -> int:
        """The journal position of the first write `match(entry)` accepts."""
        return next(i for i, entry in enumerate(self.journal) if match(entry))


def served(world: World) -> World:
    """bot compressed, through the gate and in its pool's serve config."""
    world.add(current_hash=True, status={"delta": delta_status(uri=G1_URI), "job": "bot-compress-g1", "retries": 0})
    world.controller().reconcile("team-a", "bot")
    assert G1_URI in {t["uri"] for t in world.backend.tenants().values()}
    return world


def test_a_new_compression_input_forgets_the_old_delta_before_it_records_its_hash():
    w = served(World())
    ctl = w.controller()
    ft = w.ft()
    ft["spec"]["compression"]["steps"] = 3  # a new compression input, generation 2
    ft["metadata"]["generation"] = 2
    w.journal.clear()
    ctl.reconcile("team-a", "bot")

    forget = w.first(lambda e: e[0] == "status" and "delta" in e[2] and e[2]["delta"] is None)
    annotate = w.first(lambda e: e[0] == "annotations")
    created = w.first(lambda e: e[0] == "job")
    unserved = w.first(lambda e: e[0] == "config")
    assert forget < annotate < created < unserved, w.kinds()
    assert w.journal[created][2] == "bot-compress-g2"
    assert w.backend.tenants() == {}  # the old input's delta is served no more
    status = w.ft()["status"]
    assert "delta" not in status and status["job"] == "bot-compress-g2"
    assert w.condition("Compressed")["reason"] == Reason.JOB_CREATED


def test_a_crash_between_forgetting_the_old_delta_and_recording_the_hash_never_pairs_the_old_delta_with_the_new_hash():
    w = served(World())
    ft = w.ft()
    ft["spec"]["compression"]["steps"] = 3
    ft["metadata"]["generation"] = 2
    w.cluster.crash_after = "status"
    with pytest.raises(Crash):
        w.controller().reconcile("team-a", "bot")
    after = w.ft()
    assert "delta" not in after["status"]  # forgotten ...
    assert after["metadata"]["annotations"][comp.HASH_ANNOTATION] != spec_hash(after)

    w.cluster.crash_after = None  # ... and the restarted operator carries on from there
    w.controller().reconcile("team-a", "bot")
    assert sorted(name for _, name in w.cluster.jobs) == ["bot-compress-g2"]
    assert w.condition("Compressed")["reason"] == Reason.JOB_CREATED


def test_a_crash_right_after_the_job_is_created_leaves_one_job_that_the_next_reconcile_finds(monkeypatch):
    w = World()
    w.add()

    def exit_now(code):
        raise Crash(f"exit {code}")

    monkeypatch.setattr(os, "_exit", exit_now)
    with pytest.raises(Crash, match="exit 3"):
        w.controller(Settings(**{**SETTINGS.__dict__, "exit_after_job_create": True})).reconcile("team-a", "bot")
    assert list(w.cluster.jobs) == [("team-a", "bot-compress-g1")]
    assert "job" not in (w.ft().get("status") or {})  # it died before recording the Job

    w.controller().reconcile("team-a", "bot")  # the restarted operator
    assert list(w.cluster.jobs) == [("team-a", "bot-compress-g1")]
    assert w.kinds().count("job") == 1
    assert w.ft()["status"]["job"] == "bot-compress-g1"
    assert "is compressing" in w.condition("Compressed")["message"]


def test_the_job_is_owned_by_its_finetune_and_carries_its_labels():
    w = World()
    body = finetune_body("bot")
    body["metadata"]["labels"] = {"team": "a"}
    w.cluster.add_finetune(body)
    w.controller().reconcile("team-a", "bot")
    job = w.cluster.jobs[("team-a", "bot-compress-g1")]
    (owner,) = job["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("FineTune", "bot", "uid-team-a-bot", True)
    assert job["metadata"]["labels"]["team"] == "a"
    assert job["metadata"]["labels"][comp.LABEL_HASH] == spec_hash(body)


def test_a_job_that_already_exists_when_it_is_created_counts_as_created():
    w = World()
    w.add()
    w.controller().reconcile("team-a", "bot")
    w.cluster.stale_job_list = True  # this reconcile does not see the Job and creates it again: 409
    w.controller().reconcile("team-a", "bot")
    assert list(w.cluster.jobs) == [("team-a", "bot-compress-g1")]
    assert w.condition("Compressed")["reason"] == Reason.JOB_CREATED


def test_a_missing_store_claim_creates_no_job_and_the_condition_says_why():
    w = World(Settings(**{**SETTINGS.__dict__, "store_claim": "models", "store_host_path": ""}))
    w.add()
    w.controller().reconcile("team-a", "bot")
    assert w.cluster.jobs == {}
    c = w.condition("Compressed")
    assert (c["status"], c["reason"]) == ("False", Reason.MODEL_STORE_MISSING)
    assert "PersistentVolumeClaim team-a/models (the model store) does not exist" in c["message"]
    assert w.ft()["status"]["phase"] == "Pending"
    assert ("Warning", Reason.MODEL_STORE_MISSING) in w.events

    w.cluster.claims.add(("team-a", "models"))  # once the claim exists, the next reconcile creates the Job
    w.controller().reconcile("team-a", "bot")
    assert list(w.cluster.jobs) == [("team-a", "bot-compress-g1")]
    volumes = w.cluster.jobs[("team-a", "bot-compress-g1")]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "model-store", "persistentVolumeClaim": {"claimName": "models"}} in volumes


def test_a_rotated_key_secret_changes_the_tenants_digests_and_reapplies_the_serve_config():
    w = World(Settings(**{**SETTINGS.__dict__, "serve_auth": "keys"}))
    w.cluster.set_secret("team-a", "bot-keys", ci="key-1")
    w.add(current_hash=True, spec={"serving": {"apiKeySecretRef": {"name": "bot-keys"}}},
          status={"delta": delta_status(uri=G1_URI), "job": "bot-compress-g1", "retries": 0})
    ctl = w.controller()
    ctl.reconcile("team-a", "bot")
    assert w.backend.tenants()["team-a/bot"]["key_sha256"] == [key_digest("key-1")]
    ctl.reconcile("team-a", "bot")
    assert w.kinds().count("config") == 1  # the same keys: nothing to apply

    w.cluster.set_secret("team-a", "bot-keys", ci="key-2")
    ctl.reconcile("team-a", "bot")
    assert w.kinds().count("config") == 2
    assert w.backend.tenants()["team-a/bot"]["key_sha256"] == [key_digest("key-2")]


def test_a_tenant_whose_key_secret_is_missing_is_not_served_and_says_why():
    w = World(Settings(**{**SETTINGS.__dict__, "serve_auth": "keys"}))
    w.add(current_hash=True, spec={"serving": {"apiKeySecretRef": {"name": "bot-keys"}}},
          status={"delta": delta_status(uri=G1_URI), "job": "bot-compress-g1", "retries": 0})
    w.controller().reconcile("team-a", "bot")
    assert w.backend.tenants() == {}
    c = w.condition("Served")
    assert (c["reason"], c["message"]) == (Reason.API_KEYS_MISSING, "API key Secret team-a/bot-keys not found")


def test_a_new_delta_is_recorded_in_status_before_any_serve_config_names_it():
    w = World()
    w.add(current_hash=True)
    ctl = w.controller()
    ctl.reconcile("team-a", "bot")
    w.cluster.finish_job("team-a", "bot-compress-g1", compress_result(G1_URI, retained=0.98))
    w.journal.clear()
    ctl.reconcile("team-a", "bot")

    recorded = w.first(lambda e: e[0] == "status" and (e[2].get("delta") or {}).get("uri") == G1_URI)
    named = w.first(lambda e: e[0] == "config")
    assert recorded < named, w.kinds()
    assert w.journal[recorded][2].keys() == {"delta", "job", "retries"}
    assert w.backend.tenants()["team-a/bot"]["uri"] == G1_URI
    assert w.condition("Compressed")["reason"] == Reason.DELTA_READY
    assert w.condition("Served")["reason"] == Reason.CONFIG_APPLIED


def test_the_status_is_written_once_per_reconcile_when_something_changed_and_not_at_all_when_nothing_did():
    w = World()
    w.add()
    ctl = w.controller()
    ctl.reconcile("team-a", "bot")  # the hash recorded, the Job created (and this process's first serve config)
    assert w.kinds() == ["annotations", "job", "config", "status"]
    assert "created Job bot-compress-g1" in w.condition("Compressed")["message"]
    assert sorted(w.events) == [("Normal", Reason.JOB_CREATED), ("Normal", Reason.NOT_COMPRESSED),
                                ("Normal", Reason.WAITING_FOR_DELTA)]

    w.journal.clear()
    ctl.reconcile("team-a", "bot")  # the Job runs: the message says so
    assert w.kinds() == ["status"]
    assert "is compressing" in w.condition("Compressed")["message"]

    w.journal.clear()
    w.events.clear()
    ctl.reconcile("team-a", "bot")  # nothing changed
    assert w.journal == [] and w.events == []


def test_a_refused_spec_gets_its_conditions_and_no_job_then_fails_for_good():
    w = World()
    w.add(spec={"compression": {"image": "evil/miner:1"}})
    with pytest.raises(InvalidSpec, match="not an allowed image"):
        w.controller().reconcile("team-a", "bot")
    assert w.kinds() == ["status"]
    assert w.condition("Compressed")["reason"] == Reason.REFUSED_BY_POLICY
    assert w.ft()["status"]["phase"] == "Failed"


def test_an_unreachable_backend_is_recorded_in_served_and_the_status_still_written():
    w = World()
    w.backend.down = True
    w.add(current_hash=True, status={"delta": delta_status(uri=G1_URI), "job": "bot-compress-g1", "retries": 0})
    w.controller().reconcile("team-a", "bot")
    c = w.condition("Served")
    assert (c["reason"], c["message"]) == (Reason.BACKEND_UNAVAILABLE, "connection refused")
    assert w.condition("Compressed")["reason"] == Reason.DELTA_READY


def test_a_deleted_or_deleting_finetune_is_left_to_the_finalizer():
    w = World()
    w.controller().reconcile("team-a", "bot")  # not there at all
    body = w.add()
    body["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    w.cluster.add_finetune(body)
    w.controller().reconcile("team-a", "bot")
    assert w.journal == []
