"""Closing many connections over a window instead of all at once.

Drain, rebalancing and the hand-over to a new process all close sessions so
that their clients reconnect elsewhere. Closed together, those clients would
come back as one thundering herd; closed each at its own random moment within
a window, they arrive spread out. The schedule is a plain function (tested
without sockets); ``close_spread`` runs it in the caller's greenlet.
"""

import random
import time

import gevent


def spread_delays(count, window, rng=random, paced=False):
    """``count`` sorted delays, uniformly at random in ``[0, window)``; all 0 for no window.

    ``paced``: the window is cut into ``count`` equal slots and each delay is random within
    its own slot, so no stretch of the window gets more than its share (a rate limit with jitter).
    """
    if window <= 0:
        return [0.0] * count
    if paced:
        slot = window / count
        return [(i + rng.random()) * slot for i in range(count)]
    return sorted(rng.uniform(0, window) for _ in range(count))


def close_spread(connections, code, reason, window, rng=random, is_open=None, paced=False):
    """Close each connection with ``(code, reason)`` at its own random time within ``window`` seconds.

    Runs until the last one is closed (call it in a greenlet you own); ``paced`` as
    for ``spread_delays``. A connection that ended on its own before its turn is
    skipped (``is_open(conn)`` says; by default every connection is closed).
    Returns how many were closed.
    """
    connections = list(connections)
    rng.shuffle(connections)
    start = time.monotonic()
    closed = 0
    for delay, conn in zip(spread_delays(len(connections), window, rng, paced), connections):
        wait = start + delay - time.monotonic()
        if wait > 0:
            gevent.sleep(wait)
        if is_open is not None and not is_open(conn):
            continue
        try:
            conn.close(code, reason)
        except Exception:  # a connection already broken is closed as far as we care
            pass
        closed += 1
    return closed
