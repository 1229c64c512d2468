"""The serve config: a pure, deterministic function of the gate-passed FineTunes."""

import json
import random

import yaml
from op_factories import delta_status, finetune

from deltafleet.operator import serveconfig as sc
from deltafleet.operator.decisions import eligible
from deltafleet.operator import compression as comp
from deltafleet.operator.settings import Settings

SETTINGS = Settings(replica_store_path="/mnt/store", replica_cpus=1, max_batch_size=16)


def tenant(name, ns="team-a", base="bases/tiny", created="2026-01-01T00:00:00Z", **serving):
    ft = finetune(name=name, namespace=ns, base=base, created=created, spec={"serving": serving},
                  status={"delta": delta_status(f"file:///models/deltas/{ns}/{name}/g1/delta.safetensors")})
    return sc.tenant_of(ft, created, SETTINGS)


def test_contract_shape_of_one_pool():
    t = tenant("bot", pool="tiny", maxReplicas=4, gpusPerReplica=0)
    config = sc.build_serve_config([t], SETTINGS)
    tenants = {"tenants": {"team-a/bot": {"uri": "file:///mnt/store/deltas/team-a/bot/g1/delta.safetensors"}}}
    assert config == {"applications": [{
        "name": "tiny",
        "route_prefix": "/tiny",
        "import_path": "deltafleet.serving.app:build_app",
        "args": {"pool": "tiny", "base_model": "/mnt/store/bases/tiny", "device": "auto", "dtype": "auto",
                 "max_batch_size": 16, "store_root": "/mnt/store", "auth": "keys"},
        "deployments": [{
            "name": "DeltaServer",
            "autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 24.0},
            "max_ongoing_requests": 288,  # batch + the engine's queue of 256 + a batch: the engine refuses first
            "max_queued_requests": 128,
            "ray_actor_options": {"num_gpus": 0, "num_cpus": 1},
            "request_router_config": {"request_router_class": "deltafleet.serving.routing:TenantRouter",
                                      "request_router_kwargs": {"spread_at": 16}},  # a holder is free below a batch
            "user_config": tenants,
        }, {
            "name": "Ingress", "num_replicas": 1, "max_ongoing_requests": 4096, "ray_actor_options": {"num_cpus": 0},
            "user_config": tenants,
        }, {
            "name": "TenantDirectory", "user_config": tenants,
        }],
    }]}


def test_prefix_caching_off_reaches_every_pool_and_the_default_writes_nothing():
    from dataclasses import replace

    from deltafleet.serving.config import parse_args

    t = tenant("bot", pool="tiny")
    [on] = sc.build_serve_config([t], SETTINGS)["applications"]
    assert "prefix_caching" not in on["args"] and parse_args(on["args"]).prefix_caching is True
    [off] = sc.build_serve_config([t], replace(SETTINGS, serve_prefix_caching="off"))["applications"]
    assert off["args"]["prefix_caching"] is False and parse_args(off["args"]).prefix_caching is False


def test_placement_settings_reach_every_pool_and_the_defaults_write_nothing():
    from dataclasses import replace

    from deltafleet.serving.config import parse_args

    t = tenant("bot", pool="tiny")
    [routed] = sc.build_serve_config([t], SETTINGS)["applications"]
    assert "placement" not in routed["args"] and parse_args(routed["args"]).placement == "routed"
    assert routed["deployments"][0]["request_router_config"]["request_router_kwargs"] == {"spread_at": 16}
    [every] = sc.build_serve_config([t], replace(SETTINGS, serve_placement="all", serve_max_tenants_per_replica=64))["applications"]
    assert (every["args"]["placement"], every["args"]["max_tenants_per_replica"]) == ("all", 64)
    assert "request_router_config" not in every["deployments"][0]  # no multiplexed id to route by


