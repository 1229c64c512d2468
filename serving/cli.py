"""`deltafleet serve --config pool.yaml`: run pools locally on a real Ray, until Ctrl-C.

The file is a standard Ray Serve config (format in serving/config.py); each application is
one base-model pool. Our own `args`/`user_config` are validated first so a typo fails here
with a one-line message rather than inside a replica.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import yaml

from .config import DEPLOYMENT, IMPORT_PATH, ConfigError, check_tenant_sets, parse_args, parse_tenants


def load_config(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    validate(raw, where=str(p))
    return raw


def validate(raw: dict, where: str = "config") -> None:
    from ray.serve.schema import ServeDeploySchema

    if not isinstance(raw, dict) or not raw.get("applications"):
        raise ConfigError(f"{where}: expected a Ray Serve config with a non-empty 'applications' list")
    try:
        ServeDeploySchema.model_validate(raw)
    except Exception as e:  # a pydantic error over many lines: keep it to one
        raise ConfigError(f"{where}: not a valid Ray Serve config: {' '.join(str(e).split())[:300]}") from None
    for i, app in enumerate(raw["applications"]):
        if app.get("import_path") != IMPORT_PATH:
            continue
        try:
            args = parse_args(app.get("args") or {})
            for dep in app.get("deployments") or []:
                if dep.get("name") == DEPLOYMENT:
                    parse_tenants(dep.get("user_config"), pool=args.pool)
            check_tenant_sets(app)
        except ConfigError as e:
            raise ConfigError(f"{where}: applications[{i}] ({app.get('name')}): {e}") from None


def deploy(raw: dict, host: str = "127.0.0.1", port: int = 8000) -> list[str]:
    """Start Serve on this Ray (starting a local one if needed), submit the config, return endpoints."""
    import ray
    from ray.serve._private import api as serve_private
    from ray.serve.schema import ServeDeploySchema

    if not ray.is_initialized():
        ray.init(namespace="serve", include_dashboard=False, log_to_driver=False)
    client = serve_private.serve_start(http_options={"host": host, "port": port}, proxy_location="HeadOnly")
    client.deploy_apps(ServeDeploySchema.model_validate(raw), _blocking=False)
    return [f"http://{host}:{port}{app.get('route_prefix') or '/' + app['name']}/v1" for app in raw["applications"]]


def wait_running(names: list[str], timeout: float = 600) -> None:
    """Until every application is RUNNING; a failed deploy raises with Ray's message."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: apps.get(n) for n in names}
        for n, st in states.items():
            if st is not None and st.status == "DEPLOY_FAILED":
                raise RuntimeError(f"application {n!r} failed to deploy: {st.message.strip().splitlines()[-1] if st.message else ''}")
        if all(st is not None and st.status == "RUNNING" for st in states.values()):
            return
        time.sleep(1)
    raise TimeoutError(f"applications {names} not running after {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="deltafleet serve", description="Run base-model pools locally on Ray Serve.")
    ap.add_argument("--config", required=True, help="Ray Serve config file (one application per pool)")
    ap.add_argument("--host", default="127.0.0.1", help="HTTP host (default: loopback only)")
    ap.add_argument("--port", type=int, default=8000, help="HTTP port of Ray Serve's proxy (default 8000)")
    opts = ap.parse_args(argv)
    try:
        raw = load_config(opts.config)
    except ConfigError as e:
        print(f"deltafleet serve: {e}", file=sys.stderr)
        return 2
    import ray
    from ray import serve

    endpoints = deploy(raw, opts.host, opts.port)
    try:
        wait_running([app["name"] for app in raw["applications"]])
        for app, url in zip(raw["applications"], endpoints):
            print(f"{app['name']}: {url}  (model = tenant name, or {app['name']!r} for the base)")
        print("serving; Ctrl-C to stop", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping", file=sys.stderr)
    except (RuntimeError, TimeoutError) as e:
        print(f"deltafleet serve: {e}", file=sys.stderr)
        return 1
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0
