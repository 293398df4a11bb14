"""Rebalancing long-lived sessions when the pool changes.

After a scale-out or a backend's return, least-loaded placement only steers
*new* sessions; the old backends keep every session they had. Rebalancing
closes just enough of those (1012 "service restart", oldest first, spread at
``rebalance_rate`` per second) for their clients to reconnect and be placed on
the emptier backends.

The decision is ``plan_moves`` and ``choose_sessions``: plain functions, no
sockets. ``Rebalancer`` is the loop around them: it wakes when the pool
changes (a backend ready, back up, undrained or reweighted) or when asked,
closes the chosen sessions, and looks again until the pool is within the
threshold or nothing more may move yet.

Rules::

    share        ready, healthy backends share the relayed sessions by weight:
                 share_i = total * weight_i / sum(weights)
    when         some backend's count is off its share by more than
                 rebalance_threshold * share (above or below)
    how many     each backend above its share gives up count - ceil(share):
                 only the surplus moves, and nobody is left below share by it
    which        the backend's oldest sessions that are at least
                 rebalance_cooldown old (a session that just arrived, say a
                 client that was just moved, stays where it is)
    draining or down backends are not part of the sum: drain empties them
"""

import logging
import math
import random
import time

import gevent
from gevent.event import Event

from glb.errors import CloseCode
from glb.registry import READY, UP
from glb.spread import close_spread

log = logging.getLogger("glb.rebalance")

REASON = "service restart"  # what the client reads in the close frame
CAUSE = "rebalance"  # what client_disconnect reports
SETTLE = 0.2  # seconds to wait after a change, so backends coming back together count as one change
LOOK_AGAIN = 5.0  # seconds after a pass that closed sessions before the next look (clients are in transit)


def plan_moves(loads, threshold):
    """How many sessions to move off each backend: ``{key: n}`` for those that give some up.

    ``loads`` maps a key to ``(weight, sessions)``. Empty when every backend is within
    ``threshold`` (a fraction of its share) or there is nothing to share.
    """
    total_weight = sum(weight for weight, _ in loads.values())
    total = sum(count for _, count in loads.values())
    if len(loads) < 2 or total == 0 or total_weight <= 0:
        return {}
    shares = {key: total * weight / total_weight for key, (weight, _) in loads.items()}
    unbalanced = any(abs(count - shares[key]) > threshold * shares[key]
                     for key, (_, count) in loads.items())
    if not unbalanced:
        return {}
    moves = {}
    for key, (_, count) in loads.items():
        surplus = count - math.ceil(shares[key] - 1e-9)
        if surplus > 0:
            moves[key] = surplus
    return moves


def choose_sessions(sessions, moves, now, cooldown):
    """The sessions to close: per key in ``moves``, the oldest ``n`` at least ``cooldown`` old.

    ``sessions`` maps a key to ``[(started, session), ...]``. Returns ``(chosen, short)``:
    the sessions, and how many more the plan wanted that were still too young.
    """
    chosen: list = []
    short = 0
    for key, count in moves.items():
        eligible = sorted((item for item in sessions.get(key, ()) if now - item[0] >= cooldown),
                          key=lambda item: item[0])
        taken = eligible[:count]
        chosen.extend(session for _, session in taken)
        short += count - len(taken)
    return chosen, short


def next_eligible(sessions, now, cooldown):
    """Seconds until the next session in ``sessions`` (as for choose_sessions) comes of age; None if none."""
    waits = [started + cooldown - now for items in sessions.values() for started, _ in items
             if now - started < cooldown]
    return max(0.0, min(waits)) if waits else None


class _RebalanceClose:
    """What ``close_spread`` closes: one session, counted on the balancer when it is really closed."""

    __slots__ = ("session", "rebalancer")

    def __init__(self, session, rebalancer):
        self.session, self.rebalancer = session, rebalancer

    def close(self, code, reason):
        self.rebalancer.balancer.rebalance_closes += 1
        self.session.close(code, reason, cause=CAUSE)


