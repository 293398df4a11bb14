"""Backend health: heartbeats on control channels, active and passive checks, slow start.

The decisions are plain functions and a small counter (``slow_start_weight``,
``RiseFall``), tested without sockets; ``HealthMonitor`` is the thin I/O around
them and owns every greenlet it starts (one sweeper, one checker per static
backend with ``check`` set)::

    what                      who notices                 effect
    control channel silent    sweeper: a heartbeat ping    channel ended 1011, backend leaves the pool
                              unanswered heartbeat_timeout at once, its client sessions get 1014
    active check fails        its checker, fall in a row   backend down (server_disconnect fires)
    active check passes       its checker, rise in a row   backend up again (server_ready fires)
    connects fail (passive)   the relay or the HTTP proxy: backend down for fail_timeout, then up
                              max_fails within fail_timeout again (the sweeper brings it back);
                                                           never the last candidate left

A backend that comes back (or is new) ramps its effective weight over
``slow_start`` seconds (``Backend.effective_weight``, from
``balancing.slow_start_weight``), so balancing does not flood it.
"""

import logging
import socket
import time

import gevent
import requests
from gevent.pool import Group

from glb.errors import CloseCode, ConnectionClosed, HandshakeFailed
from glb.frames import OP_PING, encode_frame
from glb.registry import GONE, UP
from glb.spread import close_spread
from glb.websocket import connect

log = logging.getLogger("glb.health")

HEARTBEAT_PAYLOAD = b"glb-heartbeat"
EVICT_CLOSE_WAIT = 0.5  # seconds an evicted control channel gets to answer our close


class RiseFall:
    """HAProxy's hysteresis: ``fall`` failed checks in a row take a backend down, ``rise``
    passed checks in a row bring it back; anything in between changes nothing."""

    __slots__ = ("rise", "fall", "passes", "fails")

    def __init__(self, rise, fall):
        self.rise, self.fall = rise, fall
        self.passes = self.fails = 0

    def observe(self, ok, up):
        """Count one check result for a backend that is ``up`` now; "down", "up" or None (no change)."""
        if ok:
            self.passes, self.fails = self.passes + 1, 0
            if not up and self.passes >= self.rise:
                return "up"
        else:
            self.passes, self.fails = 0, self.fails + 1
            if up and self.fails >= self.fall:
                return "down"
        return None


def parse_check(spec):
    """``tcp``, ``ws`` or ``http /path`` -> (kind, path); ("", "") for no checks."""
    kind, _, path = (spec or "").partition(" ")
    return kind, path.strip()


# -- the checks themselves: each returns None when the backend passed, else why it failed ------------

def check_tcp(backend, timeout, balancer):
    binding = backend.bindings[0]
    try:
        sock = socket.create_connection((binding.host, binding.port), timeout=timeout)
    except OSError as exc:
        return f"tcp connect failed: {exc}"
    sock.close()
    return None


def check_ws(backend, timeout, balancer):
    try:
        ws, _, _ = connect(backend.binding_url("/"), timeout=timeout,
                           ssl_context=balancer.backend_ssl_context())
    except HandshakeFailed as exc:
        return f"WebSocket handshake failed: {exc.reason}"
    try:
        ws.close(CloseCode.NORMAL, "health check", wait=timeout)
    except ConnectionClosed:
        pass
    return None


def check_http(backend, timeout, balancer, path="/"):
    settings = balancer.settings.backends
    verify = (settings.cafile or True) if settings.verify else False
    try:
        response = requests.get(backend.http_base() + path, timeout=timeout, allow_redirects=False,
                                verify=verify, headers={"User-Agent": "glb-health-check"})
        response.close()
    except (requests.RequestException, OSError) as exc:
        return f"HTTP check failed: {exc.__class__.__name__}"
    except Exception as exc:  # e.g. no HTTP address: a failed check, not a dead checker
        return f"HTTP check failed: {exc}"
    if not 200 <= response.status_code < 400:
        return f"HTTP check answered {response.status_code}"
    return None


CHECKS = {"tcp": check_tcp, "ws": check_ws, "http": check_http}


