"""Conditions: set_condition, transitions, the Ready and phase reducers (pure)."""

import pytest

from deltafleet.operator import conditions as c
from deltafleet.operator.conditions import COMPRESSED, FALSE, READY, SERVED, TRUE, Reason


def test_set_condition_keeps_transition_time_unless_status_changes():
    conds, t = c.set_condition([], COMPRESSED, FALSE, Reason.JOB_CREATED, "job", 1, now="T1")
    assert t and t.status == FALSE and conds[0]["lastTransitionTime"] == "T1"
    conds2, t2 = c.set_condition(conds, COMPRESSED, FALSE, Reason.JOB_CREATED, "job again", 2, now="T2")
    assert t2 is None and conds2[0]["lastTransitionTime"] == "T1" and conds2[0]["observedGeneration"] == 2
    conds3, t3 = c.set_condition(conds2, COMPRESSED, FALSE, Reason.JOB_FAILED_RETRYING, "boom", 2, now="T3")
    assert t3 and t3.event_type == "Warning" and conds3[0]["lastTransitionTime"] == "T1"
    conds4, t4 = c.set_condition(conds3, COMPRESSED, TRUE, Reason.DELTA_READY, "ok", 2, now="T4")
    assert t4.event_type == "Normal" and conds4[0]["lastTransitionTime"] == "T4"
    assert conds3[0]["reason"] == Reason.JOB_FAILED_RETRYING  # input untouched


def test_set_condition_rejects_unknown_type_and_status():
    with pytest.raises(ValueError, match="unknown condition type"):
        c.set_condition([], "Bogus", TRUE, "X", "", 1)
    with pytest.raises(ValueError, match="status must be"):
        c.set_condition([], READY, "yes", "X", "", 1)


def test_ready_is_compressed_and_served_for_this_generation():
    conds, _ = c.set_condition([], COMPRESSED, TRUE, Reason.DELTA_READY, "ok", 2)
    ready, _ = c.reduce_ready(conds, 2)
    assert c.get_condition(ready, READY)["reason"] == Reason.NOT_SERVED
    conds, _ = c.set_condition(conds, SERVED, TRUE, Reason.APPLICATION_RUNNING, "up", 2)
    ready, t = c.reduce_ready(conds, 2)
    assert c.is_true(ready, READY) and t.reason == Reason.READY
    stale, _ = c.reduce_ready(conds, 3)  # a newer spec nobody has looked at yet
    assert not c.is_true(stale, READY)
    assert [x["type"] for x in ready] == [COMPRESSED, SERVED, READY]


@pytest.mark.parametrize("reason,status,served,phase", [
    (None, None, False, "Pending"),
    (Reason.JOB_CREATED, FALSE, False, "Compressing"),
    (Reason.JOB_FAILED_RETRYING, FALSE, False, "Retrying"),
    (Reason.BACKOFF_LIMIT_EXCEEDED, FALSE, False, "Failed"),
    (Reason.INVALID_SPEC, FALSE, False, "Failed"),
    (Reason.FIDELITY_BELOW_THRESHOLD, FALSE, False, "Rejected"),
    (Reason.DELTA_READY, TRUE, False, "Deploying"),
    (Reason.DELTA_READY, TRUE, True, "Serving"),
])
def test_phase(reason, status, served, phase):
    conds = []
    if reason:
        conds, _ = c.set_condition(conds, COMPRESSED, status, reason, "", 1)
    if served:
        conds, _ = c.set_condition(conds, SERVED, TRUE, Reason.APPLICATION_RUNNING, "", 1)
    assert c.reduce_phase(conds) == phase
    assert c.reduce_phase(conds, deleting=True) == "Deleting"


def test_transitions_only_for_changes():
    old, _ = c.set_condition([], COMPRESSED, FALSE, Reason.JOB_CREATED, "a", 1)
    same, _ = c.set_condition(old, COMPRESSED, FALSE, Reason.JOB_CREATED, "b", 1)
    assert c.transitions(old, same) == []
    new, _ = c.set_condition(same, SERVED, FALSE, Reason.WAITING_FOR_DELTA, "w", 1)
    assert [t.type for t in c.transitions(old, new)] == [SERVED]


def test_reasons_are_camel_case():
    import re
    values = [v for k, v in vars(Reason).items() if k.isupper()]
    assert values and all(re.fullmatch(r"[A-Z][A-Za-z]+", v) for v in values)
