"""The client side of every plain connection: glb reads each request head itself, strictly.

``UpgradeHandler`` is the one seam with gevent: the ``WSGIServer`` accepts and
hands the socket to it, and from there ``ClientConnection`` owns the connection::

    loop: read a head (deadline)  -> 400/414/431/505 + close on a bad one (glb.http_parse)
          Upgrade: websocket      -> Balancer.handle_upgrade (sessions, control, /glb/echo)
          a path in http_routes   -> glb's own WSGI endpoint, given a minimal environ
          anything else           -> HttpProxy.exchange (forwarded to a backend)
          keep-alive?             -> wait for the next head, at most [http] keepalive_timeout

Deadlines: the whole first head must arrive within ``[glb] handshake_timeout`` of
the accept; a later head within the same time of its first byte, after at most
``[http] keepalive_timeout`` of idleness. A client too slow gets 408 and is closed.
"""

import io
import logging
import socket as stdlib_socket
import sys
import time
from urllib.parse import unquote

from glb.errors import Status
from glb.http_io import SocketIO
from glb.http_parse import HeadError, HeadReader, LengthBody, body_for, encode_head, parse_request_head

log = logging.getLogger("glb.http")

OWN_BODY_LIMIT = 1 << 20  # most a request to one of glb's own endpoints may carry


class ClientGone(Exception):
    """The client closed, timed out or broke its framing while glb read from it."""


