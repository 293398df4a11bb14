"""WebSocket connections over gevent sockets: glb's replacement for gevent-websocket's WebSocket.

The protocol rules live in ``glb.frames`` (socket-free); this module only
moves bytes and keeps the closing state.

Closing, in one table (``closed_by`` / ``close_code`` / ``close_reason``)::

    how it ended                          closed_by  close_code            socket
    peer sent a close frame               "peer"     peer's code (1005     echoed, then closed
                                                     if none)
    close() called here first             "local"    the code we sent      after the peer's reply
                                                                           or ``wait`` seconds
    peer broke the protocol               "error"    1002 / 1007 / 1009    close sent, then closed
    EOF, socket error or send timeout     "error"    1006                  closed, no close frame
    abort()                               "local"    1006                  closed, no close frame

Who closes TCP first follows RFC 6455 §7.1.1: a server side closes the socket
as soon as the handshake is complete; a client side (and either side after
a protocol error, having half-closed) first reads until the peer's EOF, for
at most ``close_timeout`` seconds, so the peer's unread bytes cannot turn
our FIN into an RST that loses the close frame. Whichever way it ended, the
socket is closed once receive() has returned None or close() has returned.

Nothing is ever written implicitly: there is no ``__del__``, so an unclosed
WebSocket that is garbage-collected sends no close frame.
"""
import base64
import logging
import os
import socket
import ssl
import time
from urllib.parse import urlsplit

import gevent
import gevent.socket
import gevent.ssl
from gevent.event import Event
from gevent.lock import Semaphore

from glb.errors import CloseCode, ConnectionClosed, HandshakeFailed, ProtocolError
from glb.frames import (
    CONTROL_OPCODES,
    DATA_OPCODES,
    MAX_CONTROL_PAYLOAD,
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameReader,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
)
from glb.handshake import accept_key
from glb.lean_socket import LeanSocket

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_SIZE = 16 * 1024 * 1024
RECV_SIZE = 64 * 1024
NEED_MORE = "need more"  # take_frame(): no whole frame buffered yet
# Fairness: a reader hands the hub back after this much work, whatever its peer sends. A frame
# costs its payload size, at least FRAME_COST, so a flood of tiny frames (each handled by Python
# code: control records, events) yields every TURN_BYTES // FRAME_COST frames, a bulk stream
# every TURN_BYTES.
TURN_BYTES = 256 * 1024
FRAME_COST = 2048
MAX_RESPONSE_HEAD = 64 * 1024
MAX_ERROR_BODY = 64 * 1024

