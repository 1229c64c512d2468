"""TenantRouter's ranking (pure logic over Serve's own MultiplexMixin ranking): a tenant's
holders first while one of them has room below a batch; then the emptiest replicas compete
with them, so a hot tenant spreads and a cold one stays. The routing on real Serve:
tests/serving/test_placement.py."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")
from deltafleet.serving.config import ROUTER_CLASS  # noqa: E402
from deltafleet.serving.routing import TenantRouter  # noqa: E402


def _router(held: dict[str, set[str]], in_flight: dict[str, int], spread_at: int = 16) -> TenantRouter:
    """A router over replicas r -> the tenants each holds, with Serve's queue-length cache."""
    router = TenantRouter.__new__(TenantRouter)  # Serve builds it with a deployment; the ranking needs only this
    router.initialize_state(spread_at=spread_at)
    router._replicas = {r: SimpleNamespace(replica_id=r, multiplexed_model_ids=ids) for r, ids in held.items()}
    by_tenant = defaultdict(set)
    for r, ids in held.items():
        for t in ids:
            by_tenant[t].add(r)
    router._multiplexed_model_id_to_replica_ids = by_tenant
    router._replica_queue_len_cache = SimpleNamespace(get=in_flight.get)
    return router


def _ranks(router: TenantRouter, tenant: str) -> list[list[str]]:
    request = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=tenant))
    ranks = asyncio.run(router.choose_replicas(list(router._replicas.values()), request))
    return [sorted(r.replica_id for r in rank) for rank in ranks]


HELD = {"r1": {"hot", "a"}, "r2": {"b", "c"}, "r3": set()}

CASES = [
    ("a tenant goes to its holder while the holder has room below a batch", "a", {"r1": 3}, [["r1"], ["r3"], ["r2"]]),
    ("a holder not probed yet counts as free", "a", {}, [["r1"], ["r3"], ["r2"]]),
    ("a hot tenant whose holders each have a batch in flight spreads to the emptiest replica too", "hot", {"r1": 16},
     [["r1", "r3"], ["r2"]]),
    ("a tenant no replica holds goes to the replica holding the fewest", "new", {"r1": 0}, [["r3"], ["r1", "r2"]]),
]


@pytest.mark.parametrize("sentence,tenant,in_flight,want", CASES, ids=[c[0] for c in CASES])
def test_ranking(sentence, tenant, in_flight, want):
    assert _ranks(_router(HELD, in_flight), tenant) == want


def test_the_base_model_goes_to_the_less_loaded_of_two_replicas():
    router = _router(HELD, {})
    request = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=""))
    [rank] = asyncio.run(router.choose_replicas(list(router._replicas.values()), request))
    assert len(rank) == 2 and len({r.replica_id for r in rank}) == 2


def test_the_serve_config_names_this_class():
    module, _, name = ROUTER_CLASS.partition(":")
    assert (module, name) == (TenantRouter.__module__, TenantRouter.__qualname__)
