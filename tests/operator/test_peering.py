"""The pure parts of high availability: each replica's kopf peering priority (older acts; no
two replicas share one, or kopf would pause both) and the peering settings."""

import pytest

from deltafleet.operator.handlers import peering_priority
from deltafleet.operator.settings import parse_settings

NOW = 1_796_000_000.0  # late 2026


@pytest.mark.parametrize("older, younger", [
    pytest.param((NOW, 1023), (NOW + 0.0015, 0), id="a replica started a millisecond later ranks lower whatever its random bits"),
    pytest.param((NOW, 0), (NOW + 3600, 0), id="a replica started an hour later ranks lower"),
])
def test_the_older_replica_has_the_higher_priority(older, younger):
    assert peering_priority(*older) > peering_priority(*younger)


def test_replicas_started_in_the_same_millisecond_differ_by_their_random_bits():
    assert len({peering_priority(NOW, bits) for bits in range(1024)}) == 1024


def test_priorities_are_positive_and_exact_as_json_numbers_for_centuries():
    for started in (NOW, NOW + 200 * 365 * 86400):
        assert 0 < peering_priority(started, 1023) < 2**53


def test_the_random_bits_must_fit_in_ten_bits():
    with pytest.raises(ValueError):
        peering_priority(NOW, 1024)


def test_standalone_unless_a_peering_object_is_named():
    settings, _ = parse_settings([], environ={})
    assert settings.peering == "" and settings.peering_lifetime == 10
    settings, _ = parse_settings([], environ={"DELTAFLEET_PEERING": "df-deltafleet", "DELTAFLEET_PEERING_LIFETIME": "15"})
    assert (settings.peering, settings.peering_lifetime) == ("df-deltafleet", 15)


def test_a_peering_lifetime_under_five_seconds_is_refused():
    # kopf renews a keep-alive 5-10 s before it expires (at least every second): shorter would flap
    with pytest.raises(SystemExit, match="at least 5 seconds"):
        parse_settings(["--peering", "p", "--peering-lifetime", "4"], environ={})
