"""The serve-config contract: args, tenants, URI resolution (pure logic, no servers)."""

from __future__ import annotations

import pytest

from deltafleet.serving.cli import main, validate
from deltafleet.serving.config import ConfigError, parse_args, parse_tenants, resolve_uri
from deltafleet.serving.demo import pool_config


def test_args_defaults_and_clear_errors():
    a = parse_args({"pool": "llama2-7b", "base_model": "/models/llama"})
    assert a.device == "auto" and a.max_batch_size == 16 and a.store_root is None
    with pytest.raises(ConfigError, match=r"^args\.max_batch_size: .*greater than or equal to 1"):
        parse_args({"pool": "p", "base_model": "m", "max_batch_size": 0})
    with pytest.raises(ConfigError, match=r"args\.device: .*cuda:N"):
        parse_args({"pool": "p", "base_model": "m", "device": "tpu"})
    with pytest.raises(ConfigError, match=r"args\.bogus: Extra inputs"):
        parse_args({"pool": "p", "base_model": "m", "bogus": 1})


def test_tenant_names_may_hold_slashes_but_not_base_names():
    cfg = parse_tenants({"tenants": {"team-a/support": {"uri": "/d/x.safetensors"}}}, pool="p")
    assert list(cfg.tenants) == ["team-a/support"]
    for bad in ("base", "../x", "a//b", "/abs"):
        with pytest.raises(ConfigError, match="user_config.tenants"):
            parse_tenants({"tenants": {bad: {"uri": "/d/x"}}}, pool="p")
    with pytest.raises(ConfigError, match="pool's own name"):
        parse_tenants({"tenants": {"p": {"uri": "/d/x"}}}, pool="p")


def test_uris_file_or_absolute_only_and_never_outside_store_root(tmp_path):
    root = tmp_path / "store"
    (root / "ns").mkdir(parents=True)
    assert resolve_uri(f"file://{root}/ns/d.safetensors", str(root)) == root / "ns" / "d.safetensors"
    assert resolve_uri(f"{root}/ns/d.safetensors") == root / "ns" / "d.safetensors"
    for uri in ("s3://bucket/d", "http://x/d", "relative/d.safetensors", "file://evil-host/d"):
        with pytest.raises(ConfigError, match="delta URI"):
            resolve_uri(uri, str(root))
    with pytest.raises(ConfigError, match="outside store_root"):
        resolve_uri(f"file://{root}/ns/../../etc/passwd", str(root))
    (root / "ns" / "link").symlink_to("/etc")
    with pytest.raises(ConfigError, match="outside store_root"):
        resolve_uri(f"{root}/ns/link/passwd", str(root))


def test_cli_refuses_bad_configs_with_one_line(tmp_path, capsys):
    cfg = pool_config("toy", tmp_path, {"a/b": tmp_path / "d.safetensors"})
    validate(cfg)  # the demo's generated config is valid
    cfg["applications"][0]["args"]["max_batch_size"] = -1
    path = tmp_path / "pool.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "applications[0] (toy): args.max_batch_size" in err
    assert main(["--config", str(tmp_path / "missing.yaml")]) == 2


