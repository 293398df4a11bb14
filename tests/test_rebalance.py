"""Rebalancing: the share computation without sockets, then real backends and reconnecting clients."""

import contextlib

import pytest
import requests

from glb.demo_backend import DemoBackend
from glb.rebalance import choose_sessions, next_eligible, plan_moves
from tests.fleet import Fleet, demo_pool
from tests.support import base_url, Recorder, running_glb, scrape, value

# -- plan_moves: how many sessions leave each backend ---------------------------------------------


def test_a_fourth_backend_gets_a_quarter_and_only_the_surplus_moves():
    moves = plan_moves({"a": (1, 100), "b": (1, 100), "c": (1, 100), "d": (1, 0)}, 0.1)
    assert moves == {"a": 25, "b": 25, "c": 25}


def test_within_the_threshold_nothing_moves():
    assert plan_moves({"a": (1, 80), "b": (1, 70), "c": (1, 75), "d": (1, 75)}, 0.1) == {}
    assert plan_moves({"a": (1, 10), "b": (1, 0)}, 1.0) == {}  # threshold 1: only "over double" counts


def test_one_backend_below_its_share_is_enough_to_act():
    # nobody above 82.5 (share 75 + 10%), but d is below 67.5: a, b and c give up their surplus
    assert plan_moves({"a": (1, 82), "b": (1, 82), "c": (1, 82), "d": (1, 54)}, 0.1) == \
        {"a": 7, "b": 7, "c": 7}


def test_shares_follow_weights():
    # weights 3:1 over 100 sessions: shares 75 and 25
    assert plan_moves({"a": (3, 50), "b": (1, 50)}, 0.1) == {"b": 25}
    assert plan_moves({"a": (3, 75), "b": (1, 25)}, 0.1) == {}


def test_nothing_to_share():
    assert plan_moves({}, 0.1) == {}
    assert plan_moves({"a": (1, 50)}, 0.1) == {}  # one backend: nowhere to move to
    assert plan_moves({"a": (1, 0), "b": (1, 0)}, 0.1) == {}


def test_uneven_totals_round_up_the_share_so_nobody_ends_below_it():
    # 10 over 3: share 3.33; a keeps 4 (ceil), so it gives up 6 - 4 = 2
    assert plan_moves({"a": (1, 10), "b": (1, 0), "c": (1, 0)}, 0.1) == {"a": 6}


# -- choose_sessions: which ones ------------------------------------------------------------------


def test_oldest_first_and_never_younger_than_the_cooldown():
    sessions = {"a": [(5.0, "a5"), (1.0, "a1"), (9.0, "a9"), (3.0, "a3")]}
    chosen, short = choose_sessions(sessions, {"a": 2}, now=10.0, cooldown=0)
    assert chosen == ["a1", "a3"] and short == 0
    chosen, short = choose_sessions(sessions, {"a": 3}, now=10.0, cooldown=6.0)  # only a1, a3 are 6 s old
    assert chosen == ["a1", "a3"] and short == 1
    assert next_eligible(sessions, now=10.0, cooldown=6.0) == pytest.approx(1.0)  # a5 comes of age at 11
    assert next_eligible(sessions, now=20.0, cooldown=6.0) is None


# -- end to end: registered demo backends, clients that reconnect on 1012 ---------------------------

SESSIONS = 40


@contextlib.contextmanager
def pool_of_three(rebalance):
    """Three of four demo backends ready, then SESSIONS clients; the fourth is for the test to start."""
    with running_glb(glb={"rebalance": rebalance, "rebalance_cooldown": 0, "rebalance_rate": 200,
                          "rebalance_threshold": 0.1}) as balancer:
        def settled():
            assert balancer.rebalancer.idle.wait(5)  # the look the three asked for is over
        with demo_pool(balancer, ["b1", "b2", "b3", "b4"], started=3, sessions=SESSIONS,
                       before_sessions=settled) as (backends, fleet, recorder):
            yield balancer, backends, fleet, recorder


def relayed(balancer):
    return {b.guid: b.relayed for b in balancer.registry.all()}


