"""`deltafleet operator`: run the kopf operator (what the chart's Deployment runs).

    deltafleet operator --serve-backend ray-api --ray-dashboard-url http://127.0.0.1:8265 -n team-a
    deltafleet operator --check      # API server, CRD and serve backend reachable? then exit

Every flag has an env var, DELTAFLEET_ and the flag's name (see --help), which is how the
chart configures it. Liveness: http://0.0.0.0:<--liveness-port>/healthz (kopf's probe).
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from deltafleet.operator.settings import Settings, parse_settings

if TYPE_CHECKING:
    from deltafleet.operator.backend import Backend


def load_kube_config():
    """In-cluster when running in a pod, else KUBECONFIG / ~/.kube/config."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def make_backend(settings: Settings, api_client=None) -> Backend:
    """The serve backend the settings name (here, not in backend.py, which the backends import)."""
    if settings.backend == "rayservice":
        from deltafleet.operator.backend_rayservice import RayServiceBackend

        return RayServiceBackend(settings.rayservice_namespace, settings.rayservice_name, api_client)
    if settings.backend == "ray-api":
        from deltafleet.operator.backend_rayapi import RayApiBackend

        return RayApiBackend(settings.ray_dashboard_url, token_file=settings.ray_auth_token_file)
    raise ValueError(f"unknown serve backend {settings.backend!r}")


def check(settings: Settings) -> int:
    """One-shot: can this operator list FineTunes and reach its serve backend?"""
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    from deltafleet.operator import api
    from deltafleet.operator.backend import BackendError

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


PEERING_GROUP, PEERING_VERSION = "kopf.dev", "v1"


def peer_identity() -> str:
    """This replica's name in the peering object: the pod's name (POD_ID, as kopf reads it),
    else host, process and a random suffix (several local processes on one host)."""
    import os
    import random
    import socket

    return os.environ.get("POD_ID") or f"{socket.gethostname()}/{os.getpid()}/{random.randrange(16**6):06x}"


def announce_peer(api_client, settings: Settings, identity: str, priority: int) -> None:
    """Write this replica's keep-alive into the peering object(s) before kopf starts.

    kopf writes its first keep-alive and lists the peering object concurrently, so two
    replicas starting together could each list before the other wrote and both act until
    the next watch event (measured: 1 start in 4 had both reconciling for about a second).
    Written first, the older replica (priority by start time) is in the object before the
    younger one's first listing, so the younger one starts paused. kopf then keeps the same
    entry (same identity) alive."""
    import datetime

    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    custom = client.CustomObjectsApi(api_client)
    body = {"status": {identity: {"priority": priority, "lifetime": settings.peering_lifetime,
                                  "lastseen": datetime.datetime.now(datetime.UTC).isoformat()}}}
    merge = "application/merge-patch+json"
    for ns in settings.namespaces or (None,):
        try:
            if ns is None:
                custom.patch_cluster_custom_object(PEERING_GROUP, PEERING_VERSION, "clusterkopfpeerings",
                                                   settings.peering, body, _content_type=merge)
            else:
                custom.patch_namespaced_custom_object(PEERING_GROUP, PEERING_VERSION, ns, "kopfpeerings",
                                                      settings.peering, body, _content_type=merge)
        except ApiException as e:  # kopf stays paused without its peering object: say why
            logging.getLogger("deltafleet.operator").warning(
                "cannot write the keep-alive into peering %r in %s: HTTP %s %s (this replica stays paused "
                "until the peering object exists and is writable)", settings.peering, ns or "the cluster", e.status, e.reason)


def main(argv: list[str]) -> int:
    settings, args = parse_settings(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, settings.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.check:
        return check(settings)

    import kopf

    from deltafleet.operator.controller import Controller
    from deltafleet.operator.handlers import peering_priority, register

    api_client = load_kube_config()
    ctl = Controller(settings, make_backend(settings, api_client), api_client)
    registry = kopf.OperatorRegistry()
    register(registry, ctl)
    from deltafleet.operator import metrics

    metrics.serve(settings.metrics_port)
    peering = {"standalone": True}  # one replica; no peering objects needed
    if settings.peering:
        # Several replicas: kopf peering (mandatory: without the peering object this replica
        # stays paused rather than act beside another). The oldest live replica acts.
        import random
        import time

        identity, priority = peer_identity(), peering_priority(time.time(), random.randrange(1024))
        announce_peer(api_client, settings, identity, priority)
        logging.getLogger("deltafleet.operator").info(
            "peering %r as %s with priority %d (lifetime %d s)", settings.peering, identity, priority, settings.peering_lifetime)
        peering = {"peering_name": settings.peering, "priority": priority, "identity": identity}
    kopf.run(
        registry=registry,
        clusterwide=not settings.namespaces,
        namespaces=list(settings.namespaces),
        liveness_endpoint=f"http://0.0.0.0:{settings.liveness_port}/healthz",
        **peering,
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))
