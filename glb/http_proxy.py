"""Plain HTTP forwarding: a request that is not an upgrade goes to a backend over a pooled connection.

``HttpProxy.exchange`` serves one request head that ``ClientConnection`` read::

    pick a backend (the HTTP candidates: backends that opted out of HTTP never come up)
    -> http_request   handlers may change method/path/query/headers/body/backend, or respond()
    -> send           the head, then the body as it arrives, on a keep-alive connection from
                      glb.http_pool; a connect/reset failure of an idempotent request tries
                      another backend (at most [http] retries more)
    -> http_response  handlers may change status/headers/body; ``error`` is set on failure
    -> answer         the head, then the body streamed piece by piece as it arrives

Rules:

- Failures are answers: no ready backend 503, refused/reset/malformed answer 502,
  connect or read timeout 504, a client that stops sending its body mid-way 400;
  each also fires ``error``. A backend failing mid-body cuts the client off (no
  terminating chunk, no short body passed off as complete).
- Bodies are bytes, never decoded, and stream both ways: a request body is sent by
  a greenlet of the exchange while the response is read, so neither side waits for
  the other's end. Only a handler reading ``request.body`` or ``response.body``
  buffers it, up to ``buffer_limit``; a larger body reads as None and keeps
  streaming (the prefix already read is sent first). Assigning a body replaces it.
- The path and query go to the backend as the client sent them (``%2F`` stays).
- Hop-by-hop headers (``HOP_BY_HOP``, ``Proxy-*`` and any named in ``Connection``)
  are removed both ways; framing (Content-Length / chunked, trailers included) is
  glb's own on each side. ``X-Forwarded-For`` is appended to, ``X-Forwarded-Proto``
  and ``X-Forwarded-Host`` are set. Repeated headers (Set-Cookie) keep each value.
- ``Expect: 100-continue`` is answered by glb when it starts reading the body;
  other 1xx answers of the backend reach an HTTP/1.1 client before the final one.
- ``http_request`` fires before any backend is called; ``http_response`` fires
  once per request that reached this module, including one answered by an
  ``http_request`` handler (``backend`` None then) so access logs see every request.

``requests`` is not used here: it parses, wraps and copies each request several
times over (its cost was most of a request's). It stays for clients glb makes
on its own behalf (health checks, tooling).
"""

import errno
import http
import logging
import socket
import time

import gevent
from urllib3 import HTTPHeaderDict

from glb.balancing import PickRequest, make_policy
from glb.connection import CLIENT, Connection, Headers
from glb.errors import Status
from glb.http_parse import (  # noqa: F401 (HOP_BY_HOP: part of this module's interface)
    FORWARDED_FOR, HOP_BY_HOP, HOST, NO_BODY_STATUSES, HeadError, LengthBody, UntilCloseBody, body_for,
    decode_pairs, encode_chunk, encode_head, encode_last_chunk, encode_pairs, encode_raw_head, response_head_bytes,
)
from glb.http_pool import RECV_SIZE, BackendClosed, Pools, backend_ssl_context_factory
from glb.http_server import ClientGone

log = logging.getLogger("glb.http")

# Not hop-by-hop, but glb owns them: the length is the body glb sends, and glb
# itself answers ``Expect: 100-continue``.
REQUEST_OWN = frozenset({"content-length", "expect"})
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
BUFFER_LIMIT = 16 * 1024 * 1024  # most a handler may buffer by reading .body
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
_REQUEST_DROP = frozenset(name.encode() for name in HOP_BY_HOP | REQUEST_OWN | _FORWARDED)
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})  # an empty body is still said (Content-Length: 0)


# --------------------------------------------------------------------------- pure helpers


def hop_by_hop_names(headers):
    """Lower-case names not to forward: the fixed set, Proxy-*, and those listed in Connection."""
    names = set(HOP_BY_HOP)
    for name, value in headers:
        lower = name.lower()
        if lower == "connection":
            names.update(token.strip().lower() for token in value.split(",") if token.strip())
        elif lower.startswith("proxy-"):
            names.add(lower)
    return names


def strip_hop_by_hop(headers):
    """``(name, value)`` pairs without hop-by-hop headers; order and duplicates kept."""
    drop = hop_by_hop_names(headers)
    return [(name, value) for name, value in headers if name.lower() not in drop]


def forward_request_headers(raw, peer_ip, scheme, connection_listed=()):
    """The byte pairs a backend gets: hop-by-hop and glb's own removed, X-Forwarded-* appended/set.

    ``connection_listed``: lower-case names the client listed in Connection (hop-by-hop too).
    """
    out, chain, host = [], [], None
    for pair in raw:
        lower = pair[0].lower()
        if lower in _REQUEST_DROP or lower.startswith(b"proxy-") or lower in connection_listed:
            if lower == b"x-forwarded-for":
                chain.append(pair[1])
            continue
        if lower == b"host":
            host = pair[1]
        out.append(pair)
    if peer_ip:
        chain.append(peer_ip.encode("latin-1"))
    if chain:
        out.append((b"X-Forwarded-For", b", ".join(chain)))
    out.append((b"X-Forwarded-Proto", scheme.encode("latin-1")))
    if host:
        out.append((b"X-Forwarded-Host", host))
    return out


