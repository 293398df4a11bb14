"""The spread-close schedule: random moments within the window, sorted, none outside it."""

import random

import pytest

from glb.spread import close_spread, spread_delays


def test_delays_fall_inside_the_window_sorted_and_spread():
    delays = spread_delays(1000, 10.0, random.Random(7))
    assert delays == sorted(delays)
    assert all(0 <= d < 10.0 for d in delays)
    # uniform: each tenth of the window gets a tenth of the closes, give or take
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(10)]
    assert min(per_second) > 60 and max(per_second) < 140


def test_paced_delays_give_each_slot_exactly_one():
    delays = spread_delays(100, 5.0, random.Random(3), paced=True)  # a rate of 20 per second
    assert delays == sorted(delays)
    assert [int(d / 0.05) for d in delays] == list(range(100))  # one in each 1/20 s slot
    per_second = [sum(1 for d in delays if s <= d < s + 1) for s in range(5)]
    assert per_second == [20] * 5


def test_no_window_closes_at_once():
    assert spread_delays(3, 0) == [0.0, 0.0, 0.0]


class _Conn:
    def __init__(self, open_=True):
        self.open = open_
        self.closed_with = None

    def close(self, code, reason):
        self.closed_with = (code, reason)
        self.open = False


@pytest.mark.timeout(5)
def test_close_spread_closes_each_open_connection_once_and_skips_ended_ones():
    conns = [_Conn(), _Conn(open_=False), _Conn()]
    closed = close_spread(conns, 1012, "service restart", 0.05, random.Random(1),
                          is_open=lambda c: c.open)
    assert closed == 2
    assert [c.closed_with for c in conns] == [(1012, "service restart"), None, (1012, "service restart")]
