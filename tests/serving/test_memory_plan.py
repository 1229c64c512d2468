"""GPU memory planned, not taken (issue: the engine under pressure, point 6): the KV cache is
sized after the bank's whole declared budget — its slot stacks' tables included, which fill
lazily — and a slot stack on a GPU is allocated once, in full, so growing never needs old + new."""

from __future__ import annotations

import torch

from deltafleet.serving.engine import KV_SHARE, kv_budget
from deltafleet.serving.slot_stack import SlotStack

GiB = 1 << 30


def test_a_full_slot_stack_allocates_every_entry_once_and_never_moves():
    stack = SlotStack({"weight": ((4, 8), torch.float16)}, n_slots=6, device=torch.device("cpu"), grow="full")
    assert stack.unallocated_bytes() == 6 * 4 * 8 * 2
    stack.put(0, {"weight": torch.ones(4, 8)})
    ptr = stack.entries["weight"].data_ptr()
    assert stack.capacity == 6 and stack.unallocated_bytes() == 0
    for slot in range(1, 6):
        stack.put(slot, {"weight": torch.full((4, 8), float(slot))})
    assert stack.entries["weight"].data_ptr() == ptr  # no growth step, no transient copy
    assert torch.equal(stack.entries["weight"][stack.entry_of_slot[4 + 1]], torch.full((4, 8), 4.0, dtype=torch.float16))


def test_a_doubling_slot_stack_follows_its_tenants():
    stack = SlotStack({"weight": ((2,), torch.float32)}, n_slots=8, device=torch.device("cpu"))
    caps = []
    for slot in range(5):
        stack.put(slot, {"weight": torch.ones(2)})
        caps.append(stack.capacity)
    assert caps == [1, 2, 4, 4, 8]


def test_the_kv_plan_at_7b_leaves_room_for_every_table_the_bank_may_hold():
    """Llama-2-7B in fp16 on an 80 GiB GPU, a 16 GiB bank: the plan reserves every slot's
    embedding table, lm_head and 1-bit embedding before the KV cache takes its share."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from deltafleet.serving.bank import DeltaBank
    from deltafleet.serving.layers import BatchContext, patch_model, small_param_modules

    cfg = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16)
    ctx = BatchContext(bank=None)
    linears = patch_model(model, ctx, set(small_param_modules(model)))
    bank = DeltaBank(model, linears, "fp", torch.device("meta"), torch.float16, 16 * GiB, 64 * GiB)
    try:
        table = 32000 * 4096 * 2  # one fp16 embedding table or lm_head: 262 MB
        one_bit_embedding = 32000 * (4096 // 32 * 4 + 4)
        assert bank.n_slots == 12  # 16 GiB // (0.81 GB of 1-bit linears + 0.54 GB of tables and rows)
        assert bank.unallocated_bytes() == bank.n_slots * (2 * table + one_bit_embedding)  # 5.9 GB
        base = sum(p.numel() for p in model.parameters()) * 2
        stacks = bank.n_slots * bank.slot_bytes
        free = 80 * GiB - base - stacks  # what mem_get_info reports when the engine sizes its KV cache
        kv = kv_budget(free, bank.unallocated_bytes())
        left = free - kv - bank.unallocated_bytes()  # once every slot holds its tables: activations
        assert left >= (1 - KV_SHARE) * (free - bank.unallocated_bytes()) > 8 * GiB
        # before: 80% of `free`, and the stacks' last doubling (8 -> 12 entries) held the old 8 too
        old_kv = int(free * 0.8)
        transient = 8 * (2 * table + one_bit_embedding)
        assert free - old_kv - bank.unallocated_bytes() - transient < 2 * GiB
    finally:
        bank.close()
