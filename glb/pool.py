"""Operator actions on a running pool: drain, undrain, reweight, close a backend's sessions.

The admin API and a backend draining itself over its control channel both end
here. State changes are the registry's (``drain``, ``resume``, ``set_weight``);
what this module adds is closing sessions over a window with ``glb.spread``
(1012 "service restart" by default), so their clients reconnect elsewhere
without a thundering herd. Every closing greenlet belongs to ``PoolControl``:
an undrain cancels the drain's closing still under way, and ``stop()`` ends them all.
"""

import logging

from gevent.pool import Group

from glb.errors import CloseCode
from glb.registry import DRAINING, READY
from glb.spread import close_spread

log = logging.getLogger("glb.pool")

RESTART_REASON = "service restart"


class PoolControl:
    """The balancer's operator actions; one per balancer."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.registry = balancer.registry
        self.group = Group()
        self._closing = {}  # Backend -> the greenlet closing its sessions for a drain

    def stop(self):
        self.group.kill(block=False)

    # -- sessions -------------------------------------------------------------------------------

    def sessions_of(self, backend=None):
        """Open relayed sessions (of ``backend``, or all), oldest first."""
        sessions = [s for s in list(self.balancer.client_sessions)
                    if (backend is None or s.backend is backend) and s.outcome is None and s.client is not None]
        sessions.sort(key=lambda s: s.conn.started)
        return sessions

    def close_sessions(self, backend, code=CloseCode.SERVICE_RESTART, reason=RESTART_REASON, spread=0.0):
        """Close every open session of ``backend`` at random moments within ``spread`` seconds.

        Returns how many are scheduled; the closing runs in a greenlet of its own.
        """
        sessions = self.sessions_of(backend)
        if sessions:
            log.info("= closing %d session(s) of backend %s with %d over %.3g s",
                     len(sessions), backend.name, code, spread)
            return len(sessions), self.group.spawn(
                close_spread, [s.conn for s in sessions], code, reason, spread,
                is_open=lambda conn: conn.session.outcome is None)
        return 0, None

    # -- state ----------------------------------------------------------------------------------

    def drain(self, backend, spread=None):
        """No new sessions for ``backend``; with ``spread`` (seconds) its sessions are closed
        1012 within that window. Returns how many sessions are being closed."""
        if backend.state != DRAINING:
            self.registry.drain(backend.guid)
            log.info("= backend %s draining", backend.name)
        if spread is None:
            return 0
        self._cancel(backend)
        count, closer = self.close_sessions(backend, spread=spread)
        if closer is not None:
            self._closing[backend] = closer
            closer.link(lambda _: self._closing.pop(backend, None))
        return count

    def undrain(self, backend):
        """``backend`` takes new sessions again; a drain's closing still under way stops."""
        self._cancel(backend)
        if backend.state == DRAINING:
            self.registry.resume(backend.guid)
            log.info("= backend %s undrained", backend.name)
            self.balancer.rebalancer.pool_changed()

    def set_weight(self, backend, weight):
        self.registry.set_weight(backend.guid, weight)
        log.info("= backend %s weight %d", backend.name, weight)
        if backend.state == READY:
            self.balancer.rebalancer.pool_changed()

    def _cancel(self, backend):
        closer = self._closing.pop(backend, None)
        if closer is not None:
            closer.kill(block=False)