def test_one_builder_makes_every_application_and_refuses_what_a_replica_would():
    """serve_application: the operator, the demo and the tests build a pool's application
    with it, so the import path and the deployment name are spelled once."""
    from deltafleet.serving.config import (
        DEPLOYMENT, DIRECTORY, IMPORT_PATH, INGRESS, AppArgs, TenantsConfig, serve_application,
    )

    args = {"pool": "p", "base_model": "/m/b", "auth": "none"}
    tenants = {"tenants": {"a/b": {"uri": "/m/d.safetensors"}}}
    app = serve_application(args, tenants, num_replicas=2)
    router = {"request_router_class": "deltafleet.serving.routing:TenantRouter", "request_router_kwargs": {"spread_at": 16}}
    assert app == {"name": "p", "route_prefix": "/p", "import_path": IMPORT_PATH, "args": args, "deployments": [
        {"name": DEPLOYMENT, "request_router_config": router, "num_replicas": 2, "user_config": tenants},
        {"name": INGRESS, "num_replicas": 1, "max_ongoing_requests": 4096, "ray_actor_options": {"num_cpus": 0},
         "user_config": tenants},
        {"name": DIRECTORY, "user_config": tenants}]}
    assert serve_application(AppArgs(**args), TenantsConfig.model_validate(tenants), num_replicas=2) == app
    validate({"applications": [app]})  # Ray Serve's schema and `deltafleet serve --config`'s checks
    # A hand-written config that gives the tenants to the engine only would serve none of them: refused.
    only_engine = {**app, "deployments": [app["deployments"][0], {"name": INGRESS}]}
    with pytest.raises(ConfigError, match=r"applications\[0\] \(p\): .*Ingress, TenantDirectory differs or is missing"):
        validate({"applications": [only_engine]})
    with pytest.raises(ConfigError, match="pool's own name"):
        serve_application(args, {"tenants": {"p": {"uri": "/m/d"}}})
    with pytest.raises(ConfigError, match=r"^args\.pool: "):
        serve_application({**args, "pool": "Pool"}, tenants)


def test_the_operators_serve_config_is_what_ray_serve_and_the_replica_accept():
    # One side's output (operator/serveconfig.py) fed to the other side's validation: Ray Serve's
    # own schema for the config and its autoscaling settings, and the replica's args/tenants.
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    from deltafleet.operator.serveconfig import Tenant, build_serve_config
    from deltafleet.operator.settings import Settings

    tenants = [Tenant(namespace="team-a", name=n, model=f"team-a/{n}", pool="tiny", base_model="/m/bases/tiny",
                      uri=f"file:///m/deltas/team-a/{n}/g1/delta.safetensors", max_replicas=3) for n in ("bot", "coder")]
    config = build_serve_config(tenants, Settings(replica_store_path="/m"))
    app = ServeDeploySchema.model_validate(config).applications[0]
    deployment = app.deployments[0]
    autoscaling = config["applications"][0]["deployments"][0]["autoscaling_config"]
    assert set(autoscaling) <= set(AutoscalingConfig.model_fields), "a key Ray Serve would silently ignore"
    assert AutoscalingConfig.model_validate(autoscaling).max_replicas == 3
    parse_args(app.args)
    assert set(parse_tenants(deployment.user_config, pool=app.name).tenants) == {"team-a/bot", "team-a/coder"}


def test_the_api_server_reserves_the_names_a_replica_serves_its_base_under():
    from deltafleet.operator.api import RESERVED_MODEL_NAMES
    from deltafleet.serving.config import BASE_ALIASES

    assert set(RESERVED_MODEL_NAMES) == set(BASE_ALIASES)


def test_tenant_keys_are_digests_never_keys():
    from deltafleet.serving.config import ConfigError, key_digest, parse_args, parse_tenants

    good = parse_tenants({"tenants": {"a/b": {"uri": "/m/d.safetensors", "key_sha256": [key_digest("secret")]}}})
    assert good.tenants["a/b"].key_sha256 == ["2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b"]
    with pytest.raises(ConfigError, match="key_sha256 entries must be 64 lowercase hex"):
        parse_tenants({"tenants": {"a/b": {"uri": "/m/d.safetensors", "key_sha256": ["secret"]}}})
    assert parse_args({"pool": "p", "base_model": "/m/b"}).auth == "keys"  # secure by default
    with pytest.raises(ConfigError, match="auth"):
        parse_args({"pool": "p", "base_model": "/m/b", "auth": "open"})


def test_fp32_on_cuda_is_refused_before_the_base_loads():
    import torch

    from deltafleet.serving.model import pick_dtype

    with pytest.raises(ValueError, match="dtype float32 on CUDA is not served"):
        pick_dtype("float32", torch.device("cuda"))
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("float32", torch.device("cpu")) == torch.float32