def test_two_tenants_one_base_make_one_application_two_bases_two():
    a, b = tenant("a", pool="p1"), tenant("b", ns="team-b", pool="p1", maxReplicas=8, targetOngoingRequests=2)
    c = tenant("c", base="bases/other", pool="p2")
    apps = sc.build_serve_config([c, b, a], SETTINGS)["applications"]
    assert [app["name"] for app in apps] == ["p1", "p2"]
    dep = apps[0]["deployments"][0]
    assert list(dep["user_config"]["tenants"]) == ["team-a/a", "team-b/b"]
    assert dep["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 8, "target_ongoing_requests": 2}
    assert list(apps[1]["deployments"][0]["user_config"]["tenants"]) == ["team-a/c"]


def test_order_does_not_change_bytes_or_hash():
    ts = [tenant(f"t{i}", pool=f"p{i % 3}") for i in range(9)]
    first = sc.build_serve_config(ts, SETTINGS)
    for seed in range(5):
        shuffled = ts[:]
        random.Random(seed).shuffle(shuffled)
        again = sc.build_serve_config(shuffled, SETTINGS)
        assert yaml.safe_dump(again) == yaml.safe_dump(first)
        assert sc.config_hash(again) == sc.config_hash(first)
    assert sc.config_hash(sc.build_serve_config(ts[:-1], SETTINGS)) != sc.config_hash(first)


def test_hash_is_independent_of_dict_order():
    assert sc.config_hash({"a": 1, "b": {"c": 2, "d": 3}}) == sc.config_hash({"b": {"d": 3, "c": 2}, "a": 1})


def test_pool_base_conflict_oldest_wins():
    old = tenant("old", pool="p", created="2026-01-01T00:00:00Z")
    new = tenant("new", base="bases/other", pool="p", created="2026-02-01T00:00:00Z")
    pools, conflicts = sc.split_pools([new, old])
    assert [t.name for t in pools["p"]] == ["old"]
    assert "team-a/new" in conflicts and "bases/tiny" in conflicts["team-a/new"]
    assert list(sc.build_serve_config([new, old], SETTINGS)["applications"][0]["deployments"][0]["user_config"]["tenants"]) == ["team-a/old"]


def test_empty_config_has_no_applications():
    assert sc.build_serve_config([], SETTINGS) == {"applications": []}


def test_eligibility_needs_current_hash_and_gate():
    ft = finetune(status={"delta": delta_status(fidelity=0.7)}, spec={"compression": {"minFidelity": 0.6}})
    current = {comp.HASH_ANNOTATION: comp.compression_hash(ft.spec)}
    assert eligible(ft, current, deleting=False)
    assert not eligible(ft, current, deleting=True)
    assert not eligible(ft, {comp.HASH_ANNOTATION: "stale"}, deleting=False)
    strict = finetune(status={"delta": delta_status(fidelity=0.7)}, spec={"compression": {"minFidelity": 0.8}})
    assert not eligible(strict, {comp.HASH_ANNOTATION: comp.compression_hash(strict.spec)}, deleting=False)
    assert not eligible(finetune(), current, deleting=False)  # no delta yet


def test_the_operators_config_passes_servings_own_loader_and_rays_schema(tmp_path):
    """The contract's two sides: what the operator writes is what `deltafleet serve --config`
    and the replicas accept (serving/cli.py validate: Ray's ServeDeploySchema, the app args,
    the tenant set), and every delta URI resolves inside the replicas' store root."""
    from deltafleet.serving.cli import validate
    from deltafleet.serving.config import parse_args, parse_tenants, resolve_uri

    fts = [tenant("a", pool="p1"), tenant("b", ns="team-b", pool="p1", targetOngoingRequests=2),
           tenant("c", base="bases/other", pool="p2", modelName="team-c/chat")]
    config = sc.build_serve_config(fts, SETTINGS)
    path = tmp_path / "pool.yaml"
    path.write_text(yaml.safe_dump(config))
    validate(yaml.safe_load(path.read_text()), where=str(path))  # raises ConfigError on any mismatch
    for app in config["applications"]:
        args = parse_args(app["args"])
        tenants = parse_tenants(app["deployments"][0]["user_config"], pool=args.pool)
        assert all(resolve_uri(t.uri, args.store_root).is_relative_to("/mnt/store") for t in tenants.tenants.values())
    assert sorted(parse_tenants(config["applications"][0]["deployments"][0]["user_config"]).tenants) == ["team-a/a", "team-b/b"]


def test_a_config_the_replicas_would_refuse_is_refused_by_the_operator_first():
    import pytest

    from deltafleet.serving.config import BASE_ALIASES

    bad = sc.Tenant(namespace="team-a", name="x", model=BASE_ALIASES[0], pool="p1", base_model="/mnt/store/bases/tiny",
                    uri="file:///mnt/store/deltas/x.safetensors")
    with pytest.raises(ValueError, match="reserved for the base model"):
        sc.build_serve_config([bad], SETTINGS)


def test_a_tenants_key_digests_reach_its_pool_and_the_pool_needs_keys():
    from deltafleet.serving.config import key_digest, parse_tenants

    ft = finetune(name="bot", namespace="team-a", base="bases/tiny", spec={"serving": {"apiKeySecretRef": {"name": "bot-keys"}}},
                  status={"delta": delta_status("file:///models/deltas/team-a/bot/g1/delta.safetensors")})
    t = sc.tenant_of(ft, "", SETTINGS, key_sha256=(key_digest("k2"), key_digest("k1")))
    app = sc.build_serve_config([t], SETTINGS)["applications"][0]
    assert app["args"]["auth"] == "keys"
    tenants = parse_tenants(app["deployments"][0]["user_config"]).tenants
    assert tenants["team-a/bot"].key_sha256 == sorted([key_digest("k1"), key_digest("k2")])
    assert "k1" not in json.dumps(app)  # digests only
    open_pool = sc.build_serve_config([t], Settings(replica_store_path="/mnt/store", serve_auth="none"))
    assert open_pool["applications"][0]["args"]["auth"] == "none"


def hub_tenant(name, commit, created):
    """A FineTune on the Hub base org/base whose Job stored the snapshot of `commit`."""
    status = {"delta": {**delta_status(f"file:///models/deltas/team-a/{name}/g1/delta.safetensors"),
                        "baseSnapshot": f"/models/bases/hub/org--base/{commit}"}}
    ft = finetune(name=name, created=created, spec={"baseModel": {"path": None, "huggingFace": "org/base"}, "serving": {"pool": "p"}},
                  status=status)
    return sc.tenant_of(ft, created, SETTINGS)


def test_replicas_load_the_base_the_job_stored_not_the_hub_id():
    t = hub_tenant("a", "1" * 40, "2026-01-01T00:00:00Z")
    (app,) = sc.build_serve_config([t], SETTINGS)["applications"]
    assert app["args"]["base_model"] == "/mnt/store/bases/hub/org--base/" + "1" * 40  # the replicas' mount


def test_a_finetune_whose_base_resolved_to_another_commit_is_refused_by_its_pool():
    # Same Hub id, but the branch moved between the two Jobs: the pool keeps the oldest's base.
    old, new = hub_tenant("old", "1" * 40, "2026-01-01T00:00:00Z"), hub_tenant("new", "2" * 40, "2026-02-01T00:00:00Z")
    pools, conflicts = sc.split_pools([new, old])
    assert [t.name for t in pools["p"]] == ["old"]
    assert "1" * 40 in conflicts["team-a/new"] and "2" * 40 in conflicts["team-a/new"]


def test_the_engine_refuses_before_ray_serve_does():
    """Serve's own refusals are plain text (a 503 "Request dropped due to backpressure"); the
    engine's are OpenAI-shaped 429s. A replica must accept more than its engine can run and queue."""
    from deltafleet.serving.config import AppArgs

    for batch in (1, 4, 16, 64):
        d = sc.build_serve_config([tenant("bot", pool="tiny")], replace_batch(SETTINGS, batch))["applications"][0]
        deployment = d["deployments"][0]
        assert deployment["max_ongoing_requests"] > batch + AppArgs.model_fields["max_queue"].default


def replace_batch(settings, batch):
    from dataclasses import replace

    return replace(settings, max_batch_size=batch)


def test_one_pool_name_rule_for_the_finetune_schema_and_the_replicas():
    """The pool-name rule (serving.config.POOL_NAME_PATTERN) is what the CRD's schema checks
    (spec.serving.pool), what replicas accept (AppArgs.pool) and what derived names follow."""
    import pytest
    from pydantic import ValidationError

    from deltafleet.operator import api
    from deltafleet.serving.config import POOL_NAME_PATTERN, ConfigError, parse_args

    schema = api.Serving.model_json_schema(by_alias=True)["properties"]["pool"]["anyOf"][0]
    assert schema["pattern"] == POOL_NAME_PATTERN
    for name in ("llama2-7b", "a", "0x", "-a", "a-", "Llama", "a_b", "a.b", "a/b", "a" * 50):
        try:
            api.Serving(pool=name)
        except ValidationError:
            with pytest.raises(ConfigError, match="args.pool"):
                parse_args({"pool": name, "base_model": "/m/b"})
        else:
            parse_args({"pool": name, "base_model": "/m/b"})
    for ref in ({"huggingFace": "meta-llama/Llama-2-7b-hf"}, {"path": "bases/My Base (v2)!"}, {"path": "bases/___"}):
        pool = api.derive_pool(api.ModelSource(**ref))
        assert parse_args({"pool": pool, "base_model": "/m/b"}).pool == pool
