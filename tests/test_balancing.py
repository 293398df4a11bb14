"""Balancing policies: distributions over many picks, hashing stability, exclude. No sockets."""
import random
from collections import Counter

import pytest

from glb.balancing import (
    POLICIES, HashPolicy, PickRequest, PolicyError, as_pick_request, make_policy, parse_hash_key,
    stable_hash,
)
from glb.registry import Registry

PICKS = 10_000


def pool(*guids, weights=None):
    """A registry with ready backends named ``guids``; returns (registry, backends)."""
    registry = Registry()
    for i, guid in enumerate(guids):
        weight = weights[i] if weights else 1
        registry.add_static(guid, f"ws://10.0.0.{i + 1}:8000", weight=weight)
    return registry, [registry.get(g) for g in guids]


def policy(name, seed=1, **kw):
    return make_policy(name, rng=random.Random(seed), **kw)


def counts(chosen):
    return Counter(b.guid for b in chosen)


# -- registry of policies --------------------------------------------------------------------

def test_policies_by_name():
    assert set(POLICIES) == \
        {"random", "least_connections", "round_robin", "weighted", "p2c", "hash"}
    for name in POLICIES:
        assert make_policy(name).name == name
    with pytest.raises(PolicyError, match="unknown balancing policy 'fastest'.*round_robin"):
        make_policy("fastest")


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_no_candidates_gives_none(name):
    assert policy(name).pick((), PickRequest("1.2.3.4")) is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_all_excluded_gives_none(name):
    registry, backends = pool("a", "b")
    request = PickRequest("1.2.3.4")
    assert policy(name).pick(registry.candidates(), request, exclude=backends) is None


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_exclude_is_honoured(name):
    registry, (a, b, c) = pool("a", "b", "c")
    p = policy(name)
    for i in range(300):
        request = PickRequest(f"10.1.{i // 256}.{i % 256}")
        assert p.pick(registry.candidates(), request, exclude=[a, c]) is b
        assert p.pick(registry.candidates(), request, exclude=["b"]) in (a, c)  # guids work too


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_single_candidate(name):
    registry, (a,) = pool("a")
    assert policy(name).pick(registry.candidates(), PickRequest("1.1.1.1")) is a


# -- distributions -----------------------------------------------------------------------------

def test_random_is_roughly_uniform():
    registry, _ = pool("a", "b", "c", "d")
    p = policy("random")
    tally = counts(p.pick(registry.candidates()) for _ in range(PICKS))
    print("random:", dict(tally))
    assert set(tally) == {"a", "b", "c", "d"}
    for n in tally.values():
        assert abs(n - PICKS / 4) < PICKS * 0.03  # expected sd ~43, tolerance 300


def test_least_connections_evens_out_with_sessions():
    registry, backends = pool("a", "b", "c")
    registry.session_started(backends[0])
    for _ in range(50):
        registry.session_started(backends[1])  # b starts heavily loaded
    p = policy("least_connections")
    for _ in range(PICKS):
        registry.session_started(p.pick(registry.candidates()))
    clients = [b.clients for b in backends]
    print("least_connections clients:", clients)
    assert max(clients) - min(clients) <= 1
    assert sum(clients) == PICKS + 51


def test_least_connections_prefers_the_least_loaded():
    registry, (a, b, c) = pool("a", "b", "c")
    for backend, n in ((a, 5), (b, 2), (c, 9)):
        for _ in range(n):
            registry.session_started(backend)
    p = policy("least_connections")
    assert all(p.pick(registry.candidates()) is b for _ in range(100))


def test_least_connections_breaks_ties_at_random():
    # simultaneous picks (no session_started in between) must not all hit one backend
    registry, _ = pool("a", "b", "c")
    p = policy("least_connections")
    tally = counts(p.pick(registry.candidates()) for _ in range(3000))
    print("least_connections ties:", dict(tally))
    assert all(800 < n < 1200 for n in tally.values()) and len(tally) == 3


def test_round_robin_exact_cycle_in_guid_order():
    registry, (c, a, b) = pool("c", "a", "b")
    p = policy("round_robin")
    chosen = [p.pick(registry.candidates()).guid for _ in range(9999)]
    assert chosen[:6] == ["a", "b", "c", "a", "b", "c"]
    assert chosen == ["a", "b", "c"] * 3333