@pytest.mark.timeout(40)
def test_a_fourth_backend_gets_its_share_with_rebalance_on():
    with pool_of_three("on") as (balancer, backends, fleet, recorder):
        before = fleet.by_backend()
        assert sum(before.values()) == SESSIONS and "b4" not in before
        backends[3].start()
        recorder.wait("server_ready", 4)
        # 40 over four backends: 10 each; the three old ones give up exactly their surplus
        expected_moves = sum(count - 10 for count in before.values())
        fleet.wait_for(lambda: fleet.by_backend().get("b4") == expected_moves
                       and fleet.connected() == SESSIONS, 20, "the fourth backend's share")
        after = fleet.by_backend()
        print("before", before, "after", after, "closes", balancer.rebalance_closes)
        assert all(9 <= n <= 11 for n in after.values()) and len(after) == 4
        assert balancer.rebalance_closes == expected_moves
        closes = fleet.closes()
        assert len(closes) == expected_moves
        assert {(c.code, c.reason) for c in closes} == {(1012, "service restart")}
        assert all(c.backend != "b4" for c in closes)
        moved = recorder.wait("client_disconnect", expected_moves)
        assert {(e.code, e.reason, e.closed_by) for e in moved} == {(1012, "rebalance", "glb")}
        assert relayed(balancer) == after
        status = requests.get(base_url(balancer, "http") + "/glb/status", timeout=5).json()
        assert status["rebalance_closes"] == expected_moves
        assert value(scrape(balancer), "glb_rebalance_closes_total") == expected_moves


@pytest.mark.timeout(40)
def test_with_rebalance_off_nothing_moves():
    with pool_of_three("off") as (balancer, backends, fleet, recorder):
        before = fleet.by_backend()
        backends[3].start()
        recorder.wait("server_ready", 4)  # rebalancing would have been asked right here
        assert not balancer.rebalancer._wanted.is_set()
        moves, chosen, _, _ = balancer.rebalancer.plan()
        assert sum(moves.values()) == len(chosen) > 0  # it is unbalanced, and stays so
        assert fleet.by_backend() == before and fleet.closes() == []
        assert balancer.rebalance_closes == 0 and relayed(balancer)["b4"] == 0


# -- after a glb restart ----------------------------------------------------------------------------

def free_port():
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.timeout(60)
def test_after_a_restart_clients_do_not_all_stay_on_the_first_backend_back():
    port = free_port()
    settings = {"glb": {"listen": f"127.0.0.1:{port}", "rebalance": "on", "rebalance_cooldown": 0,
                        "rebalance_rate": 200}}
    lb = f"ws://127.0.0.1:{port}/glb/control"
    backends = [DemoBackend(0, lb_urls=[lb], guid=f"b{i}") for i in range(1, 4)]
    fleet = None
    try:
        with running_glb(**settings) as first:
            recorder = Recorder(first, "server_ready")
            for backend in backends:
                backend.start()
            recorder.wait("server_ready", 3)
            fleet = Fleet(f"ws://127.0.0.1:{port}/app", 30, reconnect_on={1001, 1012}).start()
            # b2 and b3 will be slow to come back: their agents stay away until told
            for backend in backends[1:]:
                backend.agent.stop(timeout=1)
        # glb restarts: every client got 1001 and reconnects; only b1 re-registers at first
        with running_glb(**settings) as second:
            recorder = Recorder(second, "server_ready")
            recorder.wait("server_ready", timeout=15)
            fleet.wait_for(lambda: fleet.connected() == 30, 20, "every client back")
            assert fleet.by_backend() == {"b1": 30}  # where everyone lands before the others return
            for backend in backends[1:]:
                backend.agent.start()
            recorder.wait("server_ready", 3, timeout=15)
            fleet.wait_for(lambda: fleet.connected() == 30 and second.rebalance_closes == 20, 20, "20 moved")
            after = fleet.by_backend()
            assert len(after) == 3 and all(9 <= n <= 11 for n in after.values())  # within 10% of 10
            print("after the others returned:", fleet.by_backend(), "moved:", second.rebalance_closes)
            assert second.rebalance_closes == 20
    finally:
        if fleet is not None:
            fleet.stop()
        for backend in backends:
            backend.stop(timeout=1)


def test_rebalancing_needs_a_policy_that_sends_moved_clients_to_the_emptier_backends():
    from glb.errors import ConfigError
    from tests.support import make_settings
    with pytest.raises(ConfigError, match=r"\[glb\], key 'rebalance': needs balancing = least_connections or p2c"):
        make_settings(glb={"rebalance": "on", "balancing": "hash"})
    with running_glb(glb={"balancing": "round_robin"}) as balancer:
        answer = requests.post(base_url(balancer, "http") + "/glb/admin/rebalance", timeout=5)
        assert answer.status_code == 409 and "least_connections" in answer.json()["error"]
