"""Broadcast across backends: per-channel outboxes, and glb's own ``broadcast``/``write_data``/``ping``.

A backend's broadcast envelope (docs/protocol.md) reaches glb on its control channel;
``ControlSession`` parses it, fires ``message``/``binary`` and, unless handled,
calls :func:`fan_out`. glb's own API (``Balancer.broadcast``, ``write_data``,
``ping``, one-liners delegating here) ends in the same place.

Rules, in one place::

    who gets an envelope     every control channel whose backend is READY or DRAINING, the sender
                             included; CONNECTING ones (server data, no ready marker yet) get nothing;
                             after a route record (glb@broadcast@to) only the listed ones of those
    how                      encoded once into one WebSocket frame (glb is the server side: unmasked,
                             so the same bytes suit every channel); the frame is put on each channel's
                             Outbox without blocking; one writer greenlet per channel sends it
    order                    per channel, frames leave in the order they were queued, so the
                             envelopes of one sender reach every backend in the order sent
    a slow backend           its Outbox holds [backends] max_outbox_bytes of frames (one frame of any
                             size fits an empty one); a put beyond that closes the channel with 1008
                             "slow consumer" and drops the frame (at most once); the sender and every
                             other channel carry on
    delivery                 at most once: nothing is retried, acknowledged or replayed after a
                             reconnect; an envelope queued for a channel that closes is lost

Draining backends get envelopes: DRAINING only stops *new* clients from being paired
with a backend, its existing clients stay connected for as long as the drain takes,
and a chat room or price feed must keep reaching them meanwhile.

Two namespaces, never mixed: ``write_data(id, message)`` addresses glb's own connections
(``Connection.id``): a client session gets the message between two relayed frames
(``ClientSession.send_to_client``), a control channel through its Outbox, any other own
session directly. ``write_backend_client(id, message)`` addresses a backend's client: a text
envelope with ``guid=<id>`` (a binary one with target ``<id>``) goes to every ready backend,
and the backend holding that client delivers it.
"""

import logging

import gevent
from gevent.queue import Empty, Queue

from glb import control_records
from glb.connection import CLIENT, CONTROL
from glb.errors import CloseCode, ConnectionClosed
from glb.frames import OP_BINARY, OP_PING, OP_TEXT, encode_frame
from glb.registry import DRAINING, READY

log = logging.getLogger("glb.broadcast")

# States whose channels receive envelopes (see the module docstring for why DRAINING is in).
RELAY_STATES = frozenset({READY, DRAINING})
BATCH_BYTES = 256 * 1024  # a writer joins queued frames into one write up to about this many bytes
SLOW_CONSUMER = "slow consumer"
CLOSE_WAIT = 2.0          # seconds a slow consumer gets to answer its close before TCP is cut
PING_PAYLOAD = b"glb"


class Outbox:
    """One control channel's outbound queue, bounded in bytes, and the greenlet that writes it, in order.

    Owned by its ``ControlSession``: ``start()`` when the channel runs, ``stop()`` in the
    session's ``finally``. ``put`` never blocks; a full queue closes the channel with 1008.
    Bytes, not frames, bound it: 4096 frames of 16 MiB would be 64 GiB held for one stuck backend.
    """

    def __init__(self, balancer, conn, max_bytes=None):
        self.balancer = balancer
        self.conn = conn
        self.queue = Queue()
        self.max_bytes = max_bytes or balancer.settings.backends.max_outbox_bytes
        self.queued_bytes = 0  # what the queue holds now (frames taken by the writer excluded)
        self.overflowed = False
        self._writer = None
        self._closer = None

    def __repr__(self):
        return (f"<Outbox {self.conn.id} {self.queue.qsize()} frames, {self.queued_bytes} bytes queued"
                f"{' overflowed' if self.overflowed else ''}>")

    def start(self):
        self._writer = gevent.spawn(self._write_all)
        return self

    def stop(self):
        """End the writer (and a slow-consumer close still under way); what is queued is dropped."""
        for greenlet in (self._writer, self._closer):
            if greenlet is not None and greenlet is not gevent.getcurrent():
                greenlet.kill(block=False)

    def put(self, frame):
        """Queue one encoded frame; False if it was dropped (the channel is a slow consumer)."""
        if self.overflowed:
            return False
        if self.queued_bytes and self.queued_bytes + len(frame) > self.max_bytes:
            self.overflowed = True
            self._closer = gevent.spawn(self._close_slow)
            return False
        self.queued_bytes += len(frame)
        self.queue.put_nowait(frame)
        return True

    def _write_all(self):
        queue = self.queue
        ws = self.conn.websocket
        while True:
            frame = queue.get()
            self.queued_bytes -= len(frame)
            if queue.qsize():  # a backlog: one write for many frames
                parts, size = [frame], len(frame)
                while size < BATCH_BYTES:
                    try:
                        frame = queue.get_nowait()
                    except Empty:
                        break
                    self.queued_bytes -= len(frame)
                    parts.append(frame)
                    size += len(frame)
                frame = b"".join(parts)
            try:
                ws.send_raw(frame)
            except ConnectionClosed as exc:
                # The channel's own greenlet sees the close and cleans up.
                log.debug("! %s outbox writer ends: %s", self.conn.id, exc)
                return

    def _close_slow(self):
        self.balancer.report_error(
            self.conn, f"{SLOW_CONSUMER}: {self.queued_bytes} bytes queued (max_outbox_bytes "
                       f"{self.max_bytes}); closing with 1008")
        try:
            # Waits for the writer's current write at most CLOSE_WAIT s, then cuts TCP; 1008 stays the cause.
            self.conn.websocket.close(CloseCode.POLICY_VIOLATION, SLOW_CONSUMER, wait=CLOSE_WAIT)
        except Exception:  # closing a broken connection is not news
            log.debug("= %s close failed", self.conn.id, exc_info=True)


