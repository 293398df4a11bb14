"""What glb counts: plain integers bumped where the work happens, read when someone looks.

Nothing here is touched per frame. The relay's per-session figures live on its
own objects (the frame scanners and legs, see ``ClientSession.figures``); this
module holds what outlives a session: totals per backend (a session's figures
are folded in when it ends), close codes, handshake refusals, HTTP requests and
two histograms, all observed once per session or request. ``glb.metrics`` and
the live status page read them; they never write.
"""

import time
from bisect import bisect_left
from collections import defaultdict

DIRECTIONS = ("to_backend", "to_client")
# How long a backend that left (and has no session left) keeps its figures in the views: several
# scrape intervals, so its last increments are seen, and then its series end instead of piling up
# as backends come and go under new names.
FORGET_AFTER = 600.0

# Upper bounds (seconds) of the histogram buckets; +Inf is implied.
SESSION_BUCKETS = (0.1, 1, 10, 60, 300, 900, 3600, 14400, 86400)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Histogram:
    """Bucket counts and a sum, observed without a lock (one greenlet runs at a time)."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value):
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self):
        """``[(upper bound as text, count of values <= it), ...]`` ending with +Inf, as Prometheus wants."""
        total, buckets = 0, []
        for bound, count in zip(self.bounds + (float("inf"),), self.counts):
            total += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return buckets


class Figures:
    """Messages and bytes one way or the other, of one session or summed over many."""

    __slots__ = ("messages_to_backend", "bytes_to_backend", "messages_to_client", "bytes_to_client")

    def __init__(self, messages_to_backend=0, bytes_to_backend=0, messages_to_client=0, bytes_to_client=0):
        self.messages_to_backend = messages_to_backend
        self.bytes_to_backend = bytes_to_backend
        self.messages_to_client = messages_to_client
        self.bytes_to_client = bytes_to_client

    def add(self, other):
        self.messages_to_backend += other.messages_to_backend
        self.bytes_to_backend += other.bytes_to_backend
        self.messages_to_client += other.messages_to_client
        self.bytes_to_client += other.bytes_to_client
        return self

    def copy(self):
        return Figures().add(self)

    def messages(self, direction):
        return self.messages_to_backend if direction == "to_backend" else self.messages_to_client

    def bytes(self, direction):
        return self.bytes_to_backend if direction == "to_backend" else self.bytes_to_client

    def as_dict(self):
        return {name: getattr(self, name) for name in self.__slots__}


class BackendTotals(Figures):
    """What ended sessions and HTTP requests left behind for one backend name."""

    __slots__ = ("sessions", "connect_failures", "last_error", "departed")

    def __init__(self):
        super().__init__()
        self.sessions = 0  # sessions ended
        self.connect_failures = 0
        self.last_error = ""
        self.departed = None  # monotonic time it was first seen gone, with no session left


class Stats:
    """Counters of one Balancer. Keys are plain values; totals per backend are kept by name,
    so they survive the backend leaving and re-registering."""

    def __init__(self):
        self.started = time.time()
        self.connections_total = defaultdict(int)  # kind -> connections accepted
        self.connections_refused = defaultdict(int)  # limit reached -> TCP connections refused at accept
        self.backends = defaultdict(BackendTotals)  # backend name -> totals of ended sessions
        self.closes = defaultdict(int)  # (code, closed_by) -> client sessions ended so
        self.handshake_rejections = defaultdict(int)  # HTTP status code -> upgrades refused
        self.http_requests = defaultdict(int)  # (backend name, status code) -> requests answered
        self.http_bytes = defaultdict(int)  # backend name -> response body bytes
        self.broadcast_envelopes = 0  # envelopes fanned out to the ready backends
        self.broadcast_dropped = 0  # copies of them a full outbox refused
        self.session_duration = Histogram(SESSION_BUCKETS)
        self.http_duration = Histogram(HTTP_BUCKETS)
        self.reloads = defaultdict(int)  # "applied" / "refused" -> config reloads (SIGHUP, admin API)
        self.last_reload_ok = True  # False while the config on disk is one glb refused

    def connection_opened(self, kind):
        self.connections_total[kind] += 1

    def connection_refused(self, limit):
        self.connections_refused[limit] += 1

    def session_ended(self, backend_name, figures, code, closed_by, seconds):
        """A client session is over: fold its figures into its backend's totals."""
        totals = self.backends[backend_name]
        totals.add(figures)
        totals.sessions += 1
        self.closes[(code, closed_by)] += 1
        self.session_duration.observe(seconds)

    def connect_failed(self, backend_name, reason):
        totals = self.backends[backend_name]
        totals.connect_failures += 1
        totals.last_error = reason

    def handshake_rejected(self, status):
        """``status``: an HTTP status line ("403 Forbidden") or code."""
        self.handshake_rejections[int(str(status).split(" ", 1)[0])] += 1

    def broadcast_fanned_out(self, dropped):
        self.broadcast_envelopes += 1
        self.broadcast_dropped += dropped

    def forget_departed(self, present, now):
        """Drop the figures of backends absent from ``present`` for over FORGET_AFTER seconds."""
        for name, totals in list(self.backends.items()):
            if name in present:
                totals.departed = None
            elif totals.departed is None:
                totals.departed = now
            elif now - totals.departed > FORGET_AFTER:
                del self.backends[name]
                self.http_bytes.pop(name, None)
                for key in [key for key in self.http_requests if key[0] == name]:
                    del self.http_requests[key]

    def http_request(self, backend_name, status, seconds, body_bytes):
        """One plain HTTP request answered (by a backend, or by glb when ``backend_name`` is "-")."""
        self.http_requests[(backend_name, int(status))] += 1
        self.http_bytes[backend_name] += body_bytes
        self.http_duration.observe(seconds)


def backend_figures(balancer, now=None):
    """Backend name -> messages and bytes relayed each way: ended sessions' totals plus the open ones'.

    Also where long-departed backends are forgotten (see FORGET_AFTER): whenever someone looks.
    """
    sessions = list(balancer.client_sessions)
    present = {backend.name for backend in balancer.registry.all()}
    present.update(session.backend.name for session in sessions)
    stats = balancer.stats
    stats.forget_departed(present, time.monotonic() if now is None else now)
    figures = {name: totals.copy() for name, totals in stats.backends.items()}
    for name in present:
        figures.setdefault(name, Figures())
    for session in sessions:
        figures[session.backend.name].add(session.figures())
    return figures
