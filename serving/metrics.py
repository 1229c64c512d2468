"""Per-tenant Prometheus metrics through ray.serve.metrics (exported by Ray's metrics agent)."""

from __future__ import annotations

from ray.serve import metrics

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
STEP_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1, 2.5]
COUNT_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]


class PoolMetrics:
    def __init__(self, pool: str) -> None:
        tags = ("pool", "tenant")
        self.pool = pool
        self.requests = metrics.Counter("deltafleet_requests", "requests by tenant and outcome", tag_keys=(*tags, "outcome"))
        self.tokens_in = metrics.Counter("deltafleet_prompt_tokens", "prompt tokens by tenant", tag_keys=tags)
        self.tokens_out = metrics.Counter("deltafleet_completion_tokens", "generated tokens by tenant", tag_keys=tags)
        self.latency = metrics.Histogram("deltafleet_request_latency_s", "request latency (s)", boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.ttft = metrics.Histogram("deltafleet_time_to_first_token_s", "time to first token (s)", boundaries=LATENCY_BUCKETS, tag_keys=tags)
        self.itl = metrics.Histogram("deltafleet_inter_token_latency_s", "mean time between tokens of a request (s)",
                                     boundaries=STEP_BUCKETS, tag_keys=tags)
        pool_tag = ("pool",)
        self.step_time = metrics.Histogram("deltafleet_step_seconds", "engine step time (s)", boundaries=STEP_BUCKETS, tag_keys=pool_tag)
        self.step_rows = metrics.Histogram("deltafleet_step_sequences", "sequences per engine step", boundaries=COUNT_BUCKETS, tag_keys=pool_tag)
        self.step_tenants = metrics.Histogram("deltafleet_step_tenants", "distinct tenants per engine step", boundaries=COUNT_BUCKETS, tag_keys=pool_tag)
        self.step_prefill = metrics.Histogram("deltafleet_step_prefill_tokens", "prefill tokens per engine step", boundaries=COUNT_BUCKETS, tag_keys=pool_tag)
        self.kv_blocks = metrics.Gauge("deltafleet_kv_blocks", "KV cache blocks by state: used (held by requests), free "
                                       "(of which some cached), cached (in the prefix cache)", tag_keys=("pool", "state"))
        self.prefix_cached = metrics.Counter("deltafleet_prefix_cached_tokens", "prompt tokens taken from the prefix cache "
                                             "instead of computed", tag_keys=pool_tag)
        self.bank_events = metrics.Gauge("deltafleet_bank_events", "DeltaBank counters (hits, misses, loads, evictions)", tag_keys=("pool", "event"))
        self.bank_bytes = metrics.Gauge("deltafleet_bank_bytes", "DeltaBank resident bytes by tier", tag_keys=("pool", "tier"))
        self.bank_tenants = metrics.Gauge("deltafleet_bank_tenants", "DeltaBank resident tenants by tier", tag_keys=("pool", "tier"))

    def step(self, st) -> None:
        """One engine step (serving.engine.StepStats); called on the decode thread."""
        tags = {"pool": self.pool}
        self.step_time.observe(st.seconds, tags=tags)
        self.step_rows.observe(st.sequences, tags=tags)
        self.step_tenants.observe(st.tenants, tags=tags)
        self.step_prefill.observe(st.prefill_tokens, tags=tags)
        self.kv_blocks.set(st.kv_blocks_used, tags={**tags, "state": "used"})
        self.kv_blocks.set(st.kv_blocks_free, tags={**tags, "state": "free"})
        self.kv_blocks.set(st.kv_blocks_cached, tags={**tags, "state": "cached"})
        if st.prefix_cached_tokens:  # ray's Counter refuses 0
            self.prefix_cached.inc(st.prefix_cached_tokens, tags=tags)

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
            if completion > 1:
                self.itl.observe((latency - ttft) / (completion - 1), tags=tags)

    def bank(self, stats: dict) -> None:
        for event in ("device_hits", "device_misses", "cpu_hits", "disk_loads", "evictions"):
            self.bank_events.set(stats[event], tags={"pool": self.pool, "event": event})
        for tier in ("device", "cpu"):
            self.bank_bytes.set(stats[f"{tier}_bytes"], tags={"pool": self.pool, "tier": tier})
            self.bank_tenants.set(stats[f"{tier}_tenants"], tags={"pool": self.pool, "tier": tier})
        self.bank_tenants.set(len(stats["tenants"]), tags={"pool": self.pool, "tier": "registered"})