def forward_request_head(head, peer_ip, scheme, host=None):
    """The head a backend gets for a bodiless ``head``, made from its bytes (``head.verbatim`` only).

    The same rules as ``forward_request_headers``: every field glb looks at but
    Host is dropped (hop-by-hop, framing, Expect, Proxy-*, X-Forwarded-*), the
    rest pass as they came; X-Forwarded-For/Proto/Host follow. ``host``: the
    backend's own Host, replacing the client's.
    """
    data = head.data
    if head.version == "1.1":  # the request line as it came (the target is the client's: verbatim)
        parts = [data[:head.line_end]]
    else:
        target = f"{head.path}?{head.query}" if head.query else head.path
        parts = [f"{head.method} {target} HTTP/1.1".encode("latin-1")]
    at = head.line_end
    chain = []
    for code, start, end, value in head.fields:
        if code == HOST and host is None:
            continue
        if code == FORWARDED_FOR:
            chain.append(value)
        parts.append(data[at:start])
        at = end
    parts.append(data[at:len(data) - 4])
    if peer_ip:
        chain.append(peer_ip.encode("latin-1"))
    if chain:
        parts += (b"\r\nX-Forwarded-For: ", b", ".join(chain))
    parts += (b"\r\nX-Forwarded-Proto: ", scheme.encode("latin-1"))
    if head.host:
        parts += (b"\r\nX-Forwarded-Host: ", head.host)
    if host is not None:
        parts += (b"\r\nHost: ", host)
    parts.append(b"\r\n\r\n")
    return b"".join(parts)


def header_items(headers):
    """A headers value a handler may have set (mapping, HTTPHeaderDict or pairs) as a list of str pairs."""
    if isinstance(headers, HTTPHeaderDict):
        items = headers.iteritems()
    elif hasattr(headers, "items"):
        items = headers.items()
    else:
        items = headers
    return [(str(name), str(value)) for name, value in items]


def status_line(code, reason=None):
    """``"502 Bad Gateway"``; ``reason`` when given (the backend's own), else the standard phrase."""
    if not reason:
        try:
            reason = http.HTTPStatus(code).phrase
        except ValueError:
            reason = "Unknown"
    return f"{code} {reason}"


class Failure:
    """What went wrong talking to a backend (or reading the client's body), decided from the exception."""

    CONNECT = "connect"                  # refused or unreachable: never reached the backend
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within connect_timeout
    RESET = "reset"                      # the backend dropped the connection
    READ_TIMEOUT = "read_timeout"        # no answer (or next piece) within read_timeout
    BAD_RESPONSE = "bad_response"        # the backend's answer is not valid HTTP/1.1
    CLIENT = "client"                    # the client stopped sending its body, or broke its framing
    OTHER = "other"

    # kind: (status, body, another backend may be tried for an idempotent request)
    TABLE = {
        CONNECT: (Status.BAD_GATEWAY, b"bad gateway: the backend could not be reached\n", True),
        CONNECT_TIMEOUT: (Status.GATEWAY_TIMEOUT, b"gateway timeout: the backend did not accept in time\n", True),
        RESET: (Status.BAD_GATEWAY, b"bad gateway: the backend closed the connection\n", True),
        READ_TIMEOUT: (Status.GATEWAY_TIMEOUT, b"gateway timeout: the backend did not answer in time\n", False),
        BAD_RESPONSE: (Status.BAD_GATEWAY, b"bad gateway: the backend's answer was malformed\n", False),
        CLIENT: (Status.BAD_REQUEST, b"bad request: the request body ended early or was malformed\n", False),
        OTHER: (Status.BAD_GATEWAY, b"bad gateway: the backend request failed\n", False),
    }

    def __init__(self, kind, text):
        self.kind, self.text = kind, text

    @property
    def retryable(self):
        return self.TABLE[self.kind][2]

    @classmethod
    def from_exception(cls, exc, connecting=False):
        if isinstance(exc, ClientGone):
            return cls(cls.CLIENT, str(exc))
        if isinstance(exc, HeadError):
            return cls(cls.BAD_RESPONSE, f"malformed response: {exc.reason}")
        if isinstance(exc, TimeoutError):
            return cls(cls.CONNECT_TIMEOUT, "connect timed out") if connecting else cls(
                cls.READ_TIMEOUT, "read timed out")
        if isinstance(exc, ConnectionRefusedError):
            return cls(cls.CONNECT, f"connection refused ({_short(exc)})")
        if connecting:
            return cls(cls.CONNECT, f"cannot connect ({_short(exc)})")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return cls(cls.RESET, f"connection reset ({_short(exc)})")
        return cls(cls.OTHER, _short(exc))


