"""What one engine step computes: a pure function of the running sequences and the free KV blocks.

Every sequence is "tokens [0, n) of which the first `computed` have K/V in the cache". A step
gives each scheduled sequence a chunk of its uncomputed tokens: 1 for a decode row, up to
`max_chunk` for a prefill. A sequence whose chunk reaches its last token gets a new token
sampled from that position. Preempting a sequence frees its blocks (those another sequence
also holds, through the prefix cache, stay) and sets computed = 0;
its tokens (prompt + everything generated) are recomputed later — after the engine has taken
back whichever of its blocks the prefix cache still holds — and sampling resumes from where it
stopped: recompute, not swap (vLLM's default).

Order of service, oldest sequence first (first come, first served):
1. decode rows, one token each. When the KV cache has no block for one, the youngest sequence
   holding blocks is preempted (repeatedly) — never an older one;
2. prefill chunks with what is left of the token budget and of the free blocks, so several
   requests prefill together and decode never waits for a whole long prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SeqView:
    id: int
    n_tokens: int  # prompt + generated
    computed: int  # tokens with K/V in the cache
    n_blocks: int  # blocks held
    exclusive: int | None = None  # of those, blocks no other sequence holds (prefix cache): what preempting it frees; None: all


@dataclass
class Plan:
    chunks: dict[int, int] = field(default_factory=dict)  # sequence id -> new tokens this step (in service order)
    preempt: list[int] = field(default_factory=list)  # sequence ids whose blocks are freed first

    @property
    def tokens(self) -> int:
        return sum(self.chunks.values())


def plan_step(seqs: list[SeqView], free_blocks: int, block_size: int, token_budget: int, max_chunk: int) -> Plan:
    """seqs oldest first. Returns the chunks to compute and the sequences to preempt first."""
    plan = Plan()
    held = {s.id: s.n_blocks for s in seqs}
    free, budget = free_blocks, token_budget

    def needed(s: SeqView, n: int) -> int:
        return max(0, -(-(s.computed + n) // block_size) - held[s.id])

    def preempt_youngest(older_than: SeqView) -> bool:
        nonlocal free
        for victim in reversed(seqs):
            if victim.id == older_than.id:
                return False  # only younger sequences give way
            if held[victim.id] and victim.id not in plan.chunks and victim.id not in plan.preempt:
                plan.preempt.append(victim.id)
                free += victim.n_blocks if victim.exclusive is None else victim.exclusive
                held[victim.id] = 0
                return True
        return False

    for s in seqs:  # 1. decode rows
        if s.id in plan.preempt or not (s.computed > 0 and s.n_tokens - s.computed == 1) or budget < 1:
            continue
        while needed(s, 1) > free and preempt_youngest(s):
            pass
        if needed(s, 1) > free:
            continue  # nothing younger to take from: it waits (an older sequence holds the blocks)
        free -= needed(s, 1)
        plan.chunks[s.id] = 1
        budget -= 1
    for s in seqs:  # 2. prefill chunks
        if s.id in plan.chunks or s.id in plan.preempt or budget < 1:
            continue  # a sequence preempted this step waits for the next, so blocks do not churn
        fit = (held[s.id] + free) * block_size - s.computed  # tokens the free blocks can take
        n = min(s.n_tokens - s.computed, max_chunk, budget, fit)
        if n <= 0:
            continue
        free -= needed(s, n)
        plan.chunks[s.id] = n
        budget -= n
    return plan


# ---- admission: which queued requests get the free rows -------------------------------------------

def admission_order(waiting: list[tuple[int, object]], running: dict[object, int]) -> list[int]:
    """Queued requests (id, tenant), oldest first -> the order in which they get free batch rows.

    Fair share of rows: the next row goes to the tenant holding the fewest rows (running, plus
    those given out earlier in this order), its oldest request first; ties go to the tenant
    whose oldest request is older. A busy tenant's backlog therefore never keeps another
    tenant's request waiting for more than one free row."""
    queues: dict[object, list[int]] = {}
    age: dict[int, int] = {}
    for i, (rid, tenant) in enumerate(waiting):
        queues.setdefault(tenant, []).append(rid)
        age[rid] = i
    rows = {t: running.get(t, 0) for t in queues}
    out = []
    while queues:
        tenant = min(queues, key=lambda t: (rows[t], age[queues[t][0]]))
        out.append(queues[tenant].pop(0))
        rows[tenant] += 1
        if not queues[tenant]:
            del queues[tenant]
    return out


def blocks_to_finish(tokens: int, remaining: int, held: int, block_size: int, horizon: int) -> int:
    """Blocks a sequence may still take: its `tokens` so far plus up to `horizon` of its
    `remaining` output tokens, less the `held` ones. Admission reserves these, so sequences
    admitted together can grow without preempting each other (up to the horizon)."""
    return max(0, -(-(tokens + min(remaining, horizon)) // block_size) - held)
