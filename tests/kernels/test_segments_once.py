"""The prefill/large-batch path's segment metadata is built once per step, not once per linear
(issue: GPU figures on the first try, point 3: ~45 kernels x ~225 linears per 7B step)."""

from __future__ import annotations

import torch

from deltafleet.kernels import segments


def test_the_linears_of_one_step_share_one_fill(monkeypatch):
    fills = []
    real = segments.SegmentMeta.fill
    monkeypatch.setattr(segments.SegmentMeta, "fill", lambda self, rows: fills.append(1) or real(self, rows))
    segments.forget_fills()
    rows = torch.tensor([0, 2, -1, 2, 1] * 8)  # 40 rows: the prefill path's size
    first = segments.segment_meta(rows, 3, 16)
    for _ in range(224):  # the other linears of the step
        assert segments.segment_meta(rows, 3, 16) is first
    assert len(fills) == 1
    rows[0] = 1  # refilled in place (a tensor with a version): rebuilt
    assert torch.equal(segments.segment_meta(rows, 3, 16).order, torch.sort(rows, stable=True).indices.int())
    assert len(fills) == 2
    segments.segment_meta(rows.clone(), 3, 16)  # another tensor, even with equal values: rebuilt
    assert len(fills) == 3


def test_a_new_step_forgets_even_an_inference_tensor_changed_in_place(monkeypatch):
    fills = []
    real = segments.SegmentMeta.fill
    monkeypatch.setattr(segments.SegmentMeta, "fill", lambda self, rows: fills.append(1) or real(self, rows))
    with torch.inference_mode():
        rows = torch.tensor([0, 1] * 20)  # keeps no version counter
        segments.forget_fills()
        segments.segment_meta(rows, 2, 16)
        rows.copy_(torch.tensor([1, 0] * 20))  # the next step's slots, written into the same buffer
        segments.forget_fills()  # what BatchContext.set/set_packed/set_static do at every step
        meta = segments.segment_meta(rows, 2, 16)
    assert len(fills) == 2
    assert torch.equal(meta.order, torch.sort(rows, stable=True).indices.int())
