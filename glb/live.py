"""The live status page: ``GET <prefix>`` (HTML) and ``<prefix>status/live`` (a WebSocket feed).

The page is static package data (``glb/static/status.html``: plain JS and SVG,
nothing fetched from elsewhere). It opens the feed, which sends one ``hello``
(listeners, every backend row and the recent history for the chart) and then,
every second, a ``tick``: totals, the backend rows that changed, the names of
backends that left, and one history point. Rates (messages/s, bytes/s) are
worked out here from the counters' change over the second, so the browser only
draws.

``LiveFeed`` samples only while a page is open: with no watcher it runs no
greenlet and costs nothing. Each watcher gets its ticks from a short greenlet
of the feed's group; a watcher still busy with the previous one skips ticks
and gets a whole picture next time instead of a delta, so a slow browser never
holds up the others or the sampler. Same access rule as ``<prefix>status``.
"""

import importlib.resources
import json
import time
from collections import deque

import gevent
from gevent.pool import Group

from glb import __version__
from glb.errors import ConnectionClosed, Status
from glb.own_sessions import OwnSession
from glb.registry import READY, UP
from glb.stats import backend_figures
from glb.status import operator_refusal, refuse_operator_read

PAGE = "static/status.html"
TICK = 1.0  # seconds between two ticks
HISTORY = 600  # ticks kept for the chart: ten minutes
WATCHER_SEND_TIMEOUT = 10.0  # a page that reads nothing this long is closed (1008 by the WebSocket layer)


class StatusPage:
    """WSGI app for ``GET <prefix>``: the page itself; the feed does the rest."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.body = importlib.resources.files("glb").joinpath(PAGE).read_bytes()

    def __call__(self, environ, start_response):
        refused = refuse_operator_read(self.balancer, environ, start_response)
        if refused is not None:
            return refused
        start_response(Status.OK, [("Content-Type", "text/html; charset=utf-8"),
                                   ("Content-Length", str(len(self.body))), ("Cache-Control", "no-store")])
        return [self.body]


class LiveFeed:
    """Samples the balancer every second while pages watch, and sends each page its update."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.watchers = {}  # LiveSession -> its sender greenlet (or None), once it had its hello
        self.history = deque(maxlen=HISTORY)  # [t, client sessions, messages/s] per tick
        self.rows = {}  # backend name -> its row as last sent
        self.totals = {}
        self._previous = None  # (monotonic time, {name: Figures}) of the last sample
        self._sampler = None
        self._senders = Group()  # every sender greenlet, so stop() can end them

    def watch(self, session):
        """Add a page; starts sampling if it is the first."""
        if not self.watchers and self._sampler is None:
            self._sample()  # the hello has current rows even before the first tick
            self._sampler = gevent.spawn(self._sample_forever)
        self.watchers[session] = None
        return self.hello()

    def unwatch(self, session):
        self.watchers.pop(session, None)

    def stop(self):
        if self._sampler is not None:
            self._sampler.kill(block=False)
            self._sampler = None
        self._senders.kill(block=False)

    def hello(self):
        balancer = self.balancer
        return {
            "type": "hello", "version": __version__, "started": balancer.stats.started,
            "balancing": balancer.settings.glb.balancing,
            "listeners": [f"http://{host}:{port}" for host, port in balancer.addresses]
            + [f"https://{host}:{port}" for host, port in balancer.tls_addresses],
            "totals": self.totals, "backends": self.rows, "history": list(self.history),
        }

    def _sample_forever(self):
        try:
            while self.watchers and not self.balancer.stopping:
                gevent.sleep(TICK)
                changed, gone = self._sample()
                tick = {"type": "tick", "totals": self.totals, "backends": changed, "gone": gone,
                        "point": self.history[-1]}
                self._send_all(tick)
        finally:
            if self._sampler is gevent.getcurrent():
                self._sampler = None

    def _sample(self):
        """Take one sample: update totals, rows and history; ``(changed rows, names gone)``."""
        balancer, stats = self.balancer, self.balancer.stats
        now = time.monotonic()
        figures = backend_figures(balancer)
        before_time, before = self._previous or (now, {})
        elapsed = max(now - before_time, 1e-3)
        self._previous = (now, figures)
        registered = {backend.name: backend for backend in balancer.registry.all()}
        rows, rate_sum = {}, 0.0
        for name in sorted(set(registered) | set(figures)):
            backend = registered.get(name)
            current = figures.get(name)
            last = before.get(name)
            rates = {}
            for field in ("messages_to_backend", "messages_to_client", "bytes_to_backend", "bytes_to_client"):
                delta = getattr(current, field) - getattr(last, field) if current and last else 0
                rates[field] = round(max(delta, 0) / elapsed, 1)
            rate_sum += rates["messages_to_backend"] + rates["messages_to_client"]
            totals = stats.backends.get(name)
            rows[name] = {
                "state": backend.state if backend else "gone",
                "health": backend.health if backend else None,
                "weight": backend.weight if backend else None,
                "sessions": backend.relayed if backend else 0,
                "reported_clients": len(backend.reported_clients) if backend else 0,
                "rates": rates,
                "figures": current.as_dict() if current else None,
                "last_error": (backend and backend.health != UP and f"down: {backend.down_reason}")
                or (totals.last_error if totals else ""),
            }
        by_kind = {"client": 0, "control": 0, "own": 0}
        for conn in list(balancer.connections.values()):
            by_kind[conn.kind] = by_kind.get(conn.kind, 0) + 1
        self.totals = {
            "uptime": round(time.time() - stats.started), "connections": by_kind,
            "connections_total": sum(stats.connections_total.values()),
            "backends_ready": sum(1 for b in registered.values() if b.state == READY and b.health == UP),
            "messages_per_second": round(rate_sum, 1),
            "closes": sum(stats.closes.values()),
            "handshake_rejections": sum(stats.handshake_rejections.values()),
            "http_requests": sum(stats.http_requests.values()),
        }
        changed = {name: row for name, row in rows.items() if self.rows.get(name) != row}
        gone = [name for name in self.rows if name not in rows]
        self.rows = rows
        self.history.append([round(time.time(), 1), by_kind["client"], round(rate_sum, 1)])
        return changed, gone

    def _send_all(self, tick):
        delta = None
        for session, sender in list(self.watchers.items()):
            if sender is not None and not sender.ready():
                session.missed = True  # still sending the last one: this tick is skipped
                continue
            if session.missed:
                message = json.dumps(dict(self.hello(), type="full", point=tick["point"]))
                session.missed = False
            else:
                message = delta = delta or json.dumps(tick)
            self.watchers[session] = self._senders.spawn(session.deliver, message)


class LiveSession(OwnSession):
    """``<prefix>status/live``: a status page's feed; what the page sends is ignored."""

    def __init__(self, balancer, conn):
        super().__init__(balancer, conn)
        self.missed = False  # a tick was skipped: send the whole picture next time

    @classmethod
    def prepare(cls, balancer, conn, environ):
        return operator_refusal(balancer, environ) or cls(balancer, conn)

    def run(self):
        ws = self.conn.websocket
        ws.send_timeout = WATCHER_SEND_TIMEOUT
        feed = self.balancer.live_feed
        try:
            ws.send(json.dumps(feed.watch(self)))
            while ws.receive() is not None:
                pass
        finally:
            feed.unwatch(self)

    def deliver(self, message):
        try:
            self.conn.websocket.send(message)
        except ConnectionClosed:
            pass  # run() sees the connection end and unwatches

    def send(self, message):
        return False  # glb's own messages (write_data) do not go to status pages
