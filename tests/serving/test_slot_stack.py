"""SlotStack: per-slot copies of large tensors, only for the slots that have them."""

from __future__ import annotations

import torch

from deltafleet.serving.slot_stack import SlotStack


def _stack(n_slots: int = 8) -> SlotStack:
    return SlotStack({"weight": ((3, 4), torch.float32)}, n_slots, torch.device("cpu"))


def _w(v: float) -> dict[str, torch.Tensor]:
    return {"weight": torch.full((3, 4), v)}


def _of(stack: SlotStack, slot: int) -> torch.Tensor:
    return stack.entries["weight"][int(stack.entry_of_slot[slot + 1])]


def test_an_empty_stack_holds_no_memory_and_maps_every_row_to_the_base():
    stack = _stack()
    assert stack.nbytes() == 0 and stack.capacity == 0
    assert stack.entry_of_slot.tolist() == [-1] * 9
    assert not stack.in_batch([0, 1, 2])


def test_the_stack_grows_by_doubling_with_the_slots_that_use_it_and_keeps_earlier_entries():
    stack = _stack(n_slots=8)
    for i, slot in enumerate([5, 2, 7]):
        stack.put(slot, _w(float(i + 1)))
    assert stack.capacity == 4  # 1 -> 2 -> 4
    assert [float(_of(stack, s)[0, 0]) for s in (5, 2, 7)] == [1.0, 2.0, 3.0]
    assert stack.slots == {5, 2, 7} and stack.in_batch([0, 7]) and not stack.in_batch([0, 1])
    assert int(stack.entry_of_slot[0]) == -1  # row 0 is the base's


def test_the_stack_never_grows_past_the_bank_slot_count():
    stack = _stack(n_slots=3)
    for slot in range(3):
        stack.put(slot, _w(float(slot)))
    assert stack.capacity == 3


def test_a_dropped_slot_frees_its_entry_for_the_next_tenant():
    stack = _stack()
    stack.put(0, _w(1.0))
    stack.put(1, _w(2.0))
    stack.drop(0)
    assert int(stack.entry_of_slot[1]) == -1 and stack.slots == {1}
    stack.put(3, _w(4.0))
    assert stack.capacity == 2 and float(_of(stack, 3)[0, 0]) == 4.0 and float(_of(stack, 1)[0, 0]) == 2.0


def test_refilling_a_slot_replaces_its_entry_instead_of_taking_a_second_one():
    stack = _stack()
    stack.put(0, _w(1.0))
    stack.put(0, _w(9.0))
    assert stack.slot_of_entry.count(0) == 1 and float(_of(stack, 0)[0, 0]) == 9.0


def test_a_slot_dropped_while_its_bytes_are_copied_is_never_pointed_at():
    stack = _stack()

    class DropsDuringCopy:  # stands in for the bank freeing the slot on another thread mid-copy
        def expand(self, shape):
            stack.drop(4)
            return torch.ones(shape)

    stack.put(4, {"weight": DropsDuringCopy()})
    assert int(stack.entry_of_slot[5]) == -1 and 4 not in stack.slots
    assert None in stack.slot_of_entry  # the reserved entry is free again
