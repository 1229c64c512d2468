"""SlotPool: per-slot copies of large tensors, only for the slots that have them."""

from __future__ import annotations

import torch

from deltafleet.serving.slot_pool import SlotPool


def _pool(n_slots: int = 8) -> SlotPool:
    return SlotPool({"weight": ((3, 4), torch.float32)}, n_slots, torch.device("cpu"))


def _w(v: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((3, 4), v)}


def _of(pool: SlotPool, slot: int) -> torch.Tensor:
    return pool.entries["weight"][int(pool.entry_of_slot[slot + 1])]


def test_an_empty_pool_holds_no_memory_and_maps_every_row_to_the_base():
    pool = _pool()
    assert pool.nbytes() == 0 and pool.capacity == 0
    assert pool.entry_of_slot.tolist() == [-1] * 9
    assert not pool.in_batch([0, 1, 2])


def test_the_pool_grows_by_doubling_with_the_slots_that_use_it_and_keeps_earlier_entries():
    pool = _pool(n_slots=8)
    for i, slot in enumerate([5, 2, 7]):
        pool.put(slot, _w(float(i + 1)))
    assert pool.capacity == 4  # 1 -> 2 -> 4
    assert [float(_of(pool, s)[0, 0]) for s in (5, 2, 7)] == [1.0, 2.0, 3.0]
    assert pool.slots == {5, 2, 7} and pool.in_batch([0, 7]) and not pool.in_batch([0, 1])
    assert int(pool.entry_of_slot[0]) == -1  # row 0 is the base's


def test_the_pool_never_grows_past_the_bank_slot_count():
    pool = _pool(n_slots=3)
    for slot in range(3):
        pool.put(slot, _w(float(slot)))
    assert pool.capacity == 3


def test_a_dropped_slot_frees_its_entry_for_the_next_tenant():
    pool = _pool()
    pool.put(0, _w(1.0))
    pool.put(1, _w(2.0))
    pool.drop(0)
    assert int(pool.entry_of_slot[1]) == -1 and pool.slots == {1}
    pool.put(3, _w(4.0))
    assert pool.capacity == 2 and float(_of(pool, 3)[0, 0]) == 4.0 and float(_of(pool, 1)[0, 0]) == 2.0


def test_refilling_a_slot_replaces_its_entry_instead_of_taking_a_second_one():
    pool = _pool()
    pool.put(0, _w(1.0))
    pool.put(0, _w(9.0))
    assert pool.slot_of_entry.count(0) == 1 and float(_of(pool, 0)[0, 0]) == 9.0


def test_a_slot_dropped_while_its_bytes_are_copied_is_never_pointed_at():
    pool = _pool()

    class DropsDuringCopy:  # stands in for the bank freeing the slot on another thread mid-copy
        def expand(self, shape):
            pool.drop(4)
            return torch.ones(shape)

    pool.put(4, {"weight": DropsDuringCopy()})
    assert int(pool.entry_of_slot[5]) == -1 and 4 not in pool.slots
    assert None in pool.slot_of_entry  # the reserved entry is free again
