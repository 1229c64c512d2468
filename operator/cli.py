"""`deltafleet operator`: run the kopf operator (what the chart's Deployment runs).

    deltafleet operator --backend ray-api --ray-dashboard-url http://127.0.0.1:8265 -n team-a
    deltafleet operator --check      # API server, CRD and serve backend reachable? then exit

Every flag has an env var (see --help), which is how the chart configures it. Liveness:
http://0.0.0.0:<--liveness-port>/healthz (kopf's probe).
"""

from __future__ import annotations

import logging
import sys

from deltafleet.operator.settings import Settings, parse_settings


def load_kube_config():
    """In-cluster when running in a pod, else KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def check(settings: Settings) -> int:
    """One-shot: can this operator list FineTunes and reach its serve backend?"""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from deltafleet.operator import api
    from deltafleet.operator.backend import BackendError, make_backend

    ok = True
    try:
        api_client = load_kube_config()
        version = client.VersionApi(api_client).get_code()
        print(f"ok   API server {api_client.configuration.host} (Kubernetes {version.git_version})")
        custom = client.CustomObjectsApi(api_client)
        for ns in settings.namespaces or (None,):
            if ns is None:
                custom.list_cluster_custom_object(api.GROUP, api.VERSION, api.PLURAL, limit=1)
            else:
                custom.list_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, limit=1)
            print(f"ok   list {api.PLURAL}.{api.GROUP} in {ns or 'all namespaces'}")
    except ApiException as e:
        print(f"FAIL Kubernetes API: HTTP {e.status} {e.reason}")
        return 1
    except Exception as e:  # noqa: BLE001 -- a check reports, it does not crash
        print(f"FAIL Kubernetes API: {getattr(e, 'reason', None) or e}")
        return 1
    try:
        apps = make_backend(settings, api_client).statuses()
        print(f"ok   serve backend {settings.backend}: {len(apps)} application(s)")
    except BackendError as e:
        print(f"FAIL serve backend {settings.backend}: {e}")
        ok = False
    return 0 if ok else 1


def main(argv: list[str]) -> int:
    settings, args = parse_settings(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.check:
        return check(settings)

    import kopf

    from deltafleet.operator.backend import make_backend
    from deltafleet.operator.controller import Controller
    from deltafleet.operator.handlers import register

    api_client = load_kube_config()
    ctl = Controller(settings, make_backend(settings, api_client), api_client)
    registry = kopf.OperatorRegistry()
    register(registry, ctl)
    from deltafleet.operator import metrics

    metrics.serve(settings.metrics_port)
    kopf.run(
        registry=registry,
        standalone=True,  # one replica (the chart's); no peering CRDs needed
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz",
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