# The caller's headers pass through verbatim except these, which belong to this handshake.
HANDSHAKE_HEADERS = frozenset(
    {"upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "sec-websocket-accept"}
)


class WebSocket:
    """One WebSocket connection, after the opening handshake.

    ``server_side=True``: this side is the server (expects masked frames,
    sends unmasked). ``initial`` is bytes already read past the handshake.
    One greenlet may receive while any number send: each frame is written
    whole under a lock. Fragments sent with ``send_frame`` by several
    greenlets at once can still interleave; that is the caller's to avoid.
    """

    # one per connection leg, thousands at once: no per-instance __dict__
    __slots__ = ("_sock", "server_side", "connection", "auto_pong", "send_timeout", "close_timeout",
                 "_mask", "_reader", "_write_lock", "_plain", "_drained", "_turn", "_reading", "_changed",
                 "_close_sent", "_close_received", "_sock_closed", "_closed_by", "_close_code",
                 "_close_reason", "on_closing", "last_pong")

    def __init__(self, sock, *, server_side, max_message_size=DEFAULT_MAX_MESSAGE_SIZE,
                 initial=b"", connection=None, auto_pong=True, send_timeout=None,
                 close_timeout=2.0):
        self._sock = sock
        self.server_side = server_side
        self.connection = connection
        self.auto_pong = auto_pong
        self.send_timeout = send_timeout  # seconds a send may block; then the connection is dropped
        self.close_timeout = close_timeout  # seconds to wait for the peer's EOF when the closing is ours to finish
        self._mask = not server_side
        self._reader = FrameReader(max_message_size, expect_masked=server_side)
        if initial:
            self._reader.feed(initial)
        self._write_lock = None  # a Semaphore, made when a send first has to wait (most never do)
        self._plain = not is_tls(sock)  # TLS may hold decrypted bytes or need retries: no fast paths
        self._drained = False  # the last recv emptied the kernel's buffer: wait before the next
        self._turn = TURN_BYTES  # work left before this reader must let others run (see TURN_BYTES)
        self._reading = False  # a greenlet is inside receive_frame()
        self._changed = None  # an Event only while close() waits for that reader (few exist at once)
        self._close_sent = False
        self._close_received = False
        self._sock_closed = False
        self._closed_by = None
        self._close_code = None
        self._close_reason = None
        # Called once, with no arguments, the moment closing begins (whoever began it), before
        # any wait for the peer: an owner that must let go of shared state does it here.
        self.on_closing = None
        self.last_pong = 0.0  # monotonic time the last pong was received (heartbeats read it)

    def __repr__(self):
        side = "server" if self.server_side else "client"
        state = f"closed by {self._closed_by} {self._close_code}" if self._closed_by else "open"
        return f"<WebSocket {side} side {self.connection!r} {state}>"

    @property
    def sock(self):
        return self._sock

    @property
    def closed(self):
        """True once closing has begun (either way); nothing more can be sent."""
        return self._closed_by is not None

    @property
    def socket_closed(self):
        """True once this side has closed the socket."""
        return self._sock_closed

    @property
    def closed_by(self):
        """``"peer"``, ``"local"`` or ``"error"`` (see the module table); None while open."""
        return self._closed_by

    @property
    def close_code(self):
        return self._close_code

    @property
    def close_reason(self):
        return self._close_reason

    @property
    def sending(self):
        """True while a send waits for the peer to take bytes (bounded by ``send_timeout``)."""
        return self._send_waiting()

    def _send_waiting(self):
        lock = self._write_lock
        return lock is not None and lock.locked()

    # -- receiving ---------------------------------------------------------

    def receive(self):
        """The next message (text as str, binary as bytes), or None once the connection is closed."""
        frame = self.receive_frame()
        while frame is not None and frame.opcode >= OP_CLOSE:
            if frame.opcode == OP_CLOSE:
                return None
            frame = self.receive_frame()
        if frame is None:
            return None
        is_text = frame.opcode == OP_TEXT
        if frame.fin:
            return frame.text if is_text else frame.payload
        parts = [frame.text if is_text else frame.payload]
        while True:
            frame = self.receive_frame()
            if frame is None or frame.opcode == OP_CLOSE:
                return None
            if frame.opcode == OP_CONTINUATION:
                parts.append(frame.text if is_text else frame.payload)
                if frame.fin:
                    return "".join(parts) if is_text else b"".join(parts)

    def receive_frame(self):
        """The next frame, control frames included; None once the connection is closed.

        The protocol's duties are done before the frame is returned: a ping
        has been answered (if ``auto_pong``), a close frame has been echoed
        and the socket closed (so the call after a close frame returns None).
        Data frames come unmasked and validated, text fragments with
        ``Frame.text`` decoded so far.
        """
        if self._close_received or self._sock_closed:
            return None
        if self._reading:
            raise RuntimeError("another greenlet is already receiving on this WebSocket")
        self._reading = True
        try:
            return self._receive_frame()
        finally:
            self._reading = False
            self._notify()

    def _receive_frame(self):
        if self._turn <= 0:  # a fast peer never makes us wait: let every other greenlet and fd run
            self._turn = TURN_BYTES
            yield_turn()
        while True:
            frame = self.take_frame()
            if frame is not NEED_MORE:
                if frame is not None:
                    self._turn -= max(len(frame.payload), FRAME_COST)
                return frame
            sock = self._sock
            try:
                if self._drained:
                    self._turn = TURN_BYTES  # waiting for the peer lets the others run anyway
                    wait_readable(sock)
                data = sock.recv(RECV_SIZE)
            except OSError as exc:
                self._lost(f"receive failed: {exc}")
                return None
            if not data:
                self.peer_ended()
                return None
            self._drained = self._plain and len(data) < RECV_SIZE
            self._reader.feed(data)

    def feed(self, data):
        """Bytes someone else read from this socket (the relay engine), for ``take_frame``."""
        self._reader.feed(data)

    def take_frame(self):
        """The next frame from bytes already received, without reading: a Frame, NEED_MORE, or None.

        None once the connection is closed. The protocol's duties are done as in
        ``receive_frame`` (a ping answered if ``auto_pong``, a close echoed, a
        violation answered with its close code).
        """
        if self._close_received or self._sock_closed:
            return None
        try:
            frame = self._reader.next_frame()
        except ProtocolError as exc:
            self._fail(exc.code, exc.reason)
            return None
        if frame is None:
            return NEED_MORE
        if frame.opcode == OP_PING:
            if self.auto_pong:
                self._send_quietly(encode_frame(OP_PONG, frame.payload, mask=self._mask))
        elif frame.opcode == OP_PONG:
            self.last_pong = time.monotonic()
        elif frame.opcode == OP_CLOSE:
            self._on_peer_close(frame.payload)
        return frame

    def peer_ended(self):
        """The peer ended TCP (EOF) without a close frame."""
        self._lost("connection closed without a close frame")

    def take_unread(self):
        """Hand the received stream over: bytes not yet parsed (``initial`` included) are returned,
        and this WebSocket parses nothing more (its frame reader is let go: a relay reading raw
        from here on keeps none per session). ValueError in the middle of a frame or message."""
        data = self._reader.take_unread()
        self._reader = None
        return data

    def shed_watchers(self):
        """Hold the socket as a ``LeanSocket`` (plain sockets only): no io watcher is kept for it
        while nobody waits on it, for a session whose reads the relay engine watches itself."""
        if self._plain and not isinstance(self._sock, LeanSocket):
            self._sock = LeanSocket.take_over(self._sock)

    # -- sending -----------------------------------------------------------

    def send(self, message, binary=None):
        """Send one message: str as text, bytes as binary, bytes with ``binary=False`` as text verbatim."""
        if isinstance(message, str):
            payload = message.encode("utf-8")
            opcode = OP_BINARY if binary else OP_TEXT
        elif isinstance(message, (bytes, bytearray, memoryview)):
            payload = message
            opcode = OP_TEXT if binary is False else OP_BINARY
            if opcode == OP_TEXT:
                try:
                    bytes(payload).decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"text message is not valid UTF-8: {exc}") from None
        else:
            raise TypeError(f"cannot send a {type(message).__name__} as a WebSocket message")
        self._write(encode_frame(opcode, payload, mask=self._mask))

    def send_frame(self, opcode, payload, fin=True):
        """Send one frame as given (fragments of a text message are not validated here); not for close."""
        if opcode == OP_CLOSE:
            raise ValueError("send a close frame with close()")
        if opcode in CONTROL_OPCODES:
            payload = _control_payload(payload)
        elif opcode not in DATA_OPCODES:
            raise ValueError(f"unknown opcode {opcode:#x}")
        self._write(encode_frame(opcode, payload, fin=fin, mask=self._mask))

    def send_raw(self, data, close=None):
        """Write already-encoded frames whole, under the same lock as every other send.

        ``close=(code, reason)`` says ``data`` ends with a close frame with that
        status, so this connection counts as closed by us (a relay forwarding
        a close frame unchanged).
        """
        if close is None:
            self._write(data)
            return
        if self._close_sent or self._sock_closed:
            raise ConnectionClosed(self._close_code, self._close_reason or "")
        self._set_closed("local", *close)
        self._write(data, closing=True)

    def send_now(self, data):
        """Write what the kernel takes of ``data`` at once; the count written. Never waits or switches.

        0 when the socket is busy (another send under way), closing, TLS, or its
        buffer is full; a failure is left for the next blocking send to report.
        For the relay engine's fast path, which runs in the hub.
        """
        if self._close_sent or self._sock_closed or not self._plain:
            return 0
        lock = self._write_lock
        if lock is not None and lock.locked():
            return 0
        try:
            return self._sock._sock.send(data)  # the OS socket itself: no wait, no switch
        except OSError:
            return 0

    def send_between(self, data, at_boundary):
        """Write ``data`` only if no send is under way and ``at_boundary()`` holds; True if written.

        A relay forwarding raw chunks may leave the stream mid-frame; glb's
        own frames (keep-alive pings) may only go in between two frames.
        """
        if self._close_sent or self._sock_closed or self._send_waiting():
            return False
        if not at_boundary():
            return False
        self._write(data)
        return True

    def ping(self, payload=b""):
        self.send_frame(OP_PING, payload)

    def pong(self, payload=b""):
        self.send_frame(OP_PONG, payload)

    def _write(self, data, closing=False, timeout=None):
        """Write ``data`` whole; a failure or timeout drops the connection and raises ConnectionClosed."""
        if not closing and self._plain and not self._send_waiting():
            # Fast path: the kernel nearly always takes a frame whole, so no timer and no lock
            # (gevent never switches inside a send that may not wait).
            if self._close_sent or self._sock_closed:
                raise ConnectionClosed(self._close_code or CloseCode.ABNORMAL, self._close_reason or "")
            try:
                sent = self._sock.send(data, 0, 0.0)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                reason = f"send failed: {exc}"
                self._lost(reason)
                raise ConnectionClosed(CloseCode.ABNORMAL, reason) from None
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        if timeout is None:
            timeout = self.send_timeout
        timer = None if timeout is None else gevent.Timeout.start_new(timeout)
        if self._write_lock is None:
            self._write_lock = Semaphore()
        try:
            with self._write_lock:
                if self._close_sent or self._sock_closed:
                    raise ConnectionClosed(self._close_code or CloseCode.ABNORMAL, self._close_reason or "")
                if closing:
                    self._close_sent = True
                self._sock.sendall(data)
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            reason = f"send blocked over {timeout} s (slow reader)"
            self._lost(reason)
            raise ConnectionClosed(CloseCode.ABNORMAL, reason) from None
        except OSError as exc:
            reason = f"send failed: {exc}"
            self._lost(reason)
            raise ConnectionClosed(CloseCode.ABNORMAL, reason) from None
        finally:
            if timer is not None:
                timer.close()

    def _send_quietly(self, data, closing=False, timeout=None):
        """A send the protocol makes on its own: if the connection is gone, there is nobody to tell."""
        try:
            self._write(data, closing=closing, timeout=timeout)
        except ConnectionClosed:
            pass

    # -- closing -----------------------------------------------------------

    def close(self, code=CloseCode.NORMAL, reason="", wait=2.0):
        """Start (or finish) the closing handshake; only the first call does anything.

        Sends the close frame, then waits up to ``wait`` seconds for the
        peer's close: while another greenlet is inside receive(), that
        greenlet reads (and gets the messages still in flight, then None);
        whenever none is, this call reads, discarding data. The socket is
        closed when this returns.
        """
        if self._close_sent or self._sock_closed:
            return
        payload = encode_close_payload(code, reason)
        if isinstance(reason, (bytes, bytearray)):
            reason = bytes(reason).decode("utf-8")
        self._set_closed("local", code, reason)
        log.debug("%s = closing %s %s", self.connection, code, reason)
        try:
            self._write(encode_frame(OP_CLOSE, payload, mask=self._mask), closing=True, timeout=wait)
        except ConnectionClosed:
            return
        with gevent.Timeout(wait, False):
            while not self._close_received and not self._sock_closed:
                if not self._reading:
                    self.receive_frame()
                else:
                    # Never a second reader: wake when the other one returns or the socket closes.
                    self._changed = changed = Event()
                    try:
                        changed.wait()
                    finally:
                        self._changed = None
        self._close_socket()

    def abort(self):
        """Close the TCP connection now, without a close frame."""
        self._set_closed("local", CloseCode.ABNORMAL, "aborted")
        self._close_socket()

    def _on_peer_close(self, payload):
        code, reason = parse_close_payload(payload)
        self._close_received = True
        self._set_closed("peer", code, reason)
        log.debug("%s < close %s %s", self.connection, code, reason)
        if not self._close_sent:
            reply = encode_close_payload(code, reason)
            self._send_quietly(encode_frame(OP_CLOSE, reply, mask=self._mask), closing=True,
                               timeout=self.close_timeout)
        if self.server_side:
            self._close_socket()  # RFC 6455 §7.1.1: the server closes TCP first
        else:
            self._drain_then_close(shutdown=False)

    def _fail(self, code, reason):
        """The peer broke the protocol: tell it why, then let its last bytes drain so no RST eats our close."""
        self._set_closed("error", code, reason)
        log.debug("%s ! protocol error, closing %s %s", self.connection, code, reason)
        self._send_quietly(encode_frame(OP_CLOSE, encode_close_payload(code, reason), mask=self._mask),
                           closing=True, timeout=self.close_timeout)
        self._drain_then_close(shutdown=True)

    def _lost(self, reason):
        self._set_closed("error", CloseCode.ABNORMAL, reason)
        log.debug("%s ! connection lost: %s", self.connection, reason)
        self._close_socket()

    def _drain_then_close(self, shutdown):
        """Read and discard until the peer's EOF (at most ``close_timeout`` seconds), then close."""
        if self._sock_closed:
            return
        try:
            with gevent.Timeout(self.close_timeout, False):
                if shutdown:
                    self._sock.shutdown(socket.SHUT_WR)
                while self._sock.recv(RECV_SIZE):
                    pass
        except OSError:
            pass
        self._close_socket()

    def _set_closed(self, by, code, reason):
        """Record why the connection ended; the first cause wins."""
        if self._closed_by is None:
            self._closed_by, self._close_code, self._close_reason = by, code, reason
            if self.on_closing is not None:
                self.on_closing()

    def _notify(self):
        if self._changed is not None:
            self._changed.set()

    def _close_socket(self):
        if self._sock_closed:
            return
        self._sock_closed = True
        self._notify()
        try:
            self._sock.close()
        except OSError:
            pass