def test_round_robin_cursor_survives_pool_changes():
    registry, _ = pool("a", "b", "c", "d")
    p = policy("round_robin")
    assert [p.pick(registry.candidates()).guid for _ in range(2)] == ["a", "b"]
    registry.drain("c")  # the next one leaves: continue after b with d
    assert p.pick(registry.candidates()).guid == "d"
    registry.resume("c")
    registry.add_static("bb", "ws://10.0.1.1:1")  # joins behind the cursor
    assert [p.pick(registry.candidates()).guid for _ in range(5)] == ["a", "b", "bb", "c", "d"]
    registry.remove("a")
    registry.remove("b")  # the cursor's own backend left
    assert [p.pick(registry.candidates()).guid for _ in range(3)] == ["bb", "c", "d"]


def test_weighted_proportions_exact_over_full_cycles():
    registry, _ = pool("a", "b", "c", weights=[1, 2, 3])
    p = policy("weighted")
    chosen = [p.pick(registry.candidates()).guid for _ in range(6000)]
    assert counts(registry.get(g) for g in chosen) == {"a": 1000, "b": 2000, "c": 3000}
    for start in range(0, 6000, 6):  # exact within every cycle of sum(weights) picks
        assert Counter(chosen[start:start + 6]) == {"a": 1, "b": 2, "c": 3}
    # smooth: the heaviest never gets more than two in a row
    assert "c,c,c" not in ",".join(chosen)


def test_weighted_with_equal_weights_is_round_robin():
    registry, _ = pool("a", "b", "c")
    p = policy("weighted")
    assert [p.pick(registry.candidates()).guid for _ in range(6)] == ["a", "b", "c"] * 2


def test_weighted_adapts_when_a_backend_leaves():
    registry, _ = pool("a", "b", "c", weights=[1, 2, 3])
    p = policy("weighted")
    for _ in range(4):
        p.pick(registry.candidates())
    registry.remove("c")
    tally = Counter(p.pick(registry.candidates()).guid for _ in range(3000))
    assert abs(tally["a"] - 1000) <= 2 and abs(tally["b"] - 2000) <= 2


def test_p2c_strongly_prefers_less_loaded():
    registry, backends = pool("a", "b", "c", "d")
    for backend, n in zip(backends, (0, 10, 20, 30)):
        for _ in range(n):
            registry.session_started(backend)
    p = policy("p2c")
    tally = counts(p.pick(registry.candidates()) for _ in range(PICKS))
    print("p2c on loads 0/10/20/30:", dict(tally))
    # with two distinct random choices: P(a)=1/2, P(b)=1/3, P(c)=1/6, P(d)=0
    assert tally["d"] == 0
    assert tally["a"] > tally["b"] > tally["c"] > 0
    assert abs(tally["a"] - PICKS / 2) < PICKS * 0.03


def test_p2c_evens_out_with_sessions():
    registry, backends = pool("a", "b", "c", "d")
    p = policy("p2c")
    for _ in range(PICKS):
        registry.session_started(p.pick(registry.candidates()))
    clients = [b.clients for b in backends]
    print("p2c clients:", clients)
    assert max(clients) - min(clients) <= 10


# -- hash -------------------------------------------------------------------------------------

