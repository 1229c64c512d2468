"""The Ray Serve config: a pure function of the compressed (gate-passed) FineTunes.

One application per base-model pool; the pool's tenants travel in the DeltaServer
deployment's `user_config`, so adding or removing a tenant reconfigures replicas without
restarting them. The whole multi-application config is built at once (the ray-api backend
PUTs it whole; the rayservice backend writes it whole into `serveConfigV2`), sorted so the
same FineTunes always give the same bytes and the same hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from deltafleet.operator import api
from deltafleet.operator.api import MODEL_STORE_MOUNT
from deltafleet.operator.settings import Settings
from deltafleet.serving.config import DEPLOYMENT, AppArgs, serve_application


@dataclass(frozen=True)
class Tenant:
    """What one compressed FineTune contributes to its pool."""

    namespace: str
    name: str
    model: str  # the tenant's name in the pool = the `model` of an OpenAI request
    pool: str
    base_model: str
    uri: str
    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float | None = None  # None: TARGET_PER_BATCH x the pool's batch size
    gpus_per_replica: float = 1
    created: str = ""  # creationTimestamp: the oldest FineTune of a pool decides its base
    key_sha256: tuple[str, ...] = ()  # digests of the API keys that may call it (never the keys)

    @property
    def key(self) -> str:
        return self.model

    @property
    def object_key(self) -> str:
        """The FineTune it comes from."""
        return f"{self.namespace}/{self.name}"


def split_pools(tenants: list[Tenant]) -> tuple[dict[str, list[Tenant]], dict[str, str]]:
    """Group tenants by pool. The oldest FineTune of a pool decides its base and a model name
    belongs to the oldest FineTune that claims it; the others come back as conflicts
    ({object_key: why}), never silently served on the wrong base or under another's name."""
    pools: dict[str, list[Tenant]] = {}
    for t in sorted(tenants, key=lambda t: (t.pool, t.created, t.namespace, t.name)):
        pools.setdefault(t.pool, []).append(t)
    conflicts: dict[str, str] = {}
    for pool, members in pools.items():
        base, kept, names = members[0].base_model, [], {}
        for t in members:
            if t.base_model != base:
                conflicts[t.object_key] = f"pool {pool!r} serves base {base!r}, this FineTune names {t.base_model!r}"
            elif t.model in names:
                conflicts[t.object_key] = f"model name {t.model!r} is already served in pool {pool!r} by {names[t.model]}"
            else:
                names[t.model] = t.object_key
                kept.append(t)
        pools[pool] = sorted(kept, key=lambda t: t.key)
    return pools, conflicts


# A replica decodes max_batch_size sequences per step. Autoscaling aims at 1.5 batches per
# replica (the batch stays full, a little queue hides admission). A replica accepts its batch,
# its engine's whole queue (AppArgs.max_queue) and one batch more (requests being tokenized or
# answered): so the engine's own limits answer first — a 429 in OpenAI's shape with
# Retry-After, a tenant's fair share of the queue — and Ray Serve's router queue (eight
# batches, then Serve's own plain-text 503) is only a safety net behind them.
TARGET_PER_BATCH, ONGOING_EXTRA_BATCHES, QUEUED_PER_BATCH = 1.5, 2, 8


def max_ongoing(max_batch_size: int, target: float) -> int:
    """Requests one replica accepts: more than its engine can run and queue, so the engine refuses first."""
    return max(ONGOING_EXTRA_BATCHES * max_batch_size + AppArgs.model_fields["max_queue"].default, math.ceil(target))


