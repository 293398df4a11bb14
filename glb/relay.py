"""Client sessions: a downstream client paired with a backend, frames relayed both ways.

Three parts, each in its own module:

    glb.pairing   picks a backend and opens its WebSocket before the client's 101 (retrying)
    glb.engine    moves the bytes both ways (raw or decoded, on io watchers or pumps)
    glb.closing   the closing handshake as a socket-free state object: who ended the
                  session and which close each leg is owed (its docstring has the table)

``ClientSession`` ties them together for one client: it starts the engine, ends
the session exactly once (freeing the backend's slot and firing
``client_disconnect``), writes glb's own messages to the client between relayed
ones, and keeps quiet legs alive. Its legs are ``glb.legs.Leg`` objects, one
for the client and one for the backend.
"""

import logging
import time

from gevent.event import Event

from glb.closing import ClosingHandshake
from glb.connection import CLIENT
from glb.engine import RelayEngine, send_closes
from glb.errors import CloseCode, ConnectionClosed
from glb.frames import OP_BINARY, OP_CLOSE, OP_PING, OP_TEXT, encode_frame
from glb.handshake import Rejection
from glb.legs import Leg
from glb.pairing import pair
from glb.stats import Figures
from glb.websocket import is_tls

log = logging.getLogger("glb.relay")

SEND_BETWEEN_TIMEOUT = 1.0  # seconds glb's own message waits for the relayed stream to reach a boundary