def encode_message_frame(message):
    """The unmasked WebSocket frame (server side) for a message: str as text, bytes as binary."""
    if isinstance(message, str):
        return encode_frame(OP_TEXT, message.encode("utf-8"), mask=False)
    if isinstance(message, (bytes, bytearray, memoryview)):
        return encode_frame(OP_BINARY, bytes(message), mask=False)
    raise TypeError(f"a message is str or bytes, not {type(message).__name__}")


def relays_to(session):
    """Whether the control channel ``session`` should receive envelopes now."""
    backend = session.registration.backend
    return backend is not None and backend.state in RELAY_STATES and session.outbox is not None


def relay_targets(balancer, backends=None):
    """The Outboxes of every control channel whose backend should receive envelopes now
    (of the guids in ``backends`` only, when given)."""
    channels = balancer.control_channels
    if backends is None:
        sessions = channels.values()
    else:
        sessions = [channels[guid] for guid in dict.fromkeys(backends) if guid in channels]
    return [session.outbox for session in sessions if relays_to(session)]


def fan_out(balancer, envelope, backends=None):
    """Queue an encoded envelope (str or bytes, sent unchanged) for every ready backend (of the
    guids in ``backends`` only, when given: a route from the sender); how many took it."""
    frame = encode_message_frame(envelope)
    targets = relay_targets(balancer, backends)
    taken = sum(outbox.put(frame) for outbox in targets)
    balancer.stats.broadcast_fanned_out(len(targets) - taken)
    return taken


# -- glb's own API (Balancer.broadcast / write_data / ping delegate here) -------------------------

def broadcast(balancer, message: str | bytes, channel: str = "", protocol: str = "", include: str = "",
              exclude: str = "") -> int:
    """Send ``message`` to the clients of every ready backend, as an envelope through the backends.

    ``message`` str: a text envelope with the filters (``include``/``exclude``: comma-separated
    ids or a list). bytes: a binary envelope, which has no room for filters (RecordError if
    any is given). Returns how many backends the envelope was queued for (0: none ready).
    """
    if isinstance(message, str):
        envelope = control_records.encode_text_envelope(message, "", channel, protocol, include, exclude)
    else:
        if channel or protocol or include or exclude:
            raise control_records.RecordError(
                "binary envelope: only a target id fits; channel, protocol, include and exclude are text only")
        envelope = control_records.encode_binary_envelope("", message)
    return fan_out(balancer, envelope)


def write_data(balancer, connection_id: str, message: str | bytes) -> int:
    """Send ``message`` (str or bytes) to one of glb's own connections (``Connection.id``); 1 if written.

    Only glb's ids: a backend's client ids are another namespace (``write_backend_client``), so
    a backend whose client ids look like glb's can never receive or divert glb's messages.
    0 when there is no such connection, it is closed, its relayed stream stayed mid-frame for
    relay.SEND_BETWEEN_TIMEOUT, or its Outbox is full.
    """
    conn = balancer.connections.get(connection_id)
    if conn is None:
        log.debug("! write_data: no connection %s", connection_id)
        return 0
    try:
        written = conn.send(message)
    except ConnectionClosed as exc:
        log.debug("! %s write_data: %s", conn.id, exc)
        return 0
    if not written:
        log.debug("! %s write_data: not written", conn.id)
    return int(written)


def write_backend_client(balancer, client_id, message):
    """Send ``message`` to the client ``client_id`` of whichever backend holds it; how many backends took it.

    An addressed envelope (text: ``guid=<id>``; binary: target ``<id>``) goes to every ready
    backend, and the backend holding that client delivers it. 0 when no backend is ready.
    """
    if isinstance(message, str):
        envelope = control_records.encode_text_envelope(message, guid=client_id)
    else:
        envelope = control_records.encode_binary_envelope(client_id, message)
    return fan_out(balancer, envelope)


def ping(balancer) -> int:
    """Ping every WebSocket glb accepted (client sessions, control channels, own sessions); how many.

    A client session whose relayed stream is mid-frame at that moment is skipped (it is
    evidently alive); a control channel's ping waits in its Outbox behind queued envelopes.
    The keep-alive sweeper pings backend legs of client sessions on its own schedule.
    """
    frame = encode_frame(OP_PING, PING_PAYLOAD, mask=False)
    pinged = 0
    for conn in list(balancer.connections.values()):
        session = conn.session
        try:
            if conn.kind == CLIENT:
                done = session.send_to_client(PING_PAYLOAD, timeout=0, opcode=OP_PING)
            elif conn.kind == CONTROL and getattr(session, "outbox", None) is not None:
                done = session.outbox.put(frame)
            else:
                done = conn.websocket.send_between(frame, _always)
        except ConnectionClosed:
            done = False
        pinged += bool(done)
    return pinged


def _always():
    return True
