"""TenantRouter: Ray Serve's request router for a pool's engine replicas (placement: routed).

Serve's default router sends a multiplexed request to a replica holding its id until those
replicas are *full* (`max_ongoing_requests`, above the engine's own queue), so a hot tenant
would queue on its one replica, and the engine's per-tenant share would refuse it, long before
Serve spread it. This router keeps Serve's ranking and mechanics (it is a `RequestRouter` with
Serve's `MultiplexMixin`; Serve probes queue lengths, retries and backs off) and changes one
thing: a replica holding the tenant counts as free only while it has fewer than `spread_at`
requests in flight (a pool sets it to its batch size). When every holder has a batch in flight,
the replicas holding the fewest tenants compete with them on load, and the least loaded takes
the request (loading the tenant): a hot tenant spreads over as many replicas as its load
needs, while a cold tenant's request finds its one holder free and never displaces others.

    deployments: [{name: DeltaServer, request_router_config: {
        request_router_class: deltafleet.serving.routing:TenantRouter, request_router_kwargs: {spread_at: 16}}}]
"""

from __future__ import annotations

import random

from ray.serve.request_router import MultiplexMixin, PendingRequest, RequestRouter, RunningReplica



class TenantRouter(MultiplexMixin, RequestRouter):
    def initialize_state(self, spread_at: int = 16) -> None:
        self.spread_at = spread_at

    def _in_flight(self, replica: RunningReplica) -> int:
        """Requests in flight on the replica, as Serve last probed it (unknown: 0, so a holder is tried first)."""
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        """Ranks of replicas to try in order; Serve sends the request to the least loaded replica
        of the first rank that has room."""
        tenant = pending_request.metadata.multiplexed_model_id if pending_request is not None else ""
        if not tenant:  # the base model: any replica, the less loaded of two (power of two choices)
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        holders, fewest, others = self.rank_replicas_via_multiplex(candidate_replicas, tenant)
        if any(self._in_flight(r) < self.spread_at for r in holders):
            return [holders, fewest, others]
        return [holders + fewest, others]  # every holder has a batch in flight: spread to the emptiest
