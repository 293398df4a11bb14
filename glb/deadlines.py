"""Deadlines for socket waits on the plain-HTTP path, kept by one sweeper greenlet.

A gevent socket with a timeout makes, starts and cancels a ``Timeout`` (a
Python object and a libev timer) for every wait that blocks: a large share of a
proxied request's cost. The HTTP path's sockets have no timeout instead; a
greenlet ``arm``s a deadline before a call that may block and ``disarm``s it
after (``with DEADLINES.armed(seconds):``). The sweeper wakes every ``TICK`` s
while any deadline is armed and throws ``TimeoutError`` into a greenlet whose
deadline has passed, so a deadline fires at most ``TICK`` s late. It ends when
nothing is armed and starts again with the next ``arm``.
"""

import time

import gevent
from gevent import getcurrent

TICK = 0.05


class Deadlines:
    """Greenlet -> deadline of the socket wait it is in (or about to be in)."""

    def __init__(self, tick=TICK):
        self.tick = tick
        self.waits = {}  # greenlet -> (monotonic deadline,): a new tuple per arm, compared by identity
        self._sweeper = None

    def arm_at(self, deadline):
        """Throw TimeoutError into the current greenlet if it is still armed at ``deadline``."""
        self.waits[getcurrent()] = (deadline,)
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep)

    def arm(self, seconds):
        self.arm_at(time.monotonic() + seconds)

    def disarm(self):
        self.waits.pop(getcurrent(), None)

    def _sweep(self):
        waits = self.waits
        try:
            while waits:
                gevent.sleep(self.tick)
                now = time.monotonic()
                expired = [(glet, entry) for glet, entry in waits.items() if entry[0] <= now]
                if expired:
                    run_callback = gevent.get_hub().loop.run_callback
                    for glet, entry in expired:
                        run_callback(self._expire, glet, entry)
        finally:
            self._sweeper = None

    def _expire(self, glet, entry):
        """In the hub: the greenlet is still in the wait it armed ``entry`` for, so the throw lands there."""
        if self.waits.get(glet) is entry:
            del self.waits[glet]
            if not glet.dead:
                glet.throw(TimeoutError("timed out"))


DEADLINES = Deadlines()