def _short(exc):
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _read_bounded(read, limit):
    """Call ``read()`` until it returns b'' or more than ``limit`` bytes came: (chunks, complete)."""
    chunks, total = [], 0
    while True:
        chunk = read()
        if not chunk:
            return chunks, True
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            return chunks, False


class _HeaderHolder:
    """``headers`` as handlers see them, made only when a handler looks: raw byte pairs until then."""

    def _init_headers(self, raw=None, pairs=None):
        self._raw = raw  # byte pairs as they will be written, while no handler has looked
        self._headers = None if pairs is None else HTTPHeaderDict(pairs)

    @property
    def headers(self):
        """A case-insensitive HTTPHeaderDict keeping repeats: ``add()`` one, ``getlist()`` all."""
        if self._headers is None:
            self._headers = HTTPHeaderDict(decode_pairs(self._raw))
        return self._headers

    @headers.setter
    def headers(self, value):
        self._headers = value if isinstance(value, HTTPHeaderDict) else HTTPHeaderDict(header_items(value))

    @property
    def touched(self):
        """A handler has looked at (and may have changed) the headers."""
        return self._headers is not None

    def header_pairs(self):
        """The headers as str pairs."""
        return header_items(self._headers) if self._headers is not None else decode_pairs(self._raw)

    def wire_headers(self):
        """The byte pairs to write; a handler's are checked first (ValueError for a broken one)."""
        if self._headers is None:
            return list(self._raw)
        return encode_pairs(header_items(self._headers))


# --------------------------------------------------------------------------- request / response


class HttpRequest(_HeaderHolder):
    """What ``http_request``/``http_response`` handlers see as ``event.request``.

    ``method``, ``path`` (as the client sent it, percent-encoded), ``query`` (raw,
    no ``?``), ``headers`` (an HTTPHeaderDict: hop-by-hop already removed,
    X-Forwarded-* added) and ``body`` are assignable; ``peer_ip`` and ``scheme``
    are for reading. Reading ``body`` buffers it (see the module doc); None means
    too large to buffer.
    """

    def __init__(self, method, path, query, headers, peer_ip="", scheme="http", source=None,
                 length=None, buffer_limit=BUFFER_LIMIT, peer_port=0):
        self.method, self.path, self.query = method, path, query
        self._init_headers(raw=headers)
        self.peer_ip, self.scheme, self.peer_port = peer_ip, scheme, peer_port
        self._source = source  # a ClientBody still to be read, or None
        self._length = length  # its Content-Length, None for chunked
        self._buffer_limit = buffer_limit
        self._body = None if source is not None else b""
        self._prefix = []  # pieces already read (by prime() or a handler), sent first
        self._overflow = False  # a handler's read went past buffer_limit: body reads None
        self.started = time.monotonic()  # for the request's duration in metrics and the access log
        self._streamed = False  # a piece of the streamed body was sent: no replay elsewhere
        self.client_failure = None

    @property
    def body(self):
        if self._body is None and not self._overflow:
            held = sum(map(len, self._prefix))
            try:
                chunks, complete = _read_bounded(self._source.read, self._buffer_limit - held)
            except (ClientGone, HeadError) as exc:
                self.client_failure = str(exc)
                self._body = b""
                return None
            if complete:
                self._body = b"".join(self._prefix + chunks)
                self._prefix = []
            else:
                self._prefix += chunks
                self._overflow = True
        return self._body

    @body.setter
    def body(self, value):
        if self._body is None and not self._overflow:
            self.body  # what the client sends is read (and dropped) so the connection stays usable
        self._body = value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")
        self._prefix = []

    def prime(self):
        """Read the first piece of a streamed body now (glb checks its framing before forwarding)."""
        first = self._source.read()
        if self._source.done and not self._source.trailers:
            self._body = first  # all here already: sent with a Content-Length
        else:
            self._prefix = [first]

    @property
    def replayable(self):
        """Can this request be sent again (to another backend or on a fresh connection)?"""
        return self._body is not None or not self._streamed

    def pieces(self):
        """The streamed body, piece by piece (prefix first); raises ClientGone / HeadError from the client."""
        self._streamed = True
        prefix, self._prefix = self._prefix, []
        yield from prefix
        read = self._source.read
        while chunk := read():
            yield chunk

    def __repr__(self):
        return f"<HttpRequest {self.method} {self.path}{'?' + self.query if self.query else ''}>"