class HealthMonitor:
    """Runs heartbeats, active checks and the end of passive ejections for one balancer."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.registry = balancer.registry
        self.group = Group()  # the sweeper and every checker
        self._pinged = {}  # ControlSession -> monotonic time of its unanswered heartbeat ping
        self.evictions = 0

    def start(self):
        settings = self.balancer.settings
        for static in settings.backends_static:
            kind, path = parse_check(static.check)
            backend = self.registry.get(static.name)
            if kind and backend is not None:
                self.group.spawn(self._check_forever, backend, kind, path, static)
        self.group.spawn(self._sweep_forever)
        return self

    def stop(self):
        self.group.kill(block=False)

    # -- active checks --------------------------------------------------------------------------

    def _check_forever(self, backend, kind, path, static):
        counter = RiseFall(static.rise, static.fall)
        check = CHECKS[kind]
        timeout = min(static.check_interval, self.balancer.settings.glb.backend_connect_timeout)
        while backend.state != GONE:
            started = time.monotonic()
            try:
                args = (backend, timeout, self.balancer) + ((path,) if kind == "http" else ())
                with gevent.Timeout(timeout + 1, TimeoutError("check timed out")):
                    failure = check(*args)
            except Exception as exc:  # a check that breaks counts as a failed check
                failure = f"check failed: {exc}"
            change = counter.observe(failure is None, backend.health == UP)
            if change == "down":
                self.take_down(backend, f"{fall_text(static.fall)}: {failure}")
            elif change == "up":
                self.bring_up(backend, f"{static.rise} checks passed")
            gevent.sleep(max(0.0, static.check_interval - (time.monotonic() - started)))

    def take_down(self, backend, reason, until=None):
        """Out of the candidates; logged and fired as ``server_disconnect``."""
        if self.registry.mark_down(backend, reason, until):
            log.warning("! backend %s down: %s", backend.name, reason)
            bus = self.balancer.bus
            bus.fire(bus.server_disconnect, connection=None, backend=backend, code=None)

    def bring_up(self, backend, reason):
        """Back in the candidates (through slow start); logged and fired as ``server_ready``."""
        if self.registry.mark_up(backend):
            log.info("= backend %s up again: %s", backend.name, reason)
            bus = self.balancer.bus
            bus.fire(bus.server_ready, connection=None, backend=backend)

    # -- passive checks -------------------------------------------------------------------------

    def connect_failed(self, backend):
        """The relay could not connect to ``backend`` (or it answered 5xx): count it."""
        now = time.monotonic()
        if self.registry.connect_failed(backend, now):
            self.take_down(backend, f"{backend.max_fails} failed connects within {backend.fail_timeout:g} s",
                           until=now + backend.fail_timeout)

    # -- the sweeper: heartbeats and ejections that end -------------------------------------------

    def _sweep_forever(self):
        settings = self.balancer.settings.backends
        periods = [p for p in (settings.heartbeat_interval, settings.heartbeat_timeout) if p]
        tick = max(0.05, min([0.5] + [p / 4 for p in periods]))
        while not self.balancer.stopping:
            gevent.sleep(tick)
            now = time.monotonic()
            for backend in self.registry.ejections_over(now):
                self.bring_up(backend, f"ejection of {backend.fail_timeout:g} s over")
            if settings.heartbeat_interval:
                self._heartbeats(now, settings.heartbeat_interval, settings.heartbeat_timeout)

    def _heartbeats(self, now, interval, timeout):
        channels = self.balancer.control_channels
        pinged = self._pinged
        for session in [s for s in pinged if channels.get(s.registration.backend.guid) is not s]:
            del pinged[session]  # that channel has left
        for session in list(channels.values()):
            ws = session.conn.websocket
            if ws is None or ws.closed or session.outbox is None:
                continue
            sent = pinged.get(session)
            if sent is not None and ws.last_pong < sent:
                if now - sent > timeout:
                    del pinged[session]
                    self.evict(session, f"no answer to a heartbeat ping within {timeout:g} s")
            elif sent is None or now - sent >= interval:
                if session.outbox.put(encode_frame(OP_PING, HEARTBEAT_PAYLOAD, mask=False)):
                    pinged[session] = now

    def evict(self, session, reason):
        """A hung backend: out of the pool now, its channel closed 1011, its clients closed 1014."""
        backend = session.registration.backend
        self.evictions += 1
        self.balancer.report_error(session.conn, f"backend {backend.name} evicted: {reason}")
        session.leave_pool()
        self.group.spawn(_close_quietly, session.conn.websocket, CloseCode.INTERNAL_ERROR,
                         "heartbeat timeout")
        clients = [s.conn for s in list(self.balancer.client_sessions) if s.backend is backend]
        if clients:  # in a greenlet of its own: a slow client must not hold up the heartbeats
            self.group.spawn(close_spread, clients, CloseCode.BAD_GATEWAY, "backend not responding", 0)


def fall_text(fall):
    return f"{fall} check{'s' if fall != 1 else ''} failed"


def _close_quietly(ws, code, reason):
    try:
        ws.close(code, reason, wait=EVICT_CLOSE_WAIT)
    except Exception:  # a hung peer's socket may be in any state
        log.debug("= close failed", exc_info=True)