class ClientSession:
    """A client paired with a backend; ``run()`` relays until either side ends."""

    kind = CLIENT

    # thousands live at once: no per-instance __dict__
    __slots__ = ("balancer", "bus", "conn", "backend", "response_headers", "upstream", "client",
                 "backend_leg", "closing", "engine", "_ended", "_relayed")

    def __init__(self, balancer, conn, backend, upstream, response_headers):
        self.balancer = balancer
        self.bus = balancer.bus
        self.conn = conn
        self.backend = backend  # the registry's entry
        self.response_headers = response_headers
        self.upstream = upstream
        self.client = None  # its Leg, once the client's 101 is written
        self.backend_leg = Leg.backend(upstream)
        self.closing = ClosingHandshake(None, self.backend_leg)
        self.engine = None
        self._ended = False
        self._relayed = None  # set when the relay is done, for a TLS client's accepting greenlet

    @classmethod
    def prepare(cls, balancer, conn, environ):
        """Pair ``conn`` with a backend: a session ready to run, or the Rejection for the client."""
        paired = pair(balancer, conn, environ)
        if isinstance(paired, Rejection):
            return paired
        return cls(balancer, conn, paired.backend, paired.upstream, paired.response_headers)

    def abandon(self, reason):
        """The client's 101 could not be written: let the backend go."""
        log.info("! %s session abandoned: %s", self.conn.id, reason)
        self.backend_leg.send_close(CloseCode.GOING_AWAY, "client went away")
        self.upstream.abort()
        self.balancer.registry.session_ended(self.backend)

    # -- running -------------------------------------------------------------

    def start(self):
        """Relay until the session ends, then tell the balancer (once), from whichever greenlet ends it.

        A plain client's relay goes on in io watchers after this returns. A TLS
        client's socket belongs to the greenlet that accepted it (closed when it
        returns), so that greenlet waits here until the relay is done.
        """
        settings = self.balancer.settings.glb
        client_ws = self.conn.websocket
        client_ws.auto_pong = False
        client_ws.send_timeout = settings.send_timeout
        self.client = self.closing.client = Leg.client(client_ws)
        self.response_headers = ()  # written with the 101: not kept for the session's life
        self.client.other, self.backend_leg.other = self.backend_leg, self.client
        self.engine = RelayEngine(self, settings.max_message_size, self.upstream.close_timeout)
        self.balancer.client_sessions.add(self)
        relaying = False  # the io watchers own the session's end
        try:
            self.bus.fire(self.bus.client_connect, connection=self.conn, session=self, backend=self.backend)
            if self.closing.outcome is None:  # a client_connect handler may have closed the session
                if is_tls(client_ws.sock):
                    self._relayed = Event()
                    self.engine.run()
                    self._relayed.wait()
                else:
                    self.engine.run()
                    relaying = True
        except Exception as exc:
            self.balancer.session_failed(self.conn, exc)
        finally:
            if not relaying:
                self._end()

    def relayed(self):
        """The engine is done (both directions): end the session, or wake the TLS client's greenlet."""
        if self._relayed is not None:
            self._relayed.set()
        else:
            self._end()

    def _end(self):
        self._finish()
        self.balancer.end_session(self.conn, self)

    def _finish(self):
        """The session is over: free the backend's slot and fire ``client_disconnect`` (once)."""
        if self._ended:
            return
        self._ended = True
        self.balancer.client_sessions.discard(self)
        for leg in (self.client, self.backend_leg):
            if leg is None:  # the client's 101 was never written
                continue
            leg.wake()
            try:
                leg.sock.close()
            except OSError:
                pass
        self.balancer.registry.session_ended(self.backend)
        code, reason, closed_by = self.closing.status
        self.balancer.stats.session_ended(self.backend.name, self.figures(), code, closed_by,
                                          time.monotonic() - self.conn.started)
        self.bus.fire(self.bus.client_disconnect, connection=self.conn, session=self, backend=self.backend,
                      code=code, reason=reason, closed_by=closed_by)

    def figures(self):
        """Messages and bytes relayed each way so far, frame headers included (read, never stored).

        A raw direction is counted by the scanner of the leg it writes, a decoded one on its
        source leg; both are added.
        """
        client, backend = self.client, self.backend_leg
        if client is None:  # not relaying yet
            return Figures()
        up, down = backend.out_scanner, client.out_scanner
        return Figures(client.messages + (up.messages if up else 0), client.bytes + (up.bytes_seen if up else 0),
                       backend.messages + (down.messages if down else 0),
                       backend.bytes + (down.bytes_seen if down else 0))

    @property
    def outcome(self):
        """``(code, reason, closed_by)`` once the session is ending, else None."""
        return self.closing.outcome

    @property
    def close_status(self):
        code, reason, _ = self.closing.status
        return code, reason

    def close(self, code=CloseCode.GOING_AWAY, reason="going away", cause=None):
        """glb ends the session (shutdown, idle or ping timeout, a handler): both legs get the close.

        ``cause``, when given, is the reason ``client_disconnect`` reports instead of ``reason``
        (rebalancing sends "service restart" on the wire and reports "rebalance").
        """
        owed = self.closing.glb_closes(code, reason, cause)
        if self.client is not None:
            send_closes(owed)

    def end_now(self):
        """Shutdown could not wait: end both legs; the relay then finishes by itself."""
        if self.engine is not None:
            self.engine.end_now()

    # -- glb's own messages to the client (glb.broadcast.write_data / ping) --

    def send(self, message):
        """``Connection.send`` for a relayed client: a whole message, between relayed ones."""
        return self.client is not None and self.send_to_client(message, SEND_BETWEEN_TIMEOUT)

    def send_to_client(self, message, timeout=1.0, opcode=None):
        """Write one whole message of glb's own to the client, between relayed frames; True if written.

        ``message`` str is sent as text, bytes as binary, or as a ping with ``opcode=OP_PING``.
        A data message waits until the relayed stream is between two messages (never inside a
        fragmented one, in raw and decoded mode alike), a ping only until it is between two
        frames; the engine signals each boundary it reaches. False after ``timeout`` seconds;
        raises ConnectionClosed once the session has ended.
        """
        if isinstance(message, str):
            payload, op = message.encode("utf-8"), OP_TEXT
        else:
            payload, op = bytes(message), OP_BINARY
        op = op if opcode is None else opcode
        frame = encode_frame(op, payload, mask=False)
        deadline = time.monotonic() + timeout
        while True:
            leg = self.client
            if self.closing.outcome is not None or (leg is not None and leg.ws.closed):
                raise ConnectionClosed(*self.close_status)
            if leg is None:
                return False
            if leg.ws.send_between(frame, leg.between_frames if op >= OP_CLOSE else leg.between_messages):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            leg.wait_boundary(remaining)

    # -- keep-alive (called by the balancer's sweeper) -----------------------

    def keep_alive(self, now, ping_interval, ping_timeout, idle_timeout):
        """Ping a quiet leg, close a leg that did not answer, or end an idle session."""
        if self.client is None or self.closing.outcome is not None:
            return
        legs = (self.client, self.backend_leg)
        for leg in legs:
            leg.stamp_activity(now)
        # A leg blocked in a send is streaming, not idle: send_timeout judges it (1008, slow reader).
        if idle_timeout and now - max(leg.last_activity for leg in legs) > idle_timeout \
                and not any(leg.ws.sending for leg in legs):
            self.close(CloseCode.GOING_AWAY, "idle timeout")
            return
        if not ping_interval:
            return
        for leg in legs:
            if leg.ping_sent is not None and not leg.answered_since(leg.ping_sent):
                if now - leg.ping_sent > ping_timeout:
                    self.balancer.report_error(self.conn, f"{leg.name} did not answer a keep-alive ping")
                    self.close(CloseCode.INTERNAL_ERROR, f"{leg.name} keep-alive ping timed out")
                    return
            elif now - max(leg.last_activity, leg.last_pong) > ping_interval:
                frame = encode_frame(OP_PING, b"glb", mask=leg.masks)
                try:
                    if leg.ws.send_between(frame, leg.between_frames):
                        leg.ping_sent = now
                except ConnectionClosed:
                    pass
                leg.wake()