class ClientConnection:
    """One accepted plain (or TLS) connection, request after request, until either side closes it."""

    def __init__(self, balancer, sock, address, secure=False, server=None):
        self.balancer = balancer
        self.server = server  # the gevent server that accepted the connection
        self.sock = sock
        self.io = SocketIO(sock)
        self.peer = tuple(address[:2]) if address else ("", 0)
        self.secure = secure
        self.buffer = bytearray()
        self.reader = None  # a HeadReader kept from one bodiless request to the next (llhttp is ready again)
        self.taken = False  # the socket went to a WebSocket session
        self.idle = False  # waiting for the next request of a keep-alive connection
        glb, http = balancer.settings.glb, balancer.settings.http
        self.head_timeout = glb.handshake_timeout
        self.keepalive_timeout = http.keepalive_timeout
        self.body_timeout = http.read_timeout
        self.max_head_size = http.max_head_size
        self.chunk_size = http.chunk_size

    # -- the loop ------------------------------------------------------------------------------

    def serve(self):
        """Requests until either side closes; the HttpProxy knows every open one (see close_idle)."""
        clients = self.balancer.http_proxy.clients
        clients.add(self)
        try:
            self._serve()
        finally:
            clients.discard(self)
            self.io.close()

    def _serve(self):
        first = True
        while True:
            try:
                head = self.read_head(first)
            except HeadError as exc:
                self.refuse(exc.status, exc.reason)
                return
            if head is None:
                return
            first = False
            if head.upgrade == "websocket":
                self.upgrade(head)
                return
            route = self.balancer.http_route(_route_path(head.path))
            if route is not None:
                keep = self.call_own(route, head)
            else:
                keep = self.balancer.http_proxy.exchange(self, head)
            if not keep or self.balancer.ending_keep_alive:
                return

    def read_head(self, first):
        """The next RequestHead; None when the client closed or idled out between requests."""
        io = self.io
        reader = self.reader
        if reader is None:
            reader = self.reader = HeadReader(max_size=self.max_head_size)
        else:
            reader.restart()
        while self.buffer.startswith(b"\r\n"):  # RFC 9112 §2.2: ignore an empty line before a request
            del self.buffer[:2]
        if not self.buffer and not first:
            self.idle = True
            try:  # the answer to the last request was just sent: nothing can be here yet
                data = io.recv(self.chunk_size, self.keepalive_timeout, wait_first=True)
            except OSError:  # idle keep-alive connection timed out or was reset
                return None
            finally:
                self.idle = False
            if not data:
                return None
            if not data.startswith(b"\r\n"):  # the common case: the whole head in one read, parsed from it
                end = reader.feed(data)
                if end is not None:
                    self.buffer += memoryview(data)[end:]
                    return self.parsed(reader)
            self.buffer += data
        deadline = time.monotonic() + self.head_timeout
        while True:
            if self.buffer:
                end = reader.feed(self.buffer)
                if end is not None:
                    del self.buffer[:end]
                    return self.parsed(reader)
            if deadline <= time.monotonic():
                return self.head_timed_out()
            try:
                data = io.recv_by(self.chunk_size, deadline)
            except TimeoutError:
                return self.head_timed_out()
            except OSError:
                return None
            if not data:
                return None
            self.buffer += data

    def parsed(self, reader):
        """The RequestHead ``reader`` holds; the reader is kept for the next head only after a bodiless one."""
        head = parse_request_head(reader)
        if head.framing.has_body or not head.keep_alive or head.upgrade:
            self.reader = None  # llhttp would wait for the body or the close: a new one next time
        return head

    def close_if_idle(self):
        """End a keep-alive connection that waits for its next request (glb is stopping)."""
        if self.idle:
            try:
                self.sock.shutdown(stdlib_socket.SHUT_RDWR)
            except OSError:
                pass

    def head_timed_out(self):
        if self.buffer:
            self.balancer.report_error(None, f"{self.peer[0]}: request head not complete within "
                                             f"{self.head_timeout:g} s; connection closed")
            self.refuse(Status.REQUEST_TIMEOUT, "request head not complete in time", report=False)
        return None

    # -- writing -------------------------------------------------------------------------------

    def send(self, data):
        self.io.send(data, self.body_timeout)

    def refuse(self, status, reason, report=True):
        """Answer a request glb will not serve with ``status`` and close (the caller returns)."""
        if report:
            self.balancer.report_error(None, f"{self.peer[0]}: {status}: {reason}")
        body = (reason + "\n").encode("utf-8")
        head = encode_head(f"HTTP/1.1 {status}", [("Content-Type", "text/plain; charset=utf-8"),
                                                 ("Content-Length", str(len(body))), ("Connection", "close")])
        try:
            self.send(head + body)
        except OSError:
            pass

    # -- request bodies ------------------------------------------------------------------------

    def body(self, head):
        """The ClientBody of ``head`` (None when it has none)."""
        decoder = body_for(head.framing)
        return None if decoder is None else ClientBody(self, decoder, head.expect_continue)

    def recv_body(self, limit=None):
        """The next bytes of a request body, at most ``limit`` (into ``buffer`` when None)."""
        try:
            data = self.io.recv(self.chunk_size if limit is None else min(limit, self.chunk_size), self.body_timeout)
        except TimeoutError:
            raise ClientGone(f"request body: nothing for {self.body_timeout:g} s") from None
        except OSError as exc:
            raise ClientGone(f"request body: {exc}") from None
        if not data:
            raise ClientGone("request body: the client closed before its end")
        if limit is not None:
            return data
        self.buffer += data

    # -- WebSocket upgrades --------------------------------------------------------------------

    def upgrade(self, head):
        self.io.close()  # the WebSocket side reads the socket from here on
        request = UpgradeRequest(self, head)
        self.balancer.handle_upgrade(request)
        self.taken = request.socket is None

    # -- glb's own endpoints -------------------------------------------------------------------

    def call_own(self, app, head):
        """Run one of glb's WSGI endpoints for ``head``; whether the connection may be kept."""
        body = b""
        source = self.body(head)
        if source is not None:
            if head.framing.length and head.framing.length > OWN_BODY_LIMIT:
                self.refuse(Status.PAYLOAD_TOO_LARGE, "request body too large")
                return False
            chunks, total = [], 0
            try:
                while (chunk := source.read()):
                    chunks.append(chunk)
                    total += len(chunk)
                    if total > OWN_BODY_LIMIT:
                        self.refuse(Status.PAYLOAD_TOO_LARGE, "request body too large")
                        return False
            except (ClientGone, HeadError) as exc:
                self.refuse(Status.BAD_REQUEST, str(exc))
                return False
            body = b"".join(chunks)
        environ = make_environ(head, self.peer, self.secure, self.sock, io.BytesIO(body))
        started = []

        def start_response(status, headers, exc_info=None):
            started[:] = [status, list(headers)]
            return out.append

        out = []
        try:
            result = app(environ, start_response)
            try:
                out.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            status, headers = started
        except Exception as exc:  # a bug in one of glb's endpoints: 500, logged, never a dead connection
            log.exception("! %s %s failed", head.method, head.path)
            bus = self.balancer.bus
            bus.fire(bus.exception, connection=None, exception=exc)
            self.refuse(Status.INTERNAL_ERROR, "internal error", report=False)
            return False
        payload = b"".join(out)
        keep = head.keep_alive and not self.balancer.ending_keep_alive
        headers = [(n, v) for n, v in headers if n.lower() not in ("content-length", "connection")]
        headers.append(("Content-Length", str(len(payload))))
        if not keep:
            headers.append(("Connection", "close"))
        elif head.version == "1.0":
            headers.append(("Connection", "keep-alive"))
        self.send(encode_head(f"HTTP/1.1 {status}", headers) + (b"" if head.method == "HEAD" else payload))
        return keep