class Rebalancer:
    """The balancer's rebalancing loop; ``trigger()`` asks for a look, ``run_once()`` does one."""

    def __init__(self, balancer, rng=None):
        self.balancer = balancer
        settings = balancer.settings.glb
        self.automatic = settings.rebalance
        self.threshold = settings.rebalance_threshold
        self.rate = settings.rebalance_rate
        self.cooldown = settings.rebalance_cooldown
        self.rng = rng or random.Random()
        self._wanted = Event()
        self.idle = Event()  # set while nothing is asked for or under way
        self.idle.set()
        self._loop = None
        self.running = False  # a pass is closing sessions
        self._watching = False
        if self.automatic:
            self.watch_pool()

    def watch_pool(self):
        """Look at the pool whenever a backend becomes ready (connected once, when first automatic)."""
        if not self._watching:
            self._watching = True
            self.balancer.bus.add_handler("server_ready", lambda event: self.pool_changed(),
                                          origin="glb.rebalance")

    def start(self):
        self._loop = gevent.spawn(self._run_forever)
        return self

    def stop(self):
        if self._loop is not None:
            self._loop.kill(block=False)

    def pool_changed(self):
        """A backend became ready, came back, was undrained or reweighted: look, if automatic."""
        if self.automatic:
            self.trigger()

    def trigger(self):
        """Look at the pool soon (several triggers close together make one look)."""
        self.idle.clear()
        self._wanted.set()

    # -- deciding -------------------------------------------------------------------------------

    def snapshot(self):
        """``(loads, sessions)`` for plan_moves/choose_sessions, keyed by Backend."""
        pool = [b for b in self.balancer.registry.all()
                if b.state == READY and b.health == UP and b.bindings]
        sessions: dict = {backend: [] for backend in pool}
        for session in list(self.balancer.client_sessions):
            items = sessions.get(session.backend)
            if items is not None and session.outcome is None and session.client is not None:
                items.append((session.conn.started, session))
        loads = {backend: (backend.weight, len(items)) for backend, items in sessions.items()}
        return loads, sessions

    def plan(self):
        """What one pass would do now: ``(moves {Backend: n}, sessions to close, too young)``."""
        loads, sessions = self.snapshot()
        moves = plan_moves(loads, self.threshold)
        chosen, short = choose_sessions(sessions, moves, time.monotonic(), self.cooldown)
        return moves, chosen, short, sessions

    # -- acting ---------------------------------------------------------------------------------

    def run_once(self):
        """One pass: close the chosen sessions at ``rate`` per second with jitter; how many closed.

        Returns ``(closed, retry_in)``: retry_in is the seconds until sessions now too young
        may move, when the plan wanted more than it could take (else None).
        """
        moves, chosen, short, sessions = self.plan()
        if not moves:
            return 0, None
        log.info("= rebalancing: moving %d session(s) off %s", len(chosen),
                 ", ".join(f"{backend.name} ({n})" for backend, n in moves.items()))
        closed = 0
        if chosen:
            self.running = True
            try:
                closed = close_spread([_RebalanceClose(s, self) for s in chosen],
                                      CloseCode.SERVICE_RESTART, REASON, len(chosen) / self.rate,
                                      rng=self.rng, is_open=lambda item: item.session.outcome is None,
                                      paced=True)
            finally:
                self.running = False
        retry = next_eligible({b: sessions[b] for b in moves}, time.monotonic(), self.cooldown) \
            if short else None
        return closed, retry

    def _run_forever(self):
        retry = None
        while not self.balancer.stopping:
            if retry is None and not self._wanted.is_set():
                self.idle.set()
            self._wanted.wait(timeout=retry)
            self.idle.clear()
            gevent.sleep(SETTLE)
            self._wanted.clear()
            closed, retry = self.run_once()
            if closed:  # look again once the moved clients had time to come back
                retry = min(retry, LOOK_AGAIN) if retry is not None else LOOK_AGAIN
            elif retry is not None:
                retry += SETTLE
