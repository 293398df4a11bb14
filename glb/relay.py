"""Client sessions: a downstream client paired with a backend, frames relayed both ways.

Pairing happens before the client's 101: glb opens the backend WebSocket
first (same path and query, end-to-end headers, X-Forwarded-*), so the client
sees what the backend decided: its subprotocol, its refusal status, or 502/503.

Each direction reads one leg and writes the other, in one of two modes chosen
per direction when the session starts:

    raw      no handler needs the payload: received chunks are forwarded as they
             are (client frames stay masked, backend frames unmasked); a
             FrameScanner follows frame boundaries to see close frames and
             enforce max_message_size. No unmasking, decoding or copying.
    decoded  a handler listens to raw_message / client_message / client_binary /
             client_fragmented: frames are read, events fired, and what is left
             is re-encoded for the other leg.

Where it runs: a plain session with both directions raw parks no greenlet while
idle. One persistent io watcher per socket wakes a short step (receive, scan,
forward) run on a shared worker greenlet; a step that must wait (a full send
buffer, a close) simply blocks its worker while further events for the session
queue behind it. Otherwise (TLS legs, a decoded direction) each direction is a
*pump*: one in the session greenlet, one in a greenlet of its own.

How a session ends (first cause wins; ``client_disconnect`` carries it)::

    cause                               code / reason             closed_by  the other leg gets
    client sends close (c, r)           c, r                      client     (c, r) forwarded
    backend sends close (c, r)          c, r                      backend    (c, r) forwarded
    client vanishes (EOF, no close)     1006                      client     1001 "client went away"
    backend vanishes (EOF, no close)    1014 "backend went away"  backend    client gets 1014
    message too big from one side       1009                      glb        1001 (client) / 1014 (backend)
    protocol error from one side        passed on: the other peer fails the connection as it would
                                        without glb (decoded pumps: 1002 / 1007 from glb itself)
    glb closes (shutdown, idle, ping)   its code                  glb        the same, both legs

The closing handshake is completed on both legs: glb closes the client's TCP
connection once a close frame went each way on that leg (it is the server
there), and waits for the backend to close its TCP connection (bounded).
"""

import logging
import time
from functools import partial

import gevent
from greenlet import getcurrent, greenlet

from glb.connection import CLIENT
from glb.errors import CloseCode, ConnectionClosed, HandshakeFailed, MessageTooBig, Status
from glb.frames import (OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
                        FrameScanner, encode_close_payload, encode_frame, frame_size)
from glb.stats import Figures
from glb.handshake import Rejection, header_tokens
from glb.websocket import TURN_BYTES, connect, is_tls, wait_readable, yield_turn

log = logging.getLogger("glb.relay")

SEND_BETWEEN_TIMEOUT = 1.0  # seconds glb's own message waits for the relayed stream to reach a boundary
DETACHED = "detached"  # run() returned with the session still relaying, on io watchers

RECV_SIZE = 65536

# Request headers that belong to one hop (RFC 9110 §7.6.1) or to glb's own handshake with the client.
NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization",
    "proxy-connection", "host", "sec-websocket-key", "sec-websocket-version", "sec-websocket-accept",
    # the relay forwards frames as they are, so it can honour no extension (permessage-deflate would
    # need both legs to agree and handlers could not read compressed payloads)
    "sec-websocket-extensions",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
})
# Backend 101 response headers that reach the client; the rest belongs to that handshake.
PASSED_101_HEADERS = frozenset({"sec-websocket-protocol", "set-cookie", "cache-control"})


def forwarded_headers(conn, environ):
    """The headers the backend handshake carries: the client's end-to-end ones plus X-Forwarded-*."""
    headers = [(name, value) for name, value in conn.headers.items()
               if name.lower() not in NOT_FORWARDED and not name.lower().startswith("proxy-")]
    hop = header_tokens(environ.get("HTTP_CONNECTION", ""))
    headers = [(name, value) for name, value in headers if name.lower() not in hop]
    prior = environ.get("HTTP_X_FORWARDED_FOR")
    headers.append(("X-Forwarded-For", f"{prior}, {conn.peer_ip}" if prior else conn.peer_ip))
    headers.append(("X-Forwarded-Proto", "https" if conn.secure else "http"))
    headers.append(("X-Forwarded-Host", environ.get("HTTP_HOST", "")))
    return headers