def build_application(pool: str, tenants: list[Tenant], settings: Settings) -> dict:
    """One pool's application. Replica bounds: the largest minimum, maximum and GPU share any
    tenant asks for, and the smallest target load (the most latency-sensitive tenant wins)."""
    min_replicas = max(t.min_replicas for t in tenants)
    max_replicas = max(max(t.max_replicas for t in tenants), min_replicas, 1)
    asked = [t.target_ongoing_requests for t in tenants if t.target_ongoing_requests is not None]
    target = min(asked) if asked else TARGET_PER_BATCH * settings.max_batch_size
    gpus = max(t.gpus_per_replica for t in tenants)
    # Built through the contract's own builder and models, so the operator cannot write what replicas refuse.
    args = AppArgs(
        pool=pool, base_model=tenants[0].base_model, device=settings.device, dtype=settings.dtype,
        max_batch_size=settings.max_batch_size, store_root=settings.replica_store_path, auth=settings.serve_auth,
        # only when off: the default leaves existing pools' configs (and hashes) as they were
        **({"prefix_caching": False} if settings.serve_prefix_caching == "off" else {}),
        **({"placement": settings.serve_placement} if settings.serve_placement != "routed" else {}),
        **({"max_tenants_per_replica": settings.serve_max_tenants_per_replica} if settings.serve_max_tenants_per_replica else {}),
    )
    return serve_application(
        args,
        {"tenants": {t.key: {"uri": t.uri, "key_sha256": list(t.key_sha256)}
                     for t in sorted(tenants, key=lambda t: t.key)}},
        autoscaling_config={"min_replicas": min_replicas, "max_replicas": max_replicas,
                            "target_ongoing_requests": target},
        max_ongoing_requests=max_ongoing(settings.max_batch_size, target),
        max_queued_requests=QUEUED_PER_BATCH * settings.max_batch_size,
        ray_actor_options={"num_gpus": gpus, "num_cpus": settings.replica_cpus},
    )


def build_serve_config(tenants: list[Tenant], settings: Settings) -> dict:
    """The whole multi-application config for every pool, sorted by pool name."""
    pools, _ = split_pools(tenants)
    return {"applications": [build_application(pool, members, settings) for pool, members in sorted(pools.items()) if members]}


def config_hash(config: dict) -> str:
    """Hash of the canonical JSON form: equal configs hash equal whatever the dict order."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def tenants_of_application(app: dict) -> dict[str, dict]:
    """The tenant map inside one application of a serve config (what was applied)."""
    for dep in app.get("deployments") or []:
        if dep.get("name") == DEPLOYMENT:
            return ((dep.get("user_config") or {}).get("tenants")) or {}
    return {}


def replica_path(path_in_job: str, settings: Settings) -> str:
    """A /models/... path as the serving replicas see it (the store may be mounted elsewhere)."""
    if path_in_job == MODEL_STORE_MOUNT or path_in_job.startswith(MODEL_STORE_MOUNT + "/"):
        return settings.replica_store_path + path_in_job[len(MODEL_STORE_MOUNT):]
    return path_in_job


def replica_uri(uri: str, settings: Settings) -> str:
    prefix = "file://"
    if uri.startswith(prefix):
        return prefix + replica_path(uri[len(prefix):], settings)
    return replica_path(uri, settings)


def tenant_of(ft: api.FineTune, created: str, settings: Settings, key_sha256: tuple[str, ...] = ()) -> Tenant:
    """The tenant a gate-passed FineTune adds to its pool (the caller decides eligibility)."""
    assert ft.status.delta is not None, "tenant_of needs a compressed FineTune"
    serving = ft.spec.serving
    return Tenant(
        namespace=ft.metadata.namespace or "",
        name=ft.metadata.name,
        model=ft.model_name(),
        pool=ft.pool(),
        # The base the delta was made against, as the Job stored it; else the spec's reference.
        base_model=replica_path(ft.status.delta.base_snapshot or ft.spec.base_model.reference(), settings),
        uri=replica_uri(ft.status.delta.uri, settings),
        min_replicas=serving.min_replicas,
        max_replicas=serving.max_replicas,
        target_ongoing_requests=serving.target_ongoing_requests,
        gpus_per_replica=serving.gpus_per_replica,
        created=created,
        key_sha256=tuple(sorted(key_sha256)),
    )