class ClientBody:
    """A client's request body as it arrives: ``read()`` gives the next piece, b'' at the end.

    Raises ClientGone (closed, too slow) or HeadError (bad chunked framing). With
    ``Expect: 100-continue`` the first read sends ``100 Continue`` first.
    """

    def __init__(self, conn, decoder, expect_continue=False):
        self.conn, self.decoder = conn, decoder
        self.expect_continue = expect_continue
        self.trailers = None
        self.started = False
        self.direct = isinstance(decoder, LengthBody)

    @property
    def done(self):
        return self.decoder.done

    def read(self):
        conn, decoder = self.conn, self.decoder
        if not self.started:
            self.started = True
            if self.expect_continue and not conn.buffer:
                conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        while not decoder.done:
            if conn.buffer:
                data, trailers = decoder.take(conn.buffer)
                if trailers is not None:
                    self.trailers = trailers
                if data:
                    return data
                if decoder.done:
                    break
            elif self.direct:  # a Content-Length body: straight from the socket, no copy
                data = conn.recv_body(decoder.remaining)
                decoder.remaining -= len(data)
                return data
            else:
                conn.recv_body()
        return b""

    def available(self):
        """The rest of a Content-Length body if glb already holds all of it, else None."""
        if isinstance(self.decoder, LengthBody) and self.decoder.remaining <= len(self.conn.buffer):
            self.started = True
            return self.decoder.take(self.conn.buffer)[0]
        return None


class UpgradeRequest:
    """An upgrade request as ``Balancer.handle_upgrade`` reads it: a WSGI-style environ and the socket.

    It answers a rejection itself (``start_response`` + ``write``) and lets
    ``accept_websocket`` take the socket, with the bytes glb already read after
    the head (``rfile.read1``).
    """

    def __init__(self, conn, head):
        self.conn = conn
        self.server = conn.server
        self.socket = conn.sock
        self.client_address = conn.peer
        self.environ = make_environ(head, conn.peer, conn.secure, conn.sock)
        self.rfile = _Leftover(conn.buffer)
        self.close_connection = False
        self.status = None
        self.headers_sent = False
        self._response = None

    def start_response(self, status, headers, exc_info=None):
        self._response = (status, list(headers))
        return self.write

    def write(self, body):
        status, headers = self._response
        self.headers_sent = True
        try:
            self.conn.send(encode_head(f"HTTP/1.1 {status}", headers) + body)
        except OSError:
            pass


class _Leftover:
    def __init__(self, buffer):
        self.buffer = buffer

    def read1(self, size=-1):
        data = bytes(self.buffer)
        del self.buffer[:]
        return data


def _route_path(path):
    return unquote(path) if "%" in path else path


def make_environ(head, peer, secure, sock, body=None):
    """A minimal WSGI environ for ``head``: what glb's endpoints and upgrade code read."""
    environ = {
        "REQUEST_METHOD": head.method,
        "PATH_INFO": _route_path(head.path),
        "QUERY_STRING": head.query,
        "RAW_URI": head.target,
        "SERVER_PROTOCOL": f"HTTP/{head.version}",
        "REMOTE_ADDR": peer[0],
        "REMOTE_PORT": str(peer[1]),
        "SCRIPT_NAME": "",
        "wsgi.url_scheme": "https" if secure else "http",
        "wsgi.version": (1, 0),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    try:
        host, port = sock.getsockname()[:2]
        environ["SERVER_NAME"], environ["SERVER_PORT"] = str(host), str(port)
    except (OSError, AttributeError):
        environ["SERVER_NAME"], environ["SERVER_PORT"] = "", ""
    if body is not None:
        environ["wsgi.input"] = body
    for name, value in head.headers:
        key = name.upper().replace("-", "_")
        if key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            environ[key] = value
            continue
        key = "HTTP_" + key
        environ[key] = f"{environ[key]},{value}" if key in environ else value
    return environ


class UpgradeHandler:
    """The handler class given to gevent's WSGIServer: it hands the socket to a ClientConnection."""

    def __init__(self, sock, address, server, rfile=None):
        self.socket, self.client_address, self.server = sock, address, server

    def handle(self):
        sock = self.socket
        sock.settimeout(None)  # waits are bounded by glb.deadlines instead
        if sock.family != stdlib_socket.AF_UNIX:
            sock.setsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_NODELAY, 1)
        conn = ClientConnection(self.server.balancer, sock, self.client_address,
                                secure=bool(getattr(self.server, "ssl_enabled", False)), server=self.server)
        try:
            conn.serve()
        except OSError:  # the client went away mid-answer: nothing left to tell it
            pass
        except Exception as exc:  # a glb bug: logged and reported, the connection closed
            log.exception("! %s connection failed", self.client_address[0] if self.client_address else "-")
            bus = self.server.balancer.bus
            bus.fire(bus.exception, connection=None, exception=exc)
        if conn.taken:
            self.socket = None

    def handle_error(self, *exc_info):  # the TLS server's hook; ClientConnection handles its own
        pass