def target_of(environ):
    path = environ.get("PATH_INFO", "/") or "/"
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


class Leg:
    """One side of a session: its WebSocket and what the closing handshake has done on it."""

    __slots__ = ("name", "ws", "mask", "close_in", "close_out", "last_activity", "last_pong", "ping_sent",
                 "messages", "bytes")

    def __init__(self, name, ws, mask):
        self.name = name  # "client" or "backend"
        self.ws = ws
        self.mask = mask  # glb masks what it writes on the backend leg
        self.close_in = None  # (code, reason) of the close frame this peer sent
        self.close_out = False  # a close frame was written to this peer
        self.last_activity = time.monotonic()  # anything but a pong received from this peer
        self.last_pong = 0.0
        self.ping_sent = None  # when glb's last keep-alive ping went to this peer
        # Received from this peer where no raw scanner counts them (decoded frames, blind forwarding)
        self.messages = 0
        self.bytes = 0

    def answered_since(self, moment):
        return self.last_activity >= moment or self.last_pong >= moment

    @property
    def sock(self):
        return self.ws.sock

    def send_close(self, code, reason, at_boundary=lambda: True):
        """Write a close frame if none went yet and the stream is between frames; else drop TCP."""
        if self.close_out:
            return
        self.close_out = True
        frame = encode_frame(OP_CLOSE, encode_close_payload(code, reason), mask=self.mask)
        try:
            if not at_boundary():
                raise ConnectionClosed(CloseCode.ABNORMAL, "mid-frame")
            self.ws.send_raw(frame, close=(code, reason))
        except ConnectionClosed:
            self.shutdown()

    def shutdown(self):
        """End the TCP connection; a pump reading it sees EOF."""
        try:
            self.sock.shutdown(2)
        except OSError:
            pass