def is_tls(sock):
    return isinstance(sock, (ssl.SSLSocket, gevent.ssl.SSLSocket))


def yield_turn():
    """Let the hub poll every socket and run every ready greenlet, then carry on.

    ``sleep(0)`` may resume this greenlet before the loop polls for I/O; a timer,
    however short, fires only after the next poll.
    """
    gevent.sleep(0.000001)


def wait_readable(sock):
    """Block this greenlet until ``sock`` has bytes (or EOF), without a failing recv first.

    After a recv that emptied the kernel's buffer, the next recv would fail with
    EAGAIN before gevent waits; waiting first saves that syscall per message.
    Uses the socket's own read watcher (gevent internals, checked at import).
    """
    if isinstance(sock, LeanSocket):
        sock.wait_readable()
    else:
        sock._wait(sock._read_event)


def _control_payload(payload):
    if isinstance(payload, str):
        payload = payload.encode("utf-8")
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise ValueError("control frame payload over 125 bytes")
    return payload


# -- client-side opening handshake ------------------------------------------


def connect(url, *, headers=None, subprotocols=None, timeout=10.0, ssl_context=None,
            max_message_size=DEFAULT_MAX_MESSAGE_SIZE, source_address=None):
    """Open a client WebSocket to ``url`` (ws:// or wss://): ``(WebSocket, status_line, response_headers)``.

    ``headers`` (a list of ``(name, value)``) are sent verbatim, except the
    handshake's own (Upgrade, Connection, Sec-WebSocket-Key/-Version); Host
    and Sec-WebSocket-Protocol from ``headers`` win over the ones made here.
    ``timeout`` bounds the whole connect and handshake. Every failure raises
    HandshakeFailed (``status`` None when no HTTP answer came).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ValueError(f"not a ws:// or wss:// URL: {url!r}")
    secure = parts.scheme == "wss"
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    key = base64.b64encode(os.urandom(16))
    request = _handshake_request(target, _host_header(host, parts.port, secure), key,
                                 list(headers or ()), subprotocols)
    where = f"{host}:{port}"
    sock = None
    refusal = None  # (status_line, status, headers, body so far) once a non-101 answer came
    timer = gevent.Timeout.start_new(timeout)
    try:
        sock = gevent.socket.create_connection((host, port), source_address=source_address)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if secure:
            context = ssl_context or gevent.ssl.create_default_context()
            sock = context.wrap_socket(sock, server_hostname=host)
        sock.sendall(request)
        head, rest = _read_response_head(sock)
        status_line, status, response_headers = _parse_response_head(head)
        if status != 101:
            refusal = (status_line, status, response_headers, bytearray(rest))
            _read_error_body(sock, response_headers, refusal[3])
            raise HandshakeFailed(f"answered {status_line!r}")
        _check_upgrade(response_headers, key, _offered_protocols(headers, subprotocols))
    except gevent.Timeout as exc:
        if exc is not timer:
            raise
        _close_quietly(sock)
        if refusal is None:
            raise HandshakeFailed(f"{where}: handshake timed out after {timeout} s") from None
        error = HandshakeFailed(f"answered {refusal[0]!r}")
    except HandshakeFailed as exc:
        _close_quietly(sock)
        error = exc
    except OSError as exc:
        _close_quietly(sock)
        raise HandshakeFailed(f"{where}: cannot connect: {exc}") from None
    else:
        error = None
    finally:
        timer.close()
    if error is not None:
        if refusal is not None:
            _, status, response_headers, body = refusal
            raise HandshakeFailed(f"{where} {error.reason}", status, response_headers,
                                  bytes(body[:MAX_ERROR_BODY]))
        raise HandshakeFailed(f"{where}: {error.reason}", error.status, error.headers, error.body)
    ws = WebSocket(sock, server_side=False, max_message_size=max_message_size, initial=rest)
    return ws, status_line, response_headers


def _host_header(host, port, secure):
    name = f"[{host}]" if ":" in host else host
    if port is not None and port != (443 if secure else 80):
        name = f"{name}:{port}"
    return name


def _offered_protocols(headers, subprotocols):
    """The subprotocols offered, from the caller's Sec-WebSocket-Protocol header or else ``subprotocols``."""
    offered = [value for name, value in headers or () if name.lower() == "sec-websocket-protocol"]
    if offered:
        return [p.strip() for value in offered for p in value.split(",") if p.strip()]
    return list(subprotocols or ())


