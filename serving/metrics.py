"""Per-tenant Prometheus metrics through ray.serve.metrics (exported by Ray's metrics agent)."""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class PoolMetrics:
    def __init__(self, pool: str) -> None:
        tags = ("pool", "tenant")
        self.pool = pool
        self.requests = metrics.Counter("deltafleet_requests", "requests by tenant and outcome", tag_keys=(*tags, "outcome"))
        self.tokens_in = metrics.Counter("deltafleet_prompt_tokens", "prompt tokens by tenant", tag_keys=tags)
        self.tokens_out = metrics.Counter("deltafleet_completion_tokens", "generated tokens by tenant", tag_keys=tags)
        self.latency = metrics.Histogram("deltafleet_request_latency_s", "request latency (s)", boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.ttft = metrics.Histogram("deltafleet_time_to_first_token_s", "time to first token (s)", boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.bank_events = metrics.Gauge("deltafleet_bank_events", "DeltaBank counters (hits, misses, loads, evictions)", tag_keys=("pool", "event"))
        self.bank_bytes = metrics.Gauge("deltafleet_bank_bytes", "DeltaBank resident bytes by tier", tag_keys=("pool", "tier"))
        self.bank_tenants = metrics.Gauge("deltafleet_bank_tenants", "DeltaBank resident tenants by tier", tag_keys=("pool", "tier"))

    def request(self, tenant: str, outcome: str, prompt: int, completion: int, latency: float, ttft: float | None) -> None:
        tags = {"pool": self.pool, "tenant": tenant}
        self.requests.inc(1, tags={**tags, "outcome": outcome})
        if prompt:  # ray's Counter refuses 0
            self.tokens_in.inc(prompt, tags=tags)
        if completion:
            self.tokens_out.inc(completion, tags=tags)
        self.latency.observe(latency, tags=tags)
        if ttft is not None:
            self.ttft.observe(ttft, tags=tags)

    def bank(self, stats: dict) -> None:
        for event in ("device_hits", "device_misses", "cpu_hits", "disk_loads", "evictions"):
            self.bank_events.set(stats[event], tags={"pool": self.pool, "event": event})
        for tier in ("device", "cpu"):
            self.bank_bytes.set(stats[f"{tier}_bytes"], tags={"pool": self.pool, "tier": tier})
            self.bank_tenants.set(stats[f"{tier}_tenants"], tags={"pool": self.pool, "tier": tier})
        self.bank_tenants.set(len(stats["tenants"]), tags={"pool": self.pool, "tier": "registered"})
