"""Tell subscribed agents which backends this glb relays broadcasts to (glb's extension).

An agent registered with several glbs covers every backend exactly once only if it knows
which backends each glb holds (glb.agent). A backend that lists ``glb@lb@ready`` in its
server data's ``subscribe`` gets, once it is ready, the guids this glb relays envelopes to
(``{"method":"glb@lb@ready","ready":[...]}``), then every change as
``{"method":"glb@lb@ready","joined":[...],"left":[...]}``, applied in order.

A churning pool cannot flood the hub or the channels: changes are coalesced and pushed at
most once per ``PUSH_INTERVAL``, as one frame encoded once for every subscriber, and a push
carries only what joined or left since the last one (what a guid did in between cancels
out). The frames go through each channel's Outbox, behind the envelopes already queued, so
a subscriber that stops reading is closed as a slow consumer like any other. Backends that
did not subscribe (sgc backends) never see any of it.
"""

import time

import gevent

from glb import broadcast, control_records
from glb.control_records import ReadySet

PUSH_INTERVAL = 0.1  # seconds: at most one push per interval, however fast the pool changes


class ReadySetPublisher:
    """The relayed set as last told to subscribers, and the greenlet that tells them what changed.

    Owned by the Balancer (``stop()`` when it stops); control channels call ``subscribe``
    when a subscribed backend becomes ready, ``unsubscribe`` when it leaves, and ``changed``
    whenever a backend joins or leaves the relay.
    """

    def __init__(self, balancer, interval=PUSH_INTERVAL):
        self.balancer = balancer
        self.interval = interval
        self.subscribers = set()      # ControlSessions told about changes
        self.published = frozenset()  # the set every subscriber knows (after its pushes arrive)
        self._last_push = float("-inf")
        self._pending = None          # the greenlet that makes the next push

    def __repr__(self):
        return f"<ReadySetPublisher {len(self.published)} relayed, {len(self.subscribers)} subscribers>"

    def current(self):
        """The guids envelopes are relayed to now (as ``broadcast.fan_out`` sees them)."""
        channels = getattr(self.balancer, "control_channels", {})
        return frozenset(guid for guid, session in channels.items() if broadcast.relays_to(session))

    def subscribe(self, session):
        """Send ``session`` the published set, then the changes from there on."""
        if not self.subscribers and self._pending is None:
            self.published = self.current()  # nobody has been told anything: start from now
        self.subscribers.add(session)
        session.send(control_records.encode_record(ReadySet(ready=tuple(sorted(self.published)))))
        self.changed()

    def unsubscribe(self, session):
        self.subscribers.discard(session)

    def changed(self):
        """A backend joined or left the relay: push the change at the next allowed moment."""
        if self.subscribers and self._pending is None:
            delay = max(0.0, self._last_push + self.interval - time.monotonic())
            self._pending = gevent.spawn_later(delay, self._push)

    def _push(self):
        self._pending = None
        self._last_push = time.monotonic()
        now = self.current()
        joined, left = now - self.published, self.published - now
        self.published = now
        if not (joined or left):
            return
        frame = broadcast.encode_message_frame(control_records.encode_record(
            ReadySet(joined=tuple(sorted(joined)), left=tuple(sorted(left)))))
        for session in list(self.subscribers):
            if session.outbox is not None:
                session.outbox.put(frame)

    def stop(self):
        if self._pending is not None:
            self._pending.kill(block=False)
            self._pending = None