def _handshake_request(target, host, key, headers, subprotocols):
    given = {name.lower() for name, _ in headers}
    lines = [f"GET {target} HTTP/1.1"]
    if "host" not in given:
        lines.append(f"Host: {host}")
    lines += [
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode('ascii')}",
        "Sec-WebSocket-Version: 13",
    ]
    if subprotocols and "sec-websocket-protocol" not in given:
        lines.append(f"Sec-WebSocket-Protocol: {', '.join(subprotocols)}")
    for name, value in headers:
        if name.lower() in HANDSHAKE_HEADERS:
            continue
        if any(c in f"{name}{value}" for c in "\r\n\0") or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent as given")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _read_response_head(sock):
    """Read up to the blank line ending the response head: ``(head, bytes after it)``."""
    buffer = bytearray()
    searched = 0
    while True:
        end = buffer.find(b"\r\n\r\n", max(0, searched - 3))
        if end > MAX_RESPONSE_HEAD or (end < 0 and len(buffer) > MAX_RESPONSE_HEAD):
            raise HandshakeFailed(f"response head over {MAX_RESPONSE_HEAD} bytes")
        if end >= 0:
            return bytes(buffer[:end]), bytes(buffer[end + 4:])
        searched = len(buffer)
        data = sock.recv(RECV_SIZE)
        if not data:
            raise HandshakeFailed("connection closed before a complete HTTP response")
        buffer += data


