"""Clients that behave like real ones during a deploy: they reconnect when glb tells them to.

Each ``Client`` is a greenlet that opens a WebSocket through glb, asks the demo
backend ``whoami`` (so it knows where it landed), then waits. When the session
is closed with a code in ``reconnect_on`` (1012 service restart, 1014, 1011 by
default) it reconnects after a short random delay; any other close ends it.
Every close is recorded with the time it came, its code and reason and the
backend it ended. Used by the tests and by ``bench/pool_bench.py``.
"""

import contextlib
import random
import time

import gevent
from gevent.event import Event
from gevent.pool import Group

from glb.demo_backend import WHOAMI, DemoBackend, lb_url_for
from glb.errors import ConnectionClosed, HandshakeFailed
from glb.websocket import connect
from tests.support import Recorder, base_url

RECONNECT_ON = frozenset({1011, 1012, 1014})


@contextlib.contextmanager
def demo_pool(balancer, guids, started=None, sessions=0, before_sessions=None):
    """Demo backends ``guids`` registering with ``balancer``, the first ``started`` (all by default)
    started and ready, then ``sessions`` fleet clients of ``/app``.

    Yields (backends, fleet or None, recorder of server_ready and client_disconnect); stops
    the fleet and every backend afterwards. ``before_sessions()`` runs between the two steps.
    """
    recorder = Recorder(balancer, "server_ready", "client_disconnect")
    lb = lb_url_for(balancer.addresses[0])
    backends = [DemoBackend(0, lb_urls=[lb], guid=guid) for guid in guids]
    started = len(backends) if started is None else started
    fleet = None
    try:
        for backend in backends[:started]:
            backend.start()
        recorder.wait("server_ready", started)
        if before_sessions is not None:
            before_sessions()
        if sessions:
            fleet = Fleet(base_url(balancer) + "/app", sessions).start()
        yield backends, fleet, recorder
    finally:
        if fleet is not None:
            fleet.stop()
        for backend in backends:
            backend.stop(timeout=1)


class Close:
    __slots__ = ("at", "code", "reason", "backend")

    def __init__(self, at, code, reason, backend):
        self.at, self.code, self.reason, self.backend = at, code, reason, backend

    def __repr__(self):
        return f"<Close {self.code} {self.reason!r} from {self.backend} at {self.at:.3f}>"


class Fleet:
    """``count`` clients of ``url``; ``start()`` connects them all (bounded), ``stop()`` ends them."""

    def __init__(self, url, count, reconnect_on=RECONNECT_ON, reconnect_delay=0.05, rng=None):
        self.url = url
        self.reconnect_on = frozenset(reconnect_on)
        self.reconnect_delay = reconnect_delay
        self.rng = rng or random.Random(7)
        self.clients = [Client(self, i) for i in range(count)]
        self.group = Group()
        self.changed = Event()  # set whenever a client connects or closes

    def start(self, timeout=20):
        for client in self.clients:
            self.group.spawn(client.run)
        self.wait_for(lambda: self.connected() == len(self.clients), timeout, "every client connected")
        return self

    def stop(self):
        for client in self.clients:
            client.stopping = True
            ws = client.ws
            if ws is not None:
                ws.abort()
        self.group.kill(block=True, timeout=2)

    # -- reading ---------------------------------------------------------------------------------

    def connected(self):
        return sum(1 for c in self.clients if c.backend is not None)

    def by_backend(self):
        """backend guid -> how many clients are connected to it now."""
        counts = {}
        for client in self.clients:
            if client.backend is not None:
                counts[client.backend] = counts.get(client.backend, 0) + 1
        return counts

    def opened_since(self, moment):
        """(time, backend) of every session opened at or after ``moment``."""
        return [item for c in self.clients for item in c.opened if item[0] >= moment]

    def closes(self, code=None):
        found = [close for c in self.clients for close in c.closes if code is None or close.code == code]
        return sorted(found, key=lambda close: close.at)

    def wait_for(self, condition, timeout, what):
        deadline = time.monotonic() + timeout
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors = [e for c in self.clients for e in c.errors][-5:]
                raise AssertionError(f"timed out waiting for {what}: {self.by_backend()}; last errors {errors}")
            self.changed.clear()
            self.changed.wait(min(remaining, 0.25))

    def _changed(self):
        self.changed.set()


class Client:
    """One client; ``backend`` is the guid of the backend it is connected to now, or None."""

    def __init__(self, fleet, index):
        self.fleet = fleet
        self.index = index
        self.ws = None
        self.backend = None
        self.sessions = 0  # sessions opened, reconnects included
        self.opened = []  # (monotonic time, backend guid) of every session opened
        self.closes = []
        self.errors = []  # why connects failed (glb down, no backend yet, ...)
        self.stopping = False

    def run(self):
        fleet = self.fleet
        delay = 0.0
        while not self.stopping:
            if delay:
                gevent.sleep(delay)
            try:
                ws, _, _ = connect(fleet.url, timeout=5)
                ws.send(WHOAMI)
                backend = ws.receive()
            except (HandshakeFailed, ConnectionClosed, OSError) as exc:
                self.errors.append(repr(exc))
                delay = min(1.0, (delay or fleet.reconnect_delay) * 2)  # no backend yet: back off
                continue
            if not isinstance(backend, str):
                self.errors.append(f"no whoami answer: {ws.close_code} {ws.close_reason}")
                ws.abort()
                delay = min(1.0, (delay or fleet.reconnect_delay) * 2)
                continue
            self.ws, self.backend = ws, backend
            self.sessions += 1
            self.opened.append((time.monotonic(), backend))
            fleet._changed()
            while ws.receive() is not None:
                pass
            self.closes.append(Close(time.monotonic(), ws.close_code, ws.close_reason, backend))
            self.ws = self.backend = None
            fleet._changed()
            if ws.close_code not in fleet.reconnect_on:
                return
            delay = fleet.rng.uniform(0, fleet.reconnect_delay)