def keys(n=PICKS):
    return [PickRequest(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}") for i in range(n)]


def test_stable_hash_is_process_independent():
    # fixed values: a change here would remap every client after an upgrade
    assert stable_hash("glb") == 0x18FE811753A7E748
    assert stable_hash("abc") == stable_hash("abc") != stable_hash("abd")
    assert 0 <= stable_hash("x") < 2 ** 64


def test_hash_is_deterministic_per_key_and_spreads():
    registry, _ = pool("a", "b", "c")
    one, two = policy("hash", seed=1), policy("hash", seed=2)
    first = [one.pick(registry.candidates(), r).guid for r in keys(3000)]
    second = [two.pick((registry.candidates()), r).guid for r in reversed(keys(3000))][::-1]
    assert first == second
    tally = Counter(first)
    print("hash spread over 3:", dict(tally))
    assert all(700 < n < 1300 for n in tally.values())


def test_hash_keeps_most_keys_when_a_fourth_backend_joins():
    registry, _ = pool("a", "b", "c")
    p = policy("hash")
    requests = keys()
    before = [p.pick(registry.candidates(), r).guid for r in requests]
    registry.add_static("d", "ws://10.0.0.4:8000")
    after = [p.pick(registry.candidates(), r).guid for r in requests]
    kept = sum(x == y for x, y in zip(before, after)) / len(requests)
    print(f"hash stability: {kept:.1%} of {len(requests)} keys kept their backend (ideal 75%)")
    assert kept >= 0.70
    moved_to = {y for x, y in zip(before, after) if x != y}
    assert moved_to == {"d"}  # keys only move to the newcomer


def test_hash_keys_of_a_leaving_backend_move_and_others_stay():
    registry, _ = pool("a", "b", "c", "d")
    p = policy("hash")
    requests = keys(4000)
    before = [p.pick(registry.candidates(), r).guid for r in requests]
    registry.drain("b")
    after = [p.pick(registry.candidates(), r).guid for r in requests]
    for x, y in zip(before, after):
        assert y == x if x != "b" else y != "b"


def test_hash_weighted_ring():
    registry, _ = pool("a", "b", weights=[1, 3])
    p = policy("hash")
    tally = Counter(p.pick(registry.candidates(), r).guid for r in keys())
    print("hash weights 1:3:", dict(tally))
    assert 0.18 < tally["a"] / PICKS < 0.32


def test_hash_excluded_walks_to_the_next_backend_deterministically():
    registry, (a, b, c) = pool("a", "b", "c")
    p = policy("hash")
    for request in keys(500):
        home = p.pick(registry.candidates(), request)
        second = p.pick(registry.candidates(), request, exclude=[home])
        assert second is not home
        assert p.pick(registry.candidates(), request, exclude=[home]) is second


@pytest.mark.parametrize("hash_key, make", [
    ("cookie:session", lambda v, ip: PickRequest(ip, {"Cookie": f"theme=dark; session={v}; x=1"})),
    ("header:X-User", lambda v, ip: PickRequest(ip, {"x-user": v})),
    ("query:room", lambda v, ip: PickRequest(ip, {}, {"room": v})),
])
def test_hash_on_cookie_header_query(hash_key, make):
    registry, _ = pool("a", "b", "c")
    p = policy("hash", hash_key=hash_key)
    cands = registry.candidates()
    # the same key from many addresses lands on one backend
    for value in ("alice", "bob", "carol", "dave"):
        assert len({p.pick(cands, make(value, f"10.0.0.{i}")).guid for i in range(50)}) == 1
    # different keys spread
    assert len({p.pick(cands, make(f"user{i}", "1.1.1.1")).guid for i in range(200)}) == 3


def test_hash_missing_key_falls_back_to_ip():
    registry, _ = pool("a", "b", "c")
    by_cookie = policy("hash", hash_key="cookie:session")
    by_ip = policy("hash", hash_key="ip")
    cands = registry.candidates()
    for request in keys(300):
        assert by_cookie.pick(cands, request) is by_ip.pick(cands, request)
    assert by_cookie.key_for(PickRequest("1.2.3.4", {"Cookie": "other=1"})) == "ip:1.2.3.4"
    assert by_cookie.key_for(PickRequest("1.2.3.4", {"Cookie": 'session="v"'})) == "cookie:v"


def test_hash_without_any_key_picks_at_random():
    registry, _ = pool("a", "b", "c")
    p = policy("hash")
    tally = Counter(p.pick(registry.candidates(), None).guid for _ in range(3000))
    assert len(tally) == 3
    assert Counter(p.pick(registry.candidates(), PickRequest("")).guid for _ in range(300)).keys() \
        == {"a", "b", "c"}


def test_hash_ring_rebuilt_only_when_a_member_joins():
    registry, (a, b, c) = pool("a", "b", "c")
    p = policy("hash")
    p.pick(registry.candidates(), PickRequest("1.1.1.1"))
    ring = p._points
    assert len(ring) == 3 * 160
    p.pick(registry.candidates(), PickRequest("1.1.1.2"))
    assert p._points is ring
    registry.session_started(a)  # a change in counts only: same candidates tuple
    p.pick(registry.candidates(), PickRequest("1.1.1.3"))
    assert p._points is ring
    p.pick((c, b, a), PickRequest("1.1.1.3"))  # another object, same set: no rebuild
    assert p._points is ring
    registry.drain("a")  # out of the candidates: walked past, its points kept
    assert p.pick(registry.candidates(), PickRequest("1.1.1.4")) is not a
    assert p._points is ring
    registry.add_static("d", "ws://10.0.0.9:8000")  # a new member: the ring is rebuilt
    p.pick(registry.candidates(), PickRequest("1.1.1.5"))
    assert p._points is not ring and len(p._points) == 4 * 160


def test_hash_returns_the_current_object_for_a_reregistered_guid():
    registry, (a, b) = pool("a", "b")
    p = policy("hash")
    request = PickRequest("7.7.7.7")
    home = p.pick(registry.candidates(), request)
    registry.remove(home.guid)
    fresh = registry.add_static(home.guid, "ws://10.9.9.9:1")
    assert p.pick(registry.candidates(), request) is fresh


@pytest.mark.parametrize("spec, parsed", [
    ("ip", ("ip", "")), ("cookie:sid", ("cookie", "sid")), ("Header:X-Id", ("header", "X-Id")),
    ("query: room ", ("query", "room")),
])
def test_parse_hash_key(spec, parsed):
    assert parse_hash_key(spec) == parsed


@pytest.mark.parametrize("spec", ["", "ip:x", "cookie", "cookie:", "body:x", "header"])
def test_bad_hash_keys(spec):
    with pytest.raises(PolicyError, match="hash key"):
        HashPolicy(spec)


# -- requests ---------------------------------------------------------------------------------

def test_pick_request_from_environ():
    environ = {
        "REMOTE_ADDR": "203.0.113.9", "QUERY_STRING": "room=lobby&room=2&empty=",
        "HTTP_COOKIE": "sid=abc", "HTTP_X_USER_ID": "42", "CONTENT_TYPE": "text/plain",
        "wsgi.version": (1, 0), "PATH_INFO": "/chat",
    }
    request = PickRequest.from_environ(environ)
    assert request.peer_ip == "203.0.113.9"
    assert request.header("X-User-Id") == "42" and request.header("x-user-id") == "42"
    assert request.header("Content-Type") == "text/plain"
    assert request.cookie("sid") == "abc" and request.cookie("nope") is None
    assert request.query == {"room": "lobby", "empty": ""}
    assert as_pick_request(environ) == request
    assert as_pick_request({"peer_ip": "1.1.1.1"}) == PickRequest("1.1.1.1")
    assert as_pick_request(None) is None
    with pytest.raises(TypeError):
        as_pick_request(42)


def test_hash_accepts_an_environ_as_request():
    registry, _ = pool("a", "b", "c")
    p = policy("hash", hash_key="query:room")
    environ = {"REMOTE_ADDR": "1.1.1.1", "QUERY_STRING": "room=lobby", "wsgi.version": (1, 0)}
    assert p.pick(registry.candidates(), environ) is p.pick(
        registry.candidates(), PickRequest("9.9.9.9", {}, {"room": "lobby"}))



def test_hash_ring_is_not_rebuilt_when_a_backend_flips_between_full_and_not_full():
    registry, (a, b, c) = pool("a", "b", "c", weights=[100, 100, 100])
    a.max_clients = 1
    p = policy("hash")
    requests = keys(300)
    p.pick(registry.candidates(), requests[0])
    ring = p._points
    for _ in range(20):
        registry.session_started(a)  # full: out of the candidates
        while_full = [p.pick(registry.candidates(), r) for r in requests]
        assert a not in while_full
        registry.session_ended(a)  # back
        p.pick(registry.candidates(), requests[0])
    assert p._points is ring  # the same ring all along: no 48,000-point rebuild per flip
    # ... and the picks are those of a ring built from scratch for the same candidates
    registry.session_started(a)
    fresh = policy("hash")
    assert [p.pick(registry.candidates(), r) for r in requests] == \
        [fresh.pick(registry.candidates(), r) for r in requests]
    registry.session_ended(a)
    fresh = policy("hash")
    assert [p.pick(registry.candidates(), r) for r in requests] == \
        [fresh.pick(registry.candidates(), r) for r in requests]


def test_hash_ring_drops_absent_backends_once_they_outnumber_present_ones():
    registry, backends = pool("a", "b", "c", "d", "e")
    p = policy("hash")
    p.pick(registry.candidates(), keys(1)[0])
    for guid in ("b", "c", "d"):
        registry.remove(guid)
        p.pick(registry.candidates(), keys(1)[0])
    assert set(p._owners) == {"a", "e"}