def _parse_response_head(head):
    """``(status_line, status, headers)``; HandshakeFailed with no status for anything malformed.

    A malformed answer is a failed backend, never a refusal to pass on: the
    status must be three ASCII digits (``"4\u00b23"`` passes ``isdigit()``),
    every header line ``name: value``, a Content-Length ASCII digits.
    """
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0]
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not _ascii_digits(fields[1]) \
            or len(fields[1]) != 3 or fields[1][0] == "0":
        raise HandshakeFailed(f"malformed status line {status_line!r}")
    headers = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise HandshakeFailed(f"malformed response header line {line!r}")
        headers.append((name, value.strip()))
    length = _header_value(headers, "content-length")
    if length is not None and not _ascii_digits(length):
        raise HandshakeFailed(f"malformed Content-Length {length!r}")
    return status_line, int(fields[1]), headers


def _ascii_digits(text):
    return text.isascii() and text.isdigit()


def _header_value(headers, wanted):
    values = [value for name, value in headers if name.lower() == wanted]
    return ", ".join(values) if values else None


def _check_upgrade(headers, key, offered_protocols):
    def refuse(reason):
        raise HandshakeFailed(reason, 101, headers)

    if (_header_value(headers, "upgrade") or "").lower() != "websocket":
        refuse("101 response without Upgrade: websocket")
    tokens = (_header_value(headers, "connection") or "").lower().split(",")
    if "upgrade" not in (token.strip() for token in tokens):
        refuse("101 response without Connection: Upgrade")
    expected = accept_key(key.decode("ascii"))
    if _header_value(headers, "sec-websocket-accept") != expected:
        refuse("101 response with a wrong Sec-WebSocket-Accept")
    chosen = _header_value(headers, "sec-websocket-protocol")
    if chosen is not None and chosen not in offered_protocols:
        refuse(f"server chose subprotocol {chosen!r}, which was not offered")


def _read_error_body(sock, headers, body):
    """Read a refusal's body into ``body`` (up to MAX_ERROR_BODY bytes, dechunked); best effort."""
    length = _header_value(headers, "content-length")
    chunked = "chunked" in (_header_value(headers, "transfer-encoding") or "").lower()
    wanted = MAX_ERROR_BODY
    if length is not None:  # ASCII digits: checked with the head
        wanted = min(int(length), MAX_ERROR_BODY)
    try:
        while len(body) < wanted and not (chunked and _chunked_complete(body)):
            data = sock.recv(RECV_SIZE)
            if not data:
                break
            body += data
    except OSError:
        pass
    if chunked:
        body[:] = _dechunk(bytes(body))
    del body[wanted:]


def _chunked_complete(data):
    return data.startswith(b"0\r\n") or b"\r\n0\r\n" in data


def _dechunk(data):
    """Decode what a chunked body holds, stopping quietly at the first malformed or missing piece."""
    out = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            break
        try:
            size = int(data[pos:line_end].split(b";")[0], 16)
        except ValueError:
            break
        if size == 0:
            break
        out += data[line_end + 2:line_end + 2 + size]
        pos = line_end + 2 + size + 2
    return bytes(out)


def _close_quietly(sock):
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass
