"""Balancing policies, chosen by name: which backend gets the next client. No sockets.

``make_policy(name)`` gives an object whose ``pick(candidates, request, exclude)``
returns one of ``candidates`` (usually ``Registry.candidates()``) or None.
Policies cache what they derive from the candidate list (sorted order, hash
ring) by the list's identity: the registry hands out the same tuple until
something changes, so a pick costs O(n) at most (O(log n) for ``hash``).
Pass a sequence that is not mutated afterwards.

Each policy takes an optional ``random.Random`` so tests can seed it.
"""
import hashlib
import random as _random
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs

from glb.errors import GlbError

VNODES_PER_WEIGHT = 160  # hash ring points per unit of weight
SLOW_START_FLOOR = 0.1  # a backend in slow start begins at this fraction of its weight
HASH_KEY_KINDS = ("ip", "cookie", "header", "query")


class PolicyError(GlbError):
    """An unknown policy name or a bad hash key."""


def slow_start_weight(weight, elapsed, window):
    """The effective weight ``elapsed`` seconds into a slow start of ``window`` seconds.

    Linear from ``SLOW_START_FLOOR * weight`` up to ``weight``; full weight without a window.
    The hash policy keeps full weights (its ring would reshuffle keys on every step).
    """
    if window <= 0 or elapsed >= window:
        return weight
    return weight * max(SLOW_START_FLOOR, elapsed / window)


@dataclass
class PickRequest:
    """What a policy may look at: the client address, its headers and query parameters.

    ``headers`` is keyed case-insensitively (stored lower-case); ``query`` maps a
    name to its first value.
    """

    peer_ip: str = ""
    headers: Mapping = field(default_factory=dict)
    query: Mapping = field(default_factory=dict)

    def __post_init__(self):
        self.headers = {k.lower(): v for k, v in self.headers.items()}

    def header(self, name):
        return self.headers.get(name.lower())

    def cookie(self, name):
        """The value of cookie ``name`` from the Cookie header(s), or None."""
        raw = self.headers.get("cookie")
        if not raw:
            return None
        for part in raw.split(";"):
            key, sep, value = part.partition("=")
            if sep and key.strip() == name:
                value = value.strip()
                return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
        return None

    @classmethod
    def from_environ(cls, environ):
        """Build one from a WSGI environ (REMOTE_ADDR, HTTP_* headers, QUERY_STRING)."""
        headers = {}
        for key, value in environ.items():
            if key.startswith("HTTP_"):
                headers[key[5:].replace("_", "-")] = value
            elif key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                headers[key.replace("_", "-")] = value
        query = {name: values[0] for name, values in
                 parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).items()}
        return cls(environ.get("REMOTE_ADDR", "") or "", headers, query)


def as_pick_request(request):
    """A PickRequest from None, a PickRequest, a WSGI environ or a dict of its fields."""
    if request is None or isinstance(request, PickRequest):
        return request
    if isinstance(request, Mapping):
        if "REMOTE_ADDR" in request or "wsgi.version" in request:
            return PickRequest.from_environ(request)
        return PickRequest(**request)
    raise TypeError(f"not a pick request: {request!r}")


def parse_hash_key(spec):
    """``ip``, ``cookie:NAME``, ``header:NAME`` or ``query:NAME`` -> (kind, name)."""
    kind, sep, name = (spec or "").partition(":")
    kind = kind.strip().lower()
    name = name.strip()
    if kind == "ip" and not sep:
        return ("ip", "")
    if kind in HASH_KEY_KINDS[1:] and name:
        return (kind, name)
    raise PolicyError(f"hash key must be ip, cookie:NAME, header:NAME or query:NAME, got {spec!r}")


def _excluded(exclude):
    return {getattr(item, "guid", item) for item in exclude}


def _available(candidates, exclude):
    if not exclude:
        return candidates
    skip = _excluded(exclude)
    return [b for b in candidates if b.guid not in skip]


class Policy:
    """Base: ``pick`` returns a backend from ``candidates`` not in ``exclude``, or None."""

    name: str | None = None

    def __init__(self, rng=None):
        self.rng = rng or _random.Random()
        self._seen = None  # the candidates object the cache below was built from

    def _refresh(self, candidates):
        """Rebuild derived state when handed a different candidates object."""
        if candidates is not self._seen:
            self._seen = candidates
            self._rebuild(candidates)

    def _rebuild(self, candidates):
        pass

    def pick(self, candidates, request=None, exclude=()):
        raise NotImplementedError


def _random_pick(rng, candidates, exclude):
    pool = _available(candidates, exclude)
    return rng.choice(pool) if pool else None


class RandomPolicy(Policy):
    """Uniformly at random."""

    name = "random"

    def pick(self, candidates, request=None, exclude=()):
        return _random_pick(self.rng, candidates, exclude)


class LeastConnectionsPolicy(Policy):
    """Fewest clients per unit of weight (``Backend.load``, as HAProxy's leastconn), so a
    backend in slow start takes its share gradually; ties broken at random so
    simultaneous picks spread out."""

    name = "least_connections"

    def pick(self, candidates, request=None, exclude=()):
        skip = _excluded(exclude) if exclude else ()
        best, fewest = [], None
        for backend in candidates:
            if backend.guid in skip:
                continue
            count = backend.load
            if fewest is None or count < fewest:
                best, fewest = [backend], count
            elif count == fewest:
                best.append(backend)
        return self.rng.choice(best) if best else None


class RoundRobinPolicy(Policy):
    """In guid order; the cursor is the last guid picked, so it survives pool changes."""

    name = "round_robin"

    def __init__(self, rng=None):
        super().__init__(rng)
        self._order, self._guids, self._last = [], [], None

    def _rebuild(self, candidates):
        self._order = sorted(candidates, key=lambda b: b.guid)
        self._guids = [b.guid for b in self._order]

    def pick(self, candidates, request=None, exclude=()):
        self._refresh(candidates)
        if not self._order:
            return None
        skip = _excluded(exclude) if exclude else ()
        start = bisect_right(self._guids, self._last) if self._last is not None else 0
        count = len(self._order)
        for step in range(count):
            backend = self._order[(start + step) % count]
            if backend.guid not in skip:
                self._last = backend.guid
                return backend
        return None


class WeightedPolicy(Policy):
    """Smooth weighted round robin (as nginx): proportional to weight, evenly interleaved."""

    name = "weighted"

    def __init__(self, rng=None):
        super().__init__(rng)
        self._order, self._current = [], {}

    def _rebuild(self, candidates):
        self._order = sorted(candidates, key=lambda b: b.guid)
        live = {b.guid for b in self._order}
        self._current = {g: w for g, w in self._current.items() if g in live}

    def pick(self, candidates, request=None, exclude=()):
        self._refresh(candidates)
        skip = _excluded(exclude) if exclude else ()
        current, best, total = self._current, None, 0
        for backend in self._order:
            if backend.guid in skip:
                continue
            weight = backend.effective_weight
            total += weight
            value = current.get(backend.guid, 0) + weight
            current[backend.guid] = value
            if best is None or value > current[best.guid]:
                best = backend
        if best is not None:
            current[best.guid] -= total
        return best


class PowerOfTwoPolicy(Policy):
    """Two backends at random, the one with fewer clients (near least-connections, no herd)."""

    name = "p2c"

    def pick(self, candidates, request=None, exclude=()):
        pool = _available(candidates, exclude)
        if len(pool) < 2:
            return pool[0] if pool else None
        first, second = self.rng.sample(range(len(pool)), 2)
        a, b = pool[first], pool[second]
        return b if b.load < a.load else a


def stable_hash(text):
    """A 64-bit hash that is the same in every process (unlike ``hash()``)."""
    data = text.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "big")


class HashPolicy(Policy):
    """Consistent hashing of a request key onto a ring with weighted virtual nodes.

    A key missing from the request falls back to the client ip; with no request
    (or no ip) there is nothing to stick to and the pick is random.

    The ring changes only when a backend joins or its weight changes. A backend
    that leaves the candidates (full under ``max_clients``, draining, gone) keeps
    its points and is walked past, exactly as if they were not there; so one that
    flips between full and not full costs no rebuild (16,000 points at weight
    100). Absent backends' points are dropped when they outnumber the present ones.
    """

    name = "hash"

    def __init__(self, hash_key="ip", rng=None):
        super().__init__(rng)
        self.hash_key = hash_key
        self.key_kind, self.key_name = parse_hash_key(hash_key)
        self._weights = {}  # guid -> weight of the points it has on the ring
        self._points, self._owners = [], []  # sorted ring positions, owner guid of each
        self._by_guid = {}  # the candidates: guid -> backend
        self._point_cache = {}
        self.ring_builds = 0

    def _backend_points(self, guid, weight):
        cached = self._point_cache.get(guid)
        if cached is None or cached[0] != weight:
            points = [stable_hash(f"{guid}#{i}") for i in range(VNODES_PER_WEIGHT * weight)]
            cached = self._point_cache[guid] = (weight, points)
        return cached[1]

    def _rebuild(self, candidates):
        self._by_guid = by_guid = {b.guid: b for b in candidates}
        weights = self._weights
        joined = any(weights.get(b.guid) != b.weight for b in candidates)
        absent = [guid for guid in weights if guid not in by_guid]
        if not joined and len(absent) <= len(by_guid):
            return
        members = {b.guid: b.weight for b in candidates}
        if len(absent) <= len(by_guid):  # probably only full for a moment: keep their points
            for guid in absent:
                members[guid] = weights[guid]
        self._weights = members
        ring = sorted((point, guid) for guid, weight in members.items()
                      for point in self._backend_points(guid, weight))
        self._points = [point for point, _ in ring]
        self._owners = [guid for _, guid in ring]
        for guid in [g for g in self._point_cache if g not in members]:
            del self._point_cache[guid]
        self.ring_builds += 1

    def key_for(self, request):
        """The string hashed for ``request``, or None when there is none."""
        request = as_pick_request(request)
        if request is None:
            return None
        value = None
        if self.key_kind == "cookie":
            value = request.cookie(self.key_name)
        elif self.key_kind == "header":
            value = request.header(self.key_name)
        elif self.key_kind == "query":
            value = request.query.get(self.key_name)
        if value:
            return f"{self.key_kind}:{value}"
        return f"ip:{request.peer_ip}" if request.peer_ip else None

    def pick(self, candidates, request=None, exclude=()):
        self._refresh(candidates)
        by_guid = self._by_guid
        if not by_guid:
            return None
        key = self.key_for(request)
        if key is None:
            return _random_pick(self.rng, candidates, exclude)
        skip = _excluded(exclude) if exclude else ()
        start = bisect_right(self._points, stable_hash(key))
        size = len(self._points)
        tried = set()
        for step in range(size):
            guid = self._owners[(start + step) % size]
            backend = by_guid.get(guid)
            if backend is None:  # not a candidate now: walked past
                continue
            if guid not in skip:
                return backend
            tried.add(guid)
            if len(tried) == len(by_guid):
                break
        return None


POLICIES = {
    cls.name: cls
    for cls in (RandomPolicy, LeastConnectionsPolicy, RoundRobinPolicy, WeightedPolicy,
                PowerOfTwoPolicy, HashPolicy)
}


def make_policy(name, hash_key="ip", rng=None):
    """The policy called ``name`` (a key of POLICIES); ``hash_key`` is for ``hash`` only."""
    cls = POLICIES.get(name)
    if cls is None:
        raise PolicyError(f"unknown balancing policy {name!r}; one of: {', '.join(POLICIES)}")
    if cls is HashPolicy:
        return HashPolicy(hash_key, rng=rng)
    return cls(rng=rng)