class HttpResponse(_HeaderHolder):
    """What ``http_response`` handlers see as ``event.response``: ``status``, ``headers``, ``body``.

    ``headers`` is the same HTTPHeaderDict type as the request's (a handler may also
    assign a mapping or a list of pairs). ``body`` is bytes once read or assigned;
    reading a streamed body buffers up to the limit and reads None beyond it.
    """

    def __init__(self, status, headers=None, body=b"", reason=None, source=None, buffer_limit=BUFFER_LIMIT,
                 raw=None):
        self.status = status
        self._init_headers(raw=raw, pairs=headers if raw is None else None)
        self._reason = (status, reason)
        self._source = source  # a BackendBody still to be read, or None
        self._buffer_limit = buffer_limit
        self._body = body if source is None else None
        self._prefix = []
        self.stream_failure = None  # a Failure while a handler was reading the body

    @classmethod
    def error(cls, failure_kind):
        status, body, _ = Failure.TABLE[failure_kind]
        return cls.simple(status, body)

    @classmethod
    def simple(cls, status_text, body):
        return cls(int(status_text.split()[0]), [("Content-Type", "text/plain; charset=utf-8")], body)

    @property
    def body(self):
        if self._body is None and not self._prefix and self._source is not None:
            try:
                chunks, complete = _read_bounded(self._source.read, self._buffer_limit)
            except (OSError, HeadError) as exc:
                self.stream_failure = Failure.from_exception(exc)
                self._source.abandon()
                return None
            if complete:
                self._body = b"".join(chunks)
            else:
                self._prefix = chunks
        return self._body

    @body.setter
    def body(self, value):
        self._body = value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")
        self._prefix = []

    def body_length(self):
        """Body bytes for the client: the buffered body's, else the backend's Content-Length (0 if unsaid)."""
        if self._body is not None:
            return len(self._body)
        if self._source is not None and self._source.length is not None:
            return self._source.length
        return 0

    @property
    def status_text(self):
        code, reason = self._reason
        return status_line(self.status, reason if code == self.status else None)