class ClientSession:
    """A client paired with a backend; ``run()`` relays until either side ends."""

    kind = CLIENT

    # thousands live at once: no per-instance __dict__
    __slots__ = ("balancer", "bus", "conn", "backend", "response_headers", "upstream", "client",
                 "server", "outcome", "scanners", "_ended", "up_running", "_directions", "_busy",
                 "_waiting", "_timer", "_watchers")

    def __init__(self, balancer, conn, backend, upstream, response_headers):
        self.balancer = balancer
        self.bus = balancer.bus
        self.conn = conn
        self.backend = backend
        self.response_headers = response_headers
        self.upstream = upstream
        self.client = None  # Leg, once the client's 101 is written
        self.server = Leg("backend", upstream, mask=True)
        self.outcome = None  # (code, reason, closed_by)
        self.scanners = {}  # leg name -> FrameScanner of the raw pump *writing* that leg
        self._ended = False
        self.up_running = False
        self._directions = set()  # raw relay: the source legs still being read
        self._busy = False  # a step is running on a worker
        self._waiting = None  # events that came while it ran (a list, once relaying raw)
        self._timer = None
        self._watchers = {}  # leg -> its io watcher

    # -- pairing -----------------------------------------------------------

    @classmethod
    def prepare(cls, balancer, conn, environ):
        settings = balancer.settings.glb
        if "websocket" not in settings.protocols:
            return Rejection(Status.NOT_FOUND, "WebSocket sessions are turned off here")
        request = balancer.pick_request(environ)
        headers = forwarded_headers(conn, environ)
        target = target_of(environ)
        tried = []
        for _ in range(1 + settings.backend_retries):
            backend = balancer.pick_backend(request, exclude=tried)
            if backend is None:
                break
            tried.append(backend)
            # Counted from the pick, not from the backend's 101: sessions arriving together
            # (a reconnect wave) see each other and least-loaded placement spreads them.
            balancer.registry.session_started(backend)
            try:
                upstream, _, answer = connect(
                    backend.binding_url(target), headers=headers,
                    timeout=settings.backend_connect_timeout,
                    ssl_context=balancer.backend_ssl_context(),
                    max_message_size=settings.max_message_size)
            except HandshakeFailed as exc:
                balancer.registry.session_ended(backend)
                if exc.status is not None and exc.status != 101:
                    log.info("! %s backend %s refused the handshake: %s", conn.id, backend.guid, exc.status)
                    if exc.status >= 500:  # the backend is failing, not judging this client
                        balancer.health.connect_failed(backend)
                    return Rejection.from_backend(exc.status, exc.headers, exc.body)
                balancer.report_error(conn, f"backend {backend.guid} unreachable: {exc.reason}")
                balancer.health.connect_failed(backend)
                balancer.stats.connect_failed(backend.name, exc.reason)
                continue
            except BaseException:
                balancer.registry.session_ended(backend)
                raise
            upstream.auto_pong = False
            upstream.send_timeout = settings.send_timeout
            conn.backend = backend
            passed = [(name, value) for name, value in answer if name.lower() in PASSED_101_HEADERS]
            return cls(balancer, conn, backend, upstream, passed)
        if not tried:
            return Rejection(Status.SERVICE_UNAVAILABLE, "no backend available")
        return Rejection(Status.BAD_GATEWAY, "no backend could be reached")

    def abandon(self, reason):
        """The client's 101 could not be written: let the backend go."""
        self.server.send_close(CloseCode.GOING_AWAY, "client went away")
        self.upstream.abort()
        self.balancer.registry.session_ended(self.backend)

    # -- relaying ----------------------------------------------------------

    def run(self):
        client_ws = self.conn.websocket
        client_ws.auto_pong = False
        client_ws.send_timeout = self.balancer.settings.glb.send_timeout
        self.client = Leg("client", client_ws, mask=False)
        bus = self.bus
        self.balancer.client_sessions.add(self)
        detached = False
        try:
            bus.fire(bus.client_connect, connection=self.conn, session=self, backend=self.backend)
            if self.outcome is None:  # a client_connect handler may have closed the session
                detached = self._relay() is DETACHED
        finally:
            if not detached:
                self._finish()
        return DETACHED if detached else None

    def _finish(self):
        """The session is over: free the backend's slot and fire ``client_disconnect`` (once)."""
        if self._ended:
            return
        self._ended = True
        self.balancer.client_sessions.discard(self)
        self._close_sockets()
        self.balancer.registry.session_ended(self.backend)
        code, reason, closed_by = self.outcome or (CloseCode.ABNORMAL, "session ended", "glb")
        self.balancer.stats.session_ended(self.backend.name, self.figures(), code, closed_by,
                                          time.monotonic() - self.conn.started)
        self.bus.fire(self.bus.client_disconnect, connection=self.conn, session=self, backend=self.backend,
                      code=code, reason=reason, closed_by=closed_by)

    def figures(self):
        """Messages and bytes relayed each way so far, frame headers included (read, never stored).

        A raw direction is counted by its scanner, a decoded one on its source leg; both are added.
        """
        client, server = self.client, self.server
        if client is None:  # not relaying yet
            return Figures()
        up, down = self.scanners.get("backend"), self.scanners.get("client")
        return Figures(client.messages + (up.messages if up else 0), client.bytes + (up.bytes_seen if up else 0),
                       server.messages + (down.messages if down else 0),
                       server.bytes + (down.bytes_seen if down else 0))

    @property
    def close_status(self):
        code, reason, _ = self.outcome or (CloseCode.ABNORMAL, "session ended", "glb")
        return code, reason

    def _relay(self):
        up, down = self._raw_initial(self.client), self._raw_initial(self.server)
        if up is not None and down is not None and not is_tls(self.client.sock) \
                and not is_tls(self.server.sock):
            return self._relay_both_raw(up, down)
        self._relay_in_two(self._pump_decoded if up is None else partial(self._pump_raw, data=up),
                           self._pump_decoded if down is None else partial(self._pump_raw, data=down))

    def _relay_both_raw(self, client_initial, backend_initial):
        """Both directions raw, with no greenlet parked while the session is idle.

        A parked greenlet costs several KiB per session; instead, one persistent io
        watcher per socket calls ``_on_event``, which runs ``_step`` on a shared
        worker greenlet (it may block in a send, or fire events) that is free again
        when the work is done. While a step runs, further events only wait their
        turn. Returns DETACHED: the last step finishes the session.
        """
        hub = gevent.get_hub()
        client, server = self.client, self.server
        self._raw_scanner(client, server)
        self._raw_scanner(server, client)
        self._directions = {client, server}
        for src, initial in ((client, client_initial), (server, backend_initial)):
            if initial and not self._raw_step(src, self._other(src), initial):
                self._direction_done(src)
        if len(self._directions) < 2:
            return self._relay_rest_in_greenlet()
        self._waiting = []
        for leg in self._directions:
            watcher = self._watchers[leg] = hub.loop.io(leg.sock.fileno(), 1)
            watcher.start(self._on_event, leg)
        return DETACHED

    def _relay_rest_in_greenlet(self):
        """Rare: a direction ended on the bytes read with the handshake; finish in this greenlet."""
        linger = self.upstream.close_timeout
        for src in list(self._directions):
            with gevent.Timeout(linger, False):
                self._pump_raw(src, self._other(src), b"")
        return None

    def _on_event(self, event):
        """io watcher or timer callback, in the hub: hand the work to a short-lived greenlet."""
        if self._busy:
            watcher = self._watchers.get(event)
            if watcher is not None:
                watcher.stop()  # level-triggered: it would fire on every loop turn until then
            self._waiting.append(event)
            return
        self._busy = True
        run_on_worker(self._step, event)

    def _step(self, event):
        try:
            self._handle(event)
            while self._waiting and self._directions:
                self._handle(self._waiting.pop(0))
        except Exception as exc:  # a bug here must end this session only
            log.exception("! %s relay failed", self.conn.id)
            self.bus.fire(self.bus.exception, connection=self.conn, exception=exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
            for leg in (self.client, self.server):
                leg.shutdown()
        finally:
            self._busy = False
            self._waiting.clear()
            if self._directions:
                for leg, watcher in self._watchers.items():
                    if leg in self._directions and not watcher.active:
                        watcher.start(self._on_event, leg)
            else:
                self._detached_end()

    def _handle(self, event):
        if event == "linger":  # the closing handshake took too long: end it
            for leg in self._directions:
                leg.shutdown()
            self._start_timer(1.0, "give up")
            return
        if event == "give up":
            self._directions.clear()
            return
        if event not in self._directions:
            return
        try:
            data = event.sock.recv(RECV_SIZE)
        except OSError:
            data = b""
        if not data:
            self._eof(event)
            self._direction_done(event)
        elif not self._raw_step(event, self._other(event), data):
            self._direction_done(event)

    def _direction_done(self, src):
        self._directions.discard(src)
        watcher = self._watchers.get(src)
        if watcher is not None:
            watcher.stop()
        if self._directions and self._watchers and self._timer is None:
            self._start_timer(self.upstream.close_timeout, "linger")

    def _start_timer(self, seconds, event):
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
        self._timer = gevent.get_hub().loop.timer(seconds)
        self._timer.start(self._on_event, event)

    def _detached_end(self):
        for watcher in self._watchers.values():
            watcher.stop()
            watcher.close()
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
        self._finish()
        self.balancer.end_session(self.conn, self)

    def end_now(self):
        """Shutdown could not wait: end both legs; the relay then finishes by itself."""
        for leg in (self.client, self.server):
            if leg is not None:
                leg.shutdown()

    def _other(self, leg):
        return self.server if leg is self.client else self.client

    def _raw_step(self, src, dst, data):
        """Forward one chunk from ``src``; False ends that direction."""
        try:
            return self._forward_chunk(src, dst, self.scanners[dst.name], data)
        except ConnectionClosed:
            self._lost(dst)  # the other leg is gone or did not read in time
            return False

    def _relay_in_two(self, up, down):
        """Client-to-backend pump here, backend-to-client in a greenlet; each bounded once the other ends."""
        linger = self.upstream.close_timeout
        self.up_running = True
        down = gevent.spawn(self._guarded, down, self.server, self.client)
        try:
            self._guarded(up, self.client, self.server)
        finally:
            self.up_running = False
        down.join(timeout=linger)
        if not down.ready():  # the backend has not closed its side in time
            self.server.shutdown()
            down.join(timeout=1)
            down.kill(block=False)

    def _guarded(self, pump, src, dst):
        try:
            pump(src, dst)
        except Exception as exc:  # a bug here must end this session only
            log.exception("! %s relay %s->%s failed", self.conn.id, src.name, dst.name)
            self.bus.fire(self.bus.exception, connection=self.conn, exception=exc)
            self.close(CloseCode.INTERNAL_ERROR, "internal error")
        if src is self.server and self.up_running:
            # the client side must finish its closing handshake within close_timeout too
            timer = gevent.get_hub().loop.timer(self.upstream.close_timeout)
            timer.start(self._cut_client)
            self._timer = timer

    def _cut_client(self):
        if self.up_running:
            self.client.shutdown()

    def _raw_initial(self, src):
        """Bytes already read from ``src`` if its direction can run raw; None if it must be decoded."""
        bus = self.bus
        if src.name == "client":
            decoded = bool(bus.raw_message.receivers or bus.client_message.receivers
                           or bus.client_binary.receivers or bus.client_fragmented.receivers)
        else:
            decoded = bool(bus.raw_message.receivers)
        if decoded:
            return None
        try:
            return src.ws.take_unread()
        except ValueError:  # a frame already half-parsed: this direction stays decoded
            return None

    def _raw_scanner(self, src, dst):
        """The scanner following what ``src`` sends ``dst`` (kept by the leg it writes)."""
        self.scanners[dst.name] = FrameScanner(self.balancer.settings.glb.max_message_size,
                                               expect_masked=src.name == "client")

    def _pump_raw(self, src, dst, data):
        if dst.name not in self.scanners:  # the detached relay made it already
            self._raw_scanner(src, dst)
        sock = src.sock
        recv = sock.recv
        plain = not is_tls(sock)  # TLS may hold decrypted bytes already
        turn = TURN_BYTES
        try:
            while True:
                if not self._raw_step(src, dst, data):
                    return
                turn -= len(data)
                if plain and len(data) < RECV_SIZE:  # the kernel had no more: wait, then read
                    wait_readable(sock)
                    turn = TURN_BYTES
                elif turn <= 0:  # a fast peer never makes this pump wait: let the others run
                    yield_turn()
                    turn = TURN_BYTES
                data = recv(RECV_SIZE)
                if not data:
                    break
        except OSError:
            pass
        self._eof(src)

    def _forward_chunk(self, src, dst, scanner, data):
        """Forward one received chunk as it is, following its frames; False ends the direction."""
        if scanner.error is not None:  # the far peer judges what glb could not follow
            if data:
                src.bytes += len(data)
                src.last_activity = time.monotonic()
                dst.ws.send_raw(data)
        elif data and src.close_in is None:  # after its close frame, a peer's bytes are ignored
            notes = scanner.feed(data)
            if notes is None:
                src.last_activity = time.monotonic()
                dst.ws.send_raw(data)
                return True
            if _only_pongs(notes, len(data), 6 if src.name == "client" else 2):
                src.last_pong = time.monotonic()  # liveness, not activity
            else:
                src.last_activity = time.monotonic()
            return self._forward_notable(src, dst, data, notes)
        return True

    def _forward_notable(self, src, dst, data, notes):
        """Forward a chunk holding close/ping/pong frames or a violation; False ends the pump."""
        sent = 0
        for note in notes:
            if hasattr(note, "error"):  # a Violation
                if not isinstance(note.error, MessageTooBig):
                    # A protocol error: the far peer fails the connection as it would have
                    # without glb (same close code, after the messages before it). From here
                    # on this direction is forwarded blind, and glb injects nothing into it.
                    self.balancer.report_error(self.conn, f"{src.name} broke the protocol "
                                               f"({note.error.code} {note.error.reason}); "
                                               f"passed on for the {dst.name} to judge")
                    dst.ws.send_raw(data[sent:])
                    return True
                if note.offset > sent:
                    dst.ws.send_raw(data[sent:note.offset])
                self._violation(src, dst, note.error, mid_frame=note.offset < 0)
                return False
            if note.opcode == OP_CLOSE:
                if dst.close_out:  # glb already closed that leg: this close answers glb's, not forwarded
                    start = note.end - len(note.payload) - (6 if src.name == "client" else 2)
                    if start > sent:
                        dst.ws.send_raw(data[sent:start])
                else:
                    dst.ws.send_raw(data[sent:note.end], close=(note.code, note.reason))
                self._close_passed(src, dst, note.code, note.reason)
                return True  # whatever follows a close frame is ignored (RFC 6455 §5.5.1)
        if sent < len(data):
            dst.ws.send_raw(data[sent:])
        return True

    def _pump_decoded(self, src, dst):
        """Read whole frames, fire the hot-path events, re-encode what is left for the other leg."""
        bus = self.bus
        from_client = src.name == "client"
        assemble = from_client and bool(bus.client_message.receivers or bus.client_binary.receivers)
        text_whole = bool(bus.raw_message.receivers)
        fragments = from_client and bool(bus.client_fragmented.receivers)
        parts, opcode = [], None
        src.ws.auto_pong = False
        try:
            while True:
                frame = src.ws.receive_frame()
                if frame is None:
                    break
                op = frame.opcode
                src.bytes += frame_size(len(frame.payload), from_client)
                if frame.fin and op < OP_CLOSE:
                    src.messages += 1
                if op != OP_PONG:
                    src.last_activity = time.monotonic()
                if op == OP_CLOSE:
                    code, reason = src.ws.close_code, src.ws.close_reason
                    src.close_out = True  # the WebSocket layer has echoed it
                    dst.send_close(code, reason)  # no-op if glb closed that leg already
                    self._close_passed(src, dst, code, reason)
                    continue
                if op in (OP_PING, OP_PONG):
                    if op == OP_PONG:
                        src.last_pong = time.monotonic()
                    dst.ws.send_frame(op, frame.payload)
                    continue
                if op != OP_CONTINUATION:
                    opcode = op
                if fragments and not assemble and not (text_whole and opcode == OP_TEXT):
                    event = bus.fire(bus.client_fragmented, connection=self.conn, session=self,
                                     data=frame.payload, opcode=op, continuation=op == OP_CONTINUATION,
                                     final=frame.fin)
                    if not event.handled:
                        dst.ws.send_frame(op, frame.payload, fin=frame.fin)
                    continue
                if not assemble and not (text_whole and opcode == OP_TEXT):
                    dst.ws.send_frame(op, frame.payload, fin=frame.fin)
                    continue
                parts.append(frame.payload)
                if frame.fin:
                    payload = b"".join(parts)
                    parts = []
                    self._deliver(src, dst, opcode, payload)
        except ConnectionClosed:
            self._lost(dst)
            return
        ws = src.ws
        if ws.closed_by == "error" and ws.close_code != CloseCode.ABNORMAL:
            self._violation(src, dst, _Broken(ws.close_code, ws.close_reason), already_told=True)
        elif src.close_in is None:
            self._eof(src)

    def _deliver(self, src, dst, opcode, payload):
        """One whole message from ``src``: events first, then (unless dropped) to ``dst``."""
        bus = self.bus
        if opcode == OP_TEXT:
            text = payload.decode("utf-8")
            if bus.raw_message.receivers:
                event = bus.fire(bus.raw_message, connection=self.conn, text=text, source=src.name)
                if event.handled:
                    return
            if src.name == "client" and bus.client_message.receivers:
                event = bus.fire(bus.client_message, connection=self.conn, session=self, text=text)
                if event.handled:
                    return
                text = event.text
            dst.ws.send(text)
            return
        if src.name == "client" and bus.client_binary.receivers:
            event = bus.fire(bus.client_binary, connection=self.conn, session=self, data=payload)
            if event.handled:
                return
            payload = event.data
        dst.ws.send(bytes(payload), binary=True)

    # -- ending ------------------------------------------------------------

    def _close_passed(self, src, dst, code, reason):
        """A close frame came from ``src`` (and went to ``dst`` unless glb had closed it already)."""
        src.close_in = (code, reason)
        dst.close_out = True
        self._end(code, reason, src.name)
        client = self.client
        if client.close_in is not None and client.close_out:
            client.shutdown()  # glb is the server on this leg: it closes TCP first

    def _eof(self, src):
        """``src`` ended its TCP connection."""
        if src.close_in is not None:
            if src is self.server and self.client.close_in is None:
                # the backend finished its close; make sure the client's leg completes too
                return
            return
        if src is self.client:
            self._end(CloseCode.ABNORMAL, "client went away", "client")
            self.server.send_close(CloseCode.GOING_AWAY, "client went away", self._at_boundary("backend"))
        else:
            self._end(CloseCode.BAD_GATEWAY, "backend went away", "backend")
            self.client.send_close(CloseCode.BAD_GATEWAY, "backend went away", self._at_boundary("client"))

    def _lost(self, dst):
        """Writing to ``dst`` failed: it is gone, or did not read within send_timeout."""
        ws = dst.ws
        reason = ws.close_reason or "connection lost"
        if dst is self.client:
            code = CloseCode.POLICY_VIOLATION if "slow reader" in reason else CloseCode.ABNORMAL
            self._end(code, reason, "glb" if code == CloseCode.POLICY_VIOLATION else "client")
            self.server.send_close(CloseCode.GOING_AWAY, "client went away", self._at_boundary("backend"))
        else:
            self._end(CloseCode.BAD_GATEWAY, f"backend lost: {reason}", "backend")
            self.client.send_close(CloseCode.BAD_GATEWAY, "backend went away", self._at_boundary("client"))
        dst.shutdown()

    def _violation(self, src, dst, error, mid_frame=False, already_told=False):
        """``src`` broke the protocol (or a limit): tell it why, and close the other leg."""
        code, reason = error.code, error.reason
        self._end(code, reason, "glb")
        self.balancer.report_error(self.conn, f"{src.name} {code} {reason}")
        if not already_told:
            src.send_close(code, reason)
        if dst is self.server:
            self.server.send_close(CloseCode.GOING_AWAY, "client protocol error",
                                   lambda: not mid_frame and self._at_boundary("backend")())
        else:
            self.client.send_close(CloseCode.BAD_GATEWAY, "backend protocol error",
                                   lambda: not mid_frame and self._at_boundary("client")())
        src.shutdown()

    def _at_boundary(self, leg_name):
        scanner = self.scanners.get(leg_name)
        if scanner is None:
            return lambda: True
        return lambda: scanner.error is None and scanner.at_boundary

    def _end(self, code, reason, closed_by):
        if self.outcome is None:
            self.outcome = (code, reason, closed_by)

    def close(self, code=CloseCode.GOING_AWAY, reason="going away", cause=None):
        """glb ends the session (shutdown, idle or ping timeout, a handler): both legs get the close.

        ``cause``, when given, is the reason ``client_disconnect`` reports instead of ``reason``
        (rebalancing sends "service restart" on the wire and reports "rebalance").
        """
        self._end(code, cause or reason, "glb")
        if self.client is None:
            return
        self.client.send_close(code, reason, self._at_boundary("client"))
        self.server.send_close(code, reason, self._at_boundary("backend"))

    def _close_sockets(self):
        for leg in (self.client, self.server):
            try:
                leg.sock.close()
            except OSError:
                pass

    # -- glb's own messages to the client (glb.broadcast.write_data / ping) --

    def send(self, message):
        """``Connection.send`` for a relayed client: a whole message, between relayed ones."""
        return self.client is not None and self.send_to_client(message, SEND_BETWEEN_TIMEOUT)

    def send_to_client(self, message, timeout=1.0, opcode=None):
        """Write one whole message of glb's own to the client, between relayed frames; True if written.

        ``message`` str is sent as text, bytes as binary, or as a ping with ``opcode=OP_PING``.
        A data message waits until the relayed stream is between two messages (never inside a
        fragmented one), a ping only until it is between two frames; retried for up to
        ``timeout`` seconds, then False. Raises ConnectionClosed once the session has ended.
        In decoded mode (handlers reading backend frames) fragments are not tracked here.
        """
        if isinstance(message, str):
            payload, op = message.encode("utf-8"), OP_TEXT
        else:
            payload, op = bytes(message), OP_BINARY
        op = op if opcode is None else opcode
        frame = encode_frame(op, payload, mask=False)
        control = op >= OP_CLOSE
        deadline = time.monotonic() + timeout
        delay = 0.0
        while True:
            if self.outcome is not None or (self.client is not None and self.client.ws.closed):
                code, reason = self.close_status
                raise ConnectionClosed(code, reason)
            if self.client is not None:
                scanner = self.scanners.get("client")
                if scanner is None:
                    def ready():
                        return True
                elif control:
                    def ready():
                        return scanner.error is None and scanner.at_boundary
                else:
                    def ready():
                        return scanner.error is None and scanner.at_boundary and not scanner.in_message
                if self.client.ws.send_between(frame, ready):
                    return True
            if time.monotonic() >= deadline:
                return False
            gevent.sleep(delay)
            delay = min(0.01, delay * 2 or 0.0005)

    # -- keep-alive (called by the balancer's sweeper) -----------------------

    def keep_alive(self, now, ping_interval, ping_timeout, idle_timeout):
        """Ping a quiet leg, close a leg that did not answer, or end an idle session."""
        if self.client is None or self.outcome is not None:
            return
        legs = (self.client, self.server)
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
                frame = encode_frame(OP_PING, b"glb", mask=leg.mask)
                try:
                    if leg.ws.send_between(frame, self._at_boundary(leg.name)):
                        leg.ping_sent = now
                except ConnectionClosed:
                    pass


def _only_pongs(notes, size, header_size):
    """True when a chunk is nothing but whole pong frames (keep-alive answers)."""
    position = 0
    for note in notes:
        if getattr(note, "opcode", None) != OP_PONG or note.end - len(note.payload) - header_size != position:
            return False
        position = note.end
    return position == size


# Greenlets that run relay steps, shared by every session. A new greenlet per step
# would cost a fresh Python data stack (an mmap and munmap) each time; a parked
# worker is only switched into. At most IDLE_WORKERS wait; more are made on demand
# (while steps block in sends) and end when not needed.
IDLE_WORKERS = 64
_idle_workers = []


def run_on_worker(func, arg):
    """Run ``func(arg)`` in a worker greenlet now; called from the hub (a watcher callback)."""
    worker = _idle_workers.pop() if _idle_workers else greenlet(_worker_loop, gevent.get_hub())
    worker.switch(func, arg)


def _worker_loop(func, arg):
    hub = gevent.get_hub()
    while True:
        try:
            func(arg)
        except Exception:  # steps contain their own errors; this is the last guard for the hub
            log.exception("! relay step failed")
        if len(_idle_workers) >= IDLE_WORKERS:
            return
        _idle_workers.append(getcurrent())
        func, arg = hub.switch()


class _Broken:
    """A protocol error the WebSocket layer already answered (decoded pumps)."""

    def __init__(self, code, reason):
        self.code, self.reason = code, reason