class BackendBody:
    """A backend response body being read off its pooled connection, piece by piece."""

    def __init__(self, proxy, conn, head, uploading):
        self.proxy, self.conn, self.head = proxy, conn, head
        self.decoder = body_for(head.framing) or (UntilCloseBody() if head.framing.length is None
                                                  and not head.framing.chunked else None)
        self.trailers = None
        self.uploading = uploading  # a function: is the request still being sent?
        self.direct = isinstance(self.decoder, LengthBody)

    @property
    def length(self):
        return self.head.framing.length

    @property
    def chunked(self):
        return self.head.framing.chunked

    @property
    def complete(self):
        return self.decoder is None or self.decoder.done

    def read(self, wait=True):
        """The next piece (b'' at the end); with ``wait=False``, only what is already buffered."""
        decoder, conn = self.decoder, self.conn
        while decoder is not None and not decoder.done:
            if conn.buffer:
                data, trailers = decoder.take(conn.buffer)
                if trailers is not None:
                    self.trailers = trailers
                if data:
                    return data
                continue
            if not wait:
                return b""
            if self.direct:  # a Content-Length body: straight from the socket, no copy
                data = conn.recv(min(RECV_SIZE, decoder.remaining))
                if not data:
                    raise BackendClosed(errno.ECONNRESET, "the backend closed the connection mid-body")
                decoder.remaining -= len(data)
                return data
            try:
                conn.fill()
            except BackendClosed:
                if isinstance(decoder, UntilCloseBody):
                    decoder.end()
                    break
                raise
        self.release()
        return b""

    def release(self):
        """Give the connection back (the body is complete) or close it (it is not)."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        if self.complete and self.head.keep_alive and not self.uploading():
            self.proxy.pools.put(conn)
        else:
            self.proxy.pools.discard(conn)

    def abandon(self):
        conn, self.conn = self.conn, None
        if conn is not None:
            self.proxy.pools.discard(conn)


class _UrlBackend:
    """A backend a handler named by URL (``event.backend = "http://host:port"``)."""

    def __init__(self, url):
        self.guid = self.name = url
        self._base = url.rstrip("/")

    def http_base(self):
        return self._base

    def __repr__(self):
        return f"<backend {self._base}>"


class _Exchange:
    """One request and its answer on one client connection: what the steps share."""

    __slots__ = ("client", "head", "request", "body", "uploader", "upload_done", "answered")

    def __init__(self, client, head, request, body):
        self.client, self.head, self.request, self.body = client, head, request, body
        self.uploader = None
        self.upload_done = body is None
        self.answered = False  # the response head went to the client

    def uploading(self):
        return not self.upload_done

    def stop_upload(self):
        uploader, self.uploader = self.uploader, None
        if uploader is not None:
            uploader.kill(block=True, timeout=1)


# --------------------------------------------------------------------------- the proxy


class HttpProxy:
    """Forwards plain HTTP requests; one per Balancer, owns the backend connection pools."""

    def __init__(self, balancer):
        self.balancer = balancer
        settings = balancer.settings
        conf = settings.http
        self.enabled = "http" in settings.glb.protocols
        self.prefix = settings.glb.prefix
        self.retries = conf.retries
        self.backend_host = conf.host_header == "backend"
        self.max_head_size = conf.max_head_size
        self.buffer_limit = BUFFER_LIMIT
        self.policy = self._policy_of = None  # made by pick(), anew whenever Balancer.policy is replaced
        self.pools = Pools(conf.connect_timeout, conf.read_timeout, conf.pool_maxsize, conf.pool_connections,
                           conf.pool_idle_timeout, backend_ssl_context_factory(balancer))
        self._sweeper = None
        self.clients = set()  # every open ClientConnection (glb.http_server), for end_idle_clients()

    def start(self):
        """Start the greenlet that closes idle pooled connections and those of departed backends."""
        if self._sweeper is None:
            self._sweeper = gevent.spawn(self._sweep_forever)

    def _sweep_forever(self):
        tick = max(0.05, min(self.pools.idle_timeout / 4, 1.0))
        while True:
            gevent.sleep(tick)
            self.pools.sweep()

    def close(self):
        """Stop the sweeper and close the pooled backend connections (requests in flight finish)."""
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
            self._sweeper = None
        self.pools.close()

    def end_idle_clients(self):
        """Close the keep-alive client connections waiting for a next request (glb is stopping)."""
        for client in list(self.clients):
            client.close_if_idle()

    # -- one request ---------------------------------------------------------------------------

    def exchange(self, client, head):
        """Serve ``head`` (body included) from a backend; whether the client connection may be kept."""
        if not self.enabled or head.path.startswith(self.prefix):
            reason = ("not found: plain HTTP is turned off\n" if not self.enabled
                      else "not found: no glb endpoint at this path\n")
            return self.answer_plain(client, head, Status.NOT_FOUND, reason.encode())
        framing, bus = head.framing, self.balancer.bus
        if (not framing.chunked and not framing.length and head.method not in _BODY_METHODS
                and not bus.http_request.receivers and not bus.http_response.receivers
                and self.balancer.settings.glb.balancing != "hash"):
            try:
                keep = self.exchange_plain(client, head)
            except (OSError, ClientGone):  # the client left while glb answered it
                return False
            except Exception as exc:  # a glb bug: 500 (nothing was sent yet), never a traceback to pywsgi
                self.failed_with_bug(head, exc)
                client.refuse(Status.INTERNAL_ERROR, "internal error", report=False)
                return False
            if keep is not None:
                return keep
        ex = self.new_exchange(client, head)
        return False if ex is None else self.run(ex, self.handle)

    def new_exchange(self, client, head, started=None):
        """The _Exchange of ``head`` (None if its first chunk-size line was bad: refused already)."""
        body = client.body(head)
        scheme = "https" if client.secure else "http"
        request = HttpRequest(head.method, head.path, head.query,
                              forward_request_headers(head.raw_headers, client.peer[0], scheme, head.connection),
                              client.peer[0], scheme, body, head.framing.length, self.buffer_limit,
                              client.peer[1])
        if started is not None:
            request.started = started
        ex = _Exchange(client, head, request, body)
        if head.framing.chunked:
            try:  # a bad first chunk-size line is refused before any backend sees the head
                request.prime()
            except (ClientGone, HeadError) as exc:
                client.refuse(getattr(exc, "status", Status.BAD_REQUEST), str(exc))
                return None
        return ex

    def run(self, ex, step, *args):
        """``step(ex, *args)``, whether the client connection may be kept; a failure never escapes."""
        try:
            return step(ex, *args)
        except (OSError, ClientGone):  # the client left while glb answered it
            return False
        except Exception as exc:  # a glb bug: answer 500 if nothing was sent yet, never a traceback to pywsgi
            self.failed_with_bug(ex.head, exc)
            if not ex.answered:
                ex.client.refuse(Status.INTERNAL_ERROR, "internal error", report=False)
            return False
        finally:
            ex.stop_upload()

    def failed_with_bug(self, head, exc):
        log.exception("! http %s %s failed", head.method, head.path)
        bus = self.balancer.bus
        bus.fire(bus.exception, connection=None, exception=exc)

    def exchange_plain(self, client, head):
        """The common request, flat: no body, no HTTP handler, no hashing; None to take the general path.

        It does what ``handle`` would, in one function and without the objects
        handlers need. Whatever it does not cover — a failure, an interim 1xx, a
        body the backend has not sent whole yet, chunked or close-delimited — goes
        on in the general path from where it stands (``forward``, ``answer``), so
        the outcome is the same either way.
        """
        started = time.monotonic()
        backend = self.pick(None)
        if backend is None:
            return None  # the general path answers 503 and reports it
        base = backend.http_base()
        try:
            conn = self.pools.get(base, backend, head.method not in IDEMPOTENT)
        except (OSError, ValueError) as exc:
            ex = self.new_exchange(client, head, started)
            return self.run(ex, self.forward_and_answer, backend, (exc, True))
        scheme = "https" if client.secure else "http"
        if head.verbatim:
            host = self.pools.address(base)[3].encode("latin-1") if self.backend_host or not head.host else None
            request = forward_request_head(head, client.peer[0], scheme, host)
        else:
            target = f"{head.path}?{head.query}" if head.query else head.path
            request = encode_raw_head(f"{head.method} {target} HTTP/1.1".encode("latin-1"), self.host_header(
                forward_request_headers(head.raw_headers, client.peer[0], scheme, head.connection), base))
        try:
            conn.send(request)
            response = conn.read_head(head.method, self.max_head_size)
        except (OSError, HeadError) as exc:
            conn.close()
            ex = self.new_exchange(client, head, started)
            stale = (isinstance(exc, (ConnectionResetError, BrokenPipeError)) and conn.reused
                     and not conn.got_bytes and head.method in IDEMPOTENT)
            return self.run(ex, self.forward_and_answer, backend, None if stale else (exc, False))
        framing = response.framing
        length = framing.length
        if response.status < 200 or framing.chunked or length is None or len(conn.buffer) < length:
            ex = self.new_exchange(client, head, started)
            return self.run(ex, self.answer_backend, conn, response, backend)
        body = b""
        if length:
            buffer = conn.buffer
            if len(buffer) == length:
                body = bytes(buffer)
                buffer.clear()
            else:
                body = bytes(buffer[:length])
                del buffer[:length]
        if response.keep_alive:
            self.pools.put(conn)
        else:
            self.pools.discard(conn)
        self.balancer.stats.http_request(_name(backend), response.status, time.monotonic() - started, length)
        keep = head.keep_alive and not self.balancer.stopping
        extra = b"" if keep and head.version == "1.1" else (
            b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n")
        if response.version == "1.1" and response.reason:  # the status line as it came
            line = response.data[:response.line_end]
        else:
            line = f"HTTP/1.1 {status_line(response.status, response.reason)}".encode("latin-1")
        client.send(response_head_bytes(response, line, extra) + body)
        return keep

    def forward_and_answer(self, ex, backend, failed):
        response, failure, backend = self.forward(ex, backend, None, failed)
        return self.answer(ex, response, failure and failure.text, backend)

    def answer_backend(self, ex, conn, head, backend):
        """Answer with a backend response whose head ``exchange_plain`` read (interim ones first)."""
        if head.status < 200:
            try:
                head = self.read_final_head(ex, conn, head)
            except (OSError, HeadError) as exc:
                conn.close()
                return self.forward_and_answer(ex, backend, (exc, False))
        response = HttpResponse(head.status, raw=head.raw_headers, reason=head.reason,
                                source=BackendBody(self, conn, head, ex.uploading), buffer_limit=self.buffer_limit)
        return self.answer(ex, response, None, backend)

    def handle(self, ex):
        bus, request = self.balancer.bus, ex.request
        pick = self.pick_request(request)
        backend = self.pick(pick)
        if bus.http_request.receivers:
            event = bus.fire(bus.http_request, request=request, backend=backend)
            if event.response is not None:
                status, headers, body = event.response
                response = HttpResponse(status, header_items(headers), body)
                return self.answer(ex, response, None, None)
            backend = self.resolve(event.backend)
        if backend is None:
            error = "no backend is ready for HTTP"
            self.report(request, error)
            response = HttpResponse.simple(Status.SERVICE_UNAVAILABLE,
                                           b"service unavailable: no backend is ready\n")
            return self.answer(ex, response, error, None)
        response, failure, backend = self.forward(ex, backend, pick)
        return self.answer(ex, response, failure and failure.text, backend)

    def pick(self, pick, exclude=()):
        """A backend that takes HTTP, by a policy of its own (policies cache by the candidate list)."""
        if self._policy_of is not self.balancer.policy:  # first use, or a reload changed the balancing
            glb = self.balancer.settings.glb
            self._policy_of = self.balancer.policy
            self.policy = make_policy(glb.balancing, hash_key=glb.hash_key)
        return self.policy.pick(self.balancer.registry.http_candidates(), request=pick, exclude=exclude)

    def pick_request(self, request):
        """What the balancing policy looks at; only the hash policy looks at anything."""
        if self.balancer.settings.glb.balancing != "hash":
            return None
        query = {}
        for part in request.query.split("&"):
            name, _, value = part.partition("=")
            query.setdefault(name, value)
        return PickRequest(request.peer_ip, dict(request.header_pairs()), query)

    # -- forwarding ----------------------------------------------------------------------------

    def forward(self, ex, backend, pick, failed=None):
        """Send to ``backend``, trying others on a retryable failure: (response, failure, backend).

        ``failed``: ``(exception, connecting)`` of an attempt already made on ``backend``.
        """
        request, tried = ex.request, []
        while True:
            if failed is None:
                connecting = [True]
                try:
                    return self.send(ex, backend, connecting), None, backend
                except (OSError, ValueError, HeadError, ClientGone) as exc:
                    failed = exc, connecting[0]
            exc, connecting = failed
            failed = None
            failure = Failure.from_exception(exc, connecting)
            if request.client_failure:
                failure = Failure(Failure.CLIENT, request.client_failure)
            failure.text = f"http backend {_name(backend)}: {failure.text}"
            self.report(request, failure.text)
            if failure.kind in (Failure.CONNECT, Failure.CONNECT_TIMEOUT) and hasattr(backend, "health"):
                self.balancer.health.connect_failed(backend)  # passive check (max_fails)
            tried.append(backend)
            if (failure.retryable and request.method in IDEMPOTENT and request.replayable
                    and len(tried) <= self.retries):
                other = self.pick(pick, exclude=tried)
                if other is not None:
                    backend = other
                    continue
            return HttpResponse.error(failure.kind), failure, backend

    def send(self, ex, backend, connecting):
        """One backend's response head to the request (the body follows as it is read)."""
        base = backend.http_base()
        check = ex.request.method not in IDEMPOTENT
        for attempt in (1, 2):
            connecting[0] = True
            conn = self.pools.get(base, backend, check, fresh=attempt == 2)
            connecting[0] = False
            try:
                self.write_request(ex, conn, base)
                head = self.read_final_head(ex, conn)
            except (OSError, HeadError, ClientGone) as exc:
                ex.stop_upload()
                conn.close()
                stale = (isinstance(exc, (ConnectionResetError, BrokenPipeError)) and conn.reused
                         and not conn.got_bytes and ex.request.client_failure is None)
                # The backend had closed the idle connection: once more on a new one, for a method
                # that is safe to send twice (RFC 9110 §9.2.2); others were checked at checkout.
                if stale and attempt == 1 and ex.request.replayable and ex.request.method in IDEMPOTENT:
                    continue
                raise
            return HttpResponse(head.status, raw=head.raw_headers, reason=head.reason,
                                source=BackendBody(self, conn, head, ex.uploading),
                                buffer_limit=self.buffer_limit)

    def write_request(self, ex, conn, base):
        request, body = ex.request, ex.body
        pairs = self.host_header(request.wire_headers(), base)
        payload = b""
        stream = False
        if request._body is not None:
            payload = request._body
            if payload or request.method in _BODY_METHODS:
                pairs.append((b"Content-Length", b"%d" % len(payload)))
        elif body is not None:
            available = body.available() if not request._prefix else None
            if available is not None:
                payload = request._body = available
                pairs.append((b"Content-Length", b"%d" % len(payload)))
            elif request._length is not None:
                pairs.append((b"Content-Length", b"%d" % request._length))
                stream = True
            else:
                pairs.append((b"Transfer-Encoding", b"chunked"))
                stream = True
        elif request.method in _BODY_METHODS:
            pairs.append((b"Content-Length", b"0"))
        target = f"{request.path}?{request.query}" if request.query else request.path
        line = f"{request.method} {target} HTTP/1.1".encode("latin-1")
        conn.send(encode_raw_head(line, pairs) + payload)
        if stream:
            ex.upload_done = False
            ex.uploader = gevent.spawn(self.upload, ex, conn, request._length is None)
        elif body is not None:
            ex.upload_done = True

    def host_header(self, pairs, base):
        """``pairs`` with the backend's own Host when so configured or when the client sent none."""
        if self.backend_host or not any(name.lower() == b"host" for name, _ in pairs):
            netloc = self.pools.address(base)[3].encode("latin-1")
            pairs = [(n, v) for n, v in pairs if n.lower() != b"host"] + [(b"Host", netloc)]
        return pairs

    def upload(self, ex, conn, chunked):
        """The exchange's uploader greenlet: the client's body to the backend as it arrives."""
        request, sock = ex.request, conn.sock
        try:
            for piece in request.pieces():
                conn.send(encode_chunk(piece) if chunked else piece)
            if chunked:
                conn.send(encode_last_chunk(ex.body.trailers))
            ex.upload_done = True
        except (ClientGone, HeadError) as exc:
            request.client_failure = f"request body: {exc}" if "request body" not in str(exc) else str(exc)
            try:  # wake the reader of the response: this exchange is over
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        except OSError:  # the backend stopped reading; its answer (or failure) is read by the exchange
            pass

    def read_final_head(self, ex, conn, head=None):
        """The first non-1xx response head; interim ones reach an HTTP/1.1 client (glb's own 100 aside)."""
        while True:
            if head is None:
                head = conn.read_head(ex.request.method, self.max_head_size)
            if head.status >= 200:
                return head
            if head.status == 101:
                raise HeadError("101 Switching Protocols to a plain request")
            if ex.head.version == "1.1" and head.status != 100:
                line = f"HTTP/1.1 {status_line(head.status, head.reason)}".encode("latin-1")
                ex.client.send(encode_raw_head(line, head.raw_headers))
            head = None

    def resolve(self, backend):
        """The backend a handler left in ``event.backend``: a Backend, a guid or an http(s) URL."""
        if backend is None or isinstance(backend, _UrlBackend):
            return backend
        if isinstance(backend, str):
            if "://" in backend:
                return _UrlBackend(backend)
            backend = self.balancer.registry.get(backend) or backend
        if getattr(backend, "takes_http", False):
            return backend
        log.warning("! http_request handler set a backend that takes no HTTP: %r", backend)
        return None

    # -- answering -----------------------------------------------------------------------------

    def answer(self, ex, response, error, backend):
        bus = self.balancer.bus
        if bus.http_response.receivers:
            bus.fire(bus.http_response, request=ex.request, response=response, error=error, backend=backend)
            if response.stream_failure is not None and response._body is None:
                failure = response.stream_failure
                self.report(ex.request, f"http backend {_name(backend)}: {failure.text}")
                response = HttpResponse.error(failure.kind)
        self.balancer.stats.http_request(_name(backend), response.status,
                                         time.monotonic() - ex.request.started, response.body_length())
        return self.write_response(ex, response, backend)

    def write_response(self, ex, response, backend):
        """The response to the client; whether its connection may be kept."""
        client, head, request = ex.client, ex.head, ex.request
        source = response._source if response._body is None else None
        if source is None and response._source is not None:
            response._source.release()  # a body buffered or replaced: the backend's is done with
        no_body = head.method == "HEAD" or response.status in NO_BODY_STATUSES or response.status < 200
        touched = response.touched  # else: the backend's pairs, hop-by-hop already gone
        pairs = encode_pairs(strip_hop_by_hop(response.header_pairs())) if touched else list(response._raw)
        keep = head.keep_alive and request.client_failure is None and not self.balancer.ending_keep_alive
        chunked = False
        payload = b""
        extra = []
        if not no_body:
            if source is None or touched:
                pairs = [(n, v) for n, v in pairs if n.lower() != b"content-length"]
            if source is None:
                payload = response._body
                extra.append(b"Content-Length: %d" % len(payload))
            elif source.length is not None:
                if touched:
                    extra.append(b"Content-Length: %d" % source.length)
            elif head.version == "1.1":
                extra.append(b"Transfer-Encoding: chunked")
                chunked = True
            else:
                keep = False  # an HTTP/1.0 client learns the end when glb closes
        elif source is not None:
            source.read()  # nothing follows: the connection goes back to the pool
            source = None
        if ex.body is not None and not ex.body.done and source is None:
            keep = False  # the client's body was not read to its end
        if not keep:
            extra.append(b"Connection: close")
        elif head.version == "1.0":
            extra.append(b"Connection: keep-alive")
        out = encode_raw_head(f"HTTP/1.1 {response.status_text}".encode("latin-1"), pairs,
                              b"".join(line + b"\r\n" for line in extra))
        if source is None:
            ex.answered = True
            client.send(out + payload)
            return keep
        prefix, response._prefix = response._prefix, []
        try:
            if not prefix:
                first = self.read_backend(source, request, backend, wait=False)
                if first is None:
                    client.refuse(Status.BAD_GATEWAY, "bad gateway: the backend's answer was malformed",
                                  report=False)
                    return False
                if first:
                    prefix = [first]
            ex.answered = True
            client.send(out + b"".join(encode_chunk(p) for p in prefix) if chunked
                        else out + b"".join(prefix))
            while piece := self.read_backend(source, request, backend):
                client.send(encode_chunk(piece) if chunked else piece)
            if piece is None:
                _cut_off(client)
                return False
            if chunked:
                client.send(encode_last_chunk(source.trailers))
        except OSError:  # the client left: the backend connection cannot be reused
            source.abandon()
            raise
        if ex.uploading():
            keep = False  # the backend answered before the request body ended: the client cannot go on
        return keep and (ex.body is None or ex.body.done)

    def read_backend(self, source, request, backend, wait=True):
        """The next piece of a backend body; None (reported, connection dropped) if the backend failed."""
        try:
            return source.read(wait)
        except (OSError, HeadError) as exc:
            source.abandon()
            failure = Failure.from_exception(exc)
            self.report(request, f"http backend {_name(backend)}: response cut short: {failure.text}")
            return None

    def answer_plain(self, client, head, status, body):
        pairs = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
        keep = head.keep_alive and not head.framing.has_body
        if not keep:
            pairs.append(("Connection", "close"))
        client.send(encode_head(f"HTTP/1.1 {status}", pairs) + (b"" if head.method == "HEAD" else body))
        return keep

    def report(self, request, text):
        """Fire ``error`` (and log) for a failed request, with a connection describing it."""
        conn = Connection((request.peer_ip, request.peer_port), request.path, request.query,
                          Headers(request.header_pairs()), CLIENT, secure=request.scheme == "https")
        self.balancer.report_error(conn, f"{request.method} {request.path}: {text}")


def _cut_off(client):
    """End a client connection mid-response so the client sees a broken body, not a complete one."""
    try:
        client.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _name(backend):
    return getattr(backend, "name", None) or getattr(backend, "guid", None) or "-"

