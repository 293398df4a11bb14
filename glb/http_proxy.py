"""Plain HTTP forwarding: a request that is not an upgrade goes to a backend from the pool.

``HttpProxy`` is the WSGI app behind ``Balancer.forward_http``. One request is::

    pick a backend (same pool and policy as sessions; None when none is ready)
    -> http_request   handlers may change method/path/query/headers/body/backend, or respond()
    -> send           one pooled requests HTTPAdapter; connect/reset failures of an idempotent
                      request try another backend (at most [http] retries more)
    -> http_response  handlers may change status/headers/body; ``error`` is set on failure
    -> answer         streamed to the client in [http] chunk_size pieces

Rules:

- Failures are answers: no ready backend 503, refused/reset 502, connect or read
  timeout 504, a client that stops sending its body mid-way 400; each also fires
  ``error``. Nothing that goes wrong with a backend reaches pywsgi as a traceback.
- Bodies stream both ways and are never read whole, except when a handler reads
  ``request.body`` or ``response.body``: that reads up to ``buffer_limit`` bytes;
  a larger body reads as None and keeps streaming (the prefix already read is
  sent first). Assigning a body replaces it and fixes Content-Length.
- Hop-by-hop headers (``HOP_BY_HOP``, ``Proxy-*`` and any named in ``Connection``)
  are removed both ways; ``X-Forwarded-For`` is appended to, ``X-Forwarded-Proto``
  and ``X-Forwarded-Host`` are set. Response headers keep duplicates (Set-Cookie)
  and Content-Encoding bodies pass through undecoded. Redirects are not followed.
- requests is used below its Session: no cookie jar (one client's cookies would
  reach the next), no environment proxies, no default headers the client did
  not send. The Session only owns the mounted adapter.
- ``http_request`` fires before any backend is called; ``http_response`` fires
  once per request that reached this module, including one answered by an
  ``http_request`` handler (``backend`` None then) so access logs see every request.

Limitation: pywsgi hands over PATH_INFO percent-decoded, so the path forwarded
is that path re-quoted (``%2F`` inside a segment becomes ``/``).
"""

import errno
import http
import http.client
import logging
import time
from collections.abc import Mapping
from urllib.parse import quote, urlsplit

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.util import SKIP_HEADER

from glb import tls
from glb.connection import CLIENT, Connection, headers_from_environ
from glb.errors import Status

log = logging.getLogger("glb.http")

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})
# Not hop-by-hop, but glb owns them: the length is the body glb sends, and glb
# itself answers ``Expect: 100-continue`` (pywsgi sends 100 on the first read).
REQUEST_OWN = frozenset({"content-length", "expect"})
IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS", "TRACE"})
NO_BODY_STATUSES = frozenset({204, 304})
BUFFER_LIMIT = 16 * 1024 * 1024  # most a handler may buffer by reading .body

_PATH_SAFE = "/:@!$&'()*+,;=-._~"


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


def header_items(headers):
    """A headers value a handler may have set (mapping or pairs) as a list of str pairs."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(str(name), str(value)) for name, value in items]


def status_line(code, reason=None):
    """``"502 Bad Gateway"``; ``reason`` when given (the backend's own), else the standard phrase."""
    if not reason:
        try:
            reason = http.HTTPStatus(code).phrase
        except ValueError:
            reason = "Unknown"
    return f"{code} {reason}"


def path_from_environ(environ):
    """The request path, re-quoted from the decoded PATH_INFO pywsgi provides."""
    path = environ.get("PATH_INFO", "") or "/"
    return quote(path.encode("latin-1"), safe=_PATH_SAFE)


def forwarded_headers(headers, peer_ip, scheme):
    """Add X-Forwarded-For (appended), X-Forwarded-Proto and X-Forwarded-Host in place."""
    previous = headers.get("X-Forwarded-For")
    if peer_ip:
        headers["X-Forwarded-For"] = f"{previous}, {peer_ip}" if previous else peer_ip
    headers["X-Forwarded-Proto"] = scheme
    host = headers.get("Host")
    if host:
        headers["X-Forwarded-Host"] = host


class Failure:
    """What went wrong talking to a backend, decided from the exception alone."""

    CONNECT = "connect"                  # refused or unreachable: never reached the backend
    CONNECT_TIMEOUT = "connect_timeout"  # no connection within connect_timeout
    RESET = "reset"                      # the backend dropped the connection
    READ_TIMEOUT = "read_timeout"        # no answer (or next chunk) within read_timeout
    CLIENT = "client"                    # the client stopped sending its body
    OTHER = "other"

    # kind: (status, body, another backend may be tried for an idempotent request)
    TABLE = {
        CONNECT: (Status.BAD_GATEWAY, b"bad gateway: the backend could not be reached\n", True),
        CONNECT_TIMEOUT: (Status.GATEWAY_TIMEOUT, b"gateway timeout: the backend did not accept in time\n", True),
        RESET: (Status.BAD_GATEWAY, b"bad gateway: the backend closed the connection\n", True),
        READ_TIMEOUT: (Status.GATEWAY_TIMEOUT, b"gateway timeout: the backend did not answer in time\n", False),
        CLIENT: (Status.BAD_REQUEST, b"bad request: the request body ended early\n", False),
        OTHER: (Status.BAD_GATEWAY, b"bad gateway: the backend request failed\n", False),
    }

    def __init__(self, kind, text):
        self.kind, self.text = kind, text

    @property
    def retryable(self):
        return self.TABLE[self.kind][2]

    @classmethod
    def from_exception(cls, exc):
        root = _root_cause(exc)
        if isinstance(exc, requests.exceptions.ConnectTimeout) or (
                isinstance(root, urllib3.exceptions.ConnectTimeoutError)
                and not isinstance(root, urllib3.exceptions.NewConnectionError)):
            return cls(cls.CONNECT_TIMEOUT, "connect timed out")
        if isinstance(exc, requests.exceptions.Timeout) or isinstance(
                root, (urllib3.exceptions.ReadTimeoutError, TimeoutError)):
            return cls(cls.READ_TIMEOUT, "read timed out")
        if isinstance(root, ConnectionRefusedError) or isinstance(root, urllib3.exceptions.NewConnectionError):
            return cls(cls.CONNECT, f"connection refused ({_short(root)})")
        if isinstance(root, (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                             urllib3.exceptions.ProtocolError, http.client.IncompleteRead)):
            return cls(cls.RESET, f"connection reset ({_short(root)})")
        if isinstance(root, OSError) and root.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return cls(cls.CONNECT, f"unreachable ({_short(root)})")
        return cls(cls.OTHER, _short(root))


def _root_cause(exc):
    """The innermost useful exception behind a requests/urllib3 wrapper."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        inner = None
        if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
            inner = exc.reason
        elif isinstance(exc, requests.exceptions.RequestException) and exc.args and isinstance(
                exc.args[0], BaseException):
            inner = exc.args[0]
        elif isinstance(exc, urllib3.exceptions.ProtocolError) and len(exc.args) > 1 and isinstance(
                exc.args[1], BaseException):
            inner = exc.args[1]
        elif exc.__cause__ is not None:
            inner = exc.__cause__
        if inner is None:
            return exc
        exc = inner
    return exc


def _short(exc):
    text = str(exc)
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        text = text.split(": ", 1)[-1]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- bodies


class _InputBody:
    """The client's request body, read as the backend connection sends it.

    ``read`` is ``HttpRequest._read``. Has ``__len__`` when Content-Length is known so
    requests sends a Content-Length instead of chunking. ``started`` says a byte was
    read (the body can no longer be replayed to another backend); ``failed`` holds the
    client's error if it stopped sending.
    """

    def __init__(self, read, length, chunk_size, prefix=()):
        self._read, self.length, self.chunk_size = read, length, chunk_size
        self.prefix = list(prefix)
        self.started = bool(self.prefix)
        self.failed = None

    def __len__(self):
        return self.length

    def read(self, size=-1):
        if self.prefix:
            return self.prefix.pop(0)
        self.started = True
        if size is None or size < 0:
            size = self.chunk_size
        try:
            return self._read(size)
        except OSError as exc:  # the client closed, or pywsgi refused its chunked framing
            self.failed = f"request body: {exc}"
            raise

    def __iter__(self):
        while True:
            chunk = self.read(self.chunk_size)
            if not chunk:
                return
            yield chunk


def upstream_chunks(raw, size):
    """A backend body as it arrives, up to ``size`` bytes a piece, Content-Encoding untouched.

    ``read1`` returns what one socket read brings (a trickling body is passed on at
    once); ``stream`` would wait for ``size`` bytes. Older urllib3 has no ``read1``.
    """
    read1 = getattr(raw, "read1", None)
    if read1 is None:
        yield from raw.stream(size, decode_content=False)
        return
    while True:
        data = read1(size, decode_content=False)
        if not data:
            return
        yield data


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


# --------------------------------------------------------------------------- request / response


class HttpRequest:
    """What ``http_request``/``http_response`` handlers see as ``event.request``.

    ``method``, ``path`` (percent-encoded), ``query`` (raw, no ``?``), ``headers``
    (case-insensitive mapping, hop-by-hop already removed, X-Forwarded-* added) and
    ``body`` are assignable; ``peer_ip`` and ``scheme`` are for reading. Reading
    ``body`` buffers it (see the module doc); None means too large to buffer.
    """

    def __init__(self, method, path, query, headers, peer_ip="", scheme="http",
                 stream=None, length=None, chunk_size=65536, buffer_limit=BUFFER_LIMIT):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.peer_ip, self.scheme = peer_ip, scheme
        self.started = time.monotonic()  # for the request's duration in metrics and the access log
        self._stream, self._length = stream, length  # length None + stream = chunked upload
        self._remaining = length
        self._chunk_size, self._buffer_limit = chunk_size, buffer_limit
        self._body = None if stream is not None else b""
        self._prefix = ()
        self._sent = None  # the _InputBody of the last send, if any

    @classmethod
    def from_environ(cls, environ, chunk_size=65536, buffer_limit=BUFFER_LIMIT):
        headers = headers_from_environ(environ)
        drop = hop_by_hop_names(headers.items()) | REQUEST_OWN
        for name in [name for name in headers if name.lower() in drop]:
            del headers[name]
        peer_ip = environ.get("REMOTE_ADDR", "") or ""
        scheme = environ.get("wsgi.url_scheme", "http")
        forwarded_headers(headers, peer_ip, scheme)
        length = environ.get("CONTENT_LENGTH")
        chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        stream = environ["wsgi.input"] if (length and length != "0") or chunked else None
        return cls(environ.get("REQUEST_METHOD", "GET"), path_from_environ(environ),
                   environ.get("QUERY_STRING", ""), headers, peer_ip, scheme, stream,
                   None if chunked else (int(length) if length else None), chunk_size, buffer_limit)

    def _read(self, size):
        """At most ``size`` bytes of the client's body, never past its Content-Length."""
        if self._remaining is None:
            return self._stream.read(size)
        size = min(size, self._remaining)
        if size <= 0:
            return b""
        data = self._stream.read(size)
        if not data:
            raise ConnectionError(f"client closed with {self._remaining} body bytes unsent")
        self._remaining -= len(data)
        return data

    @property
    def body(self):
        if self._body is None and not self._prefix:
            chunks, complete = _read_bounded(lambda: self._read(self._chunk_size), self._buffer_limit)
            if complete:
                self._body = b"".join(chunks)
            else:
                self._prefix = chunks
        return self._body

    @body.setter
    def body(self, value):
        self._body = value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")
        self._prefix = ()

    @property
    def replayable(self):
        """Can this request be sent again to another backend?"""
        return self._body is not None or self._sent is None or not self._sent.started

    def send_body(self):
        """(body for requests, Content-Length or None) for one send attempt."""
        if self._body is not None:
            return (self._body if self._body or self.method not in ("GET", "HEAD") else None,
                    len(self._body))
        if self._sent is None:
            self._sent = _InputBody(self._read, self._length, self._chunk_size, self._prefix)
        if self._length is None:
            return iter(self._sent), None  # chunked to the backend too
        return self._sent, self._length

    @property
    def client_failure(self):
        return self._sent.failed if self._sent is not None else None

    def __repr__(self):
        return f"<HttpRequest {self.method} {self.path}{'?' + self.query if self.query else ''}>"


class HttpResponse:
    """What ``http_response`` handlers see as ``event.response``: ``status``, ``headers``, ``body``.

    ``headers`` is a list of ``(name, value)`` pairs (duplicates kept); a handler may
    assign a list or a mapping. ``body`` is bytes once read or assigned; reading a
    streamed body buffers up to the limit and reads None beyond it.
    """

    def __init__(self, status, headers, body=b"", reason=None, upstream=None, chunk_size=65536,
                 buffer_limit=BUFFER_LIMIT):
        self.status = status
        self.headers = headers
        self._reason = (status, reason)
        self._upstream = upstream  # a requests.Response whose raw body is still to stream
        self._chunk_size, self._buffer_limit = chunk_size, buffer_limit
        self._body = body if upstream is None else None
        self._prefix = ()
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
        if self._body is None and not self._prefix and self._upstream is not None:
            chunks = upstream_chunks(self._upstream.raw, self._chunk_size)
            try:
                collected, complete = _read_bounded(lambda: next(chunks, b""), self._buffer_limit)
            except (urllib3.exceptions.HTTPError, OSError) as exc:
                self.stream_failure = Failure.from_exception(exc)
                self.release()
                return None
            if complete:
                self._body = b"".join(collected)
                self.release()
            else:
                self._prefix = collected
        return self._body

    @body.setter
    def body(self, value):
        self._body = value.encode("utf-8") if isinstance(value, str) else bytes(value or b"")
        self._prefix = ()
        self.release()

    def body_length(self):
        """Body bytes for the client: the buffered body's, else the backend's Content-Length (0 if unsaid)."""
        if self._body is not None:
            return len(self._body)
        for name, value in header_items(self.headers):
            if name.lower() == "content-length" and value.strip().isdigit():
                return int(value)
        return 0

    def release(self, no_body=False):
        """Give the backend connection back to the pool, or close it.

        A body read to the end has already given it back. An unread rest is read
        and dropped when there is none (``no_body``: a HEAD answer) or it is at most
        one chunk; a longer or unknown rest costs the connection instead.
        """
        upstream, self._upstream = self._upstream, None
        if upstream is None:
            return
        raw = upstream.raw
        remaining = getattr(raw, "length_remaining", None)
        if no_body or (remaining is not None and remaining <= self._chunk_size):
            raw.drain_conn()
        upstream.close()

    def wsgi(self, start_response, head=False, on_failure=None):
        """Start the WSGI response; returns the iterable of body chunks."""
        code, reason = self._reason
        line = status_line(self.status, reason if code == self.status else None)
        headers = strip_hop_by_hop(header_items(self.headers))
        if self._body is not None:
            self.release()
            if self.status not in NO_BODY_STATUSES and not head:
                headers = [(n, v) for n, v in headers if n.lower() != "content-length"]
                headers.append(("Content-Length", str(len(self._body))))
            start_response(line, headers)
            return [] if head or self.status in NO_BODY_STATUSES else [self._body]
        start_response(line, headers)
        if head:  # nothing follows a HEAD answer, whatever its headers say
            self.release(no_body=True)
            return []
        return _StreamedBody(self, on_failure)


class _StreamedBody:
    """The WSGI iterable of a streamed backend body; ``close()`` always frees the connection.

    pywsgi calls ``close()`` even when the client left mid-way. If the backend fails
    mid-body, the client connection is dropped (no terminating chunk, no short body
    passed off as complete) by raising ConnectionResetError, which pywsgi treats as a
    vanished peer: the connection closes without a traceback.
    """

    def __init__(self, response, on_failure):
        self.response, self.on_failure = response, on_failure

    def __iter__(self):
        response = self.response
        yield from response._prefix
        response._prefix = ()
        upstream = response._upstream
        if upstream is None:
            return
        try:
            yield from upstream_chunks(upstream.raw, response._chunk_size)
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            failure = Failure.from_exception(exc)
            if self.on_failure is not None:
                self.on_failure(failure)
            self.close()
            raise ConnectionResetError(errno.ECONNRESET, f"backend response cut short: {failure.text}")

    def close(self):
        self.response.release()


# --------------------------------------------------------------------------- transport


class _PoolAdapter(HTTPAdapter):
    """HTTPAdapter sending bodies in ``blocksize`` pieces and skipping requests' cookie parsing."""

    def __init__(self, blocksize, **kwargs):
        self._blocksize = blocksize
        super().__init__(**kwargs)

    def init_poolmanager(self, connections, maxsize, block=False, **pool_kwargs):
        pool_kwargs.setdefault("blocksize", self._blocksize)
        super().init_poolmanager(connections, maxsize, block=block, **pool_kwargs)

    def build_response(self, req, resp):
        response = requests.Response()
        response.status_code = resp.status
        response.raw = resp
        response.reason = resp.reason
        response.url = req.url
        response.request = req
        response.connection = self
        return response


class _UrlBackend:
    """A backend a handler named by URL (``event.backend = "http://host:port"``)."""

    def __init__(self, url):
        self.guid = self.name = url
        self._base = url.rstrip("/")

    def http_base(self):
        return self._base

    def __repr__(self):
        return f"<backend {self._base}>"


class HttpProxy:
    """The WSGI app for plain HTTP requests: one per Balancer, owns the connection pools."""

    def __init__(self, balancer):
        self.balancer = balancer
        settings = balancer.settings
        conf = settings.http
        self.enabled = "http" in settings.glb.protocols
        self.prefix = settings.glb.prefix
        self.timeout = (conf.connect_timeout, conf.read_timeout)
        self.retries = conf.retries
        self.chunk_size = conf.chunk_size
        self.backend_host = conf.host_header == "backend"
        backends = getattr(settings, "backends", None)
        self.verify, self.cert = tls.requests_options(backends) if backends is not None else (True, None)
        self.buffer_limit = BUFFER_LIMIT
        self.adapter = _PoolAdapter(conf.chunk_size, pool_connections=conf.pool_connections,
                                    pool_maxsize=conf.pool_maxsize, max_retries=0)
        self.session = requests.Session()  # owner of the adapter; see the module doc
        self.session.trust_env = False
        self.session.mount("http://", self.adapter)
        self.session.mount("https://", self.adapter)
        self._netlocs = {}

    def close(self):
        self.session.close()

    # -- the WSGI app ------------------------------------------------------

    def __call__(self, environ, start_response):
        if not self.enabled:
            return _plain(start_response, Status.NOT_FOUND, b"not found: plain HTTP is turned off\n")
        if environ.get("PATH_INFO", "").startswith(self.prefix):
            return _plain(start_response, Status.NOT_FOUND, b"not found: no glb endpoint at this path\n")
        request = HttpRequest.from_environ(environ, self.chunk_size, self.buffer_limit)
        try:
            return self.handle(request, environ, start_response)
        except Exception as exc:  # a glb bug: answer 500, never a pywsgi traceback
            log.exception("! http %s %s failed", request.method, request.path)
            bus = self.balancer.bus
            bus.fire(bus.exception, connection=None, exception=exc)
            return _plain(start_response, Status.INTERNAL_ERROR, b"internal error\n")

    def handle(self, request, environ, start_response):
        balancer, bus = self.balancer, self.balancer.bus
        pick = balancer.pick_request(environ)
        backend = balancer.pick_backend(pick)
        if bus.http_request.receivers:
            event = bus.fire(bus.http_request, request=request, backend=backend)
            if event.response is not None:
                status, headers, body = event.response
                response = HttpResponse(status, list(headers.items()), body)
                return self.answer(start_response, request, response, None, None)
            backend = self.resolve(event.backend)
        if backend is None:
            error = "no backend is ready for HTTP"
            self.report(request, environ, error)
            response = HttpResponse.simple(Status.SERVICE_UNAVAILABLE,
                                           b"service unavailable: no backend is ready\n")
            return self.answer(start_response, request, response, error, None)
        response, failure, backend = self.forward(request, backend, pick, environ)
        return self.answer(start_response, request, response, failure and failure.text, backend,
                           environ=environ)

    def answer(self, start_response, request, response, error, backend, environ=None):
        bus = self.balancer.bus
        if bus.http_response.receivers:
            bus.fire(bus.http_response, request=request, response=response, error=error, backend=backend)
            if response.stream_failure is not None and response._body is None:
                failure = response.stream_failure
                self.report(request, environ, f"http backend {_name(backend)}: {failure.text}")
                response = HttpResponse.error(failure.kind)
        self.balancer.stats.http_request(_name(backend), response.status,
                                         time.monotonic() - request.started, response.body_length())

        def on_failure(failure):
            self.report(request, environ,
                        f"http backend {_name(backend)}: response cut short: {failure.text}")

        return response.wsgi(start_response, head=request.method == "HEAD", on_failure=on_failure)

    # -- forwarding --------------------------------------------------------

    def forward(self, request, backend, pick, environ):
        """Send to ``backend``, trying others on a retryable failure: (response, failure, backend)."""
        tried = []
        while True:
            try:
                upstream = self.send(request, backend)
            except Exception as exc:
                if not isinstance(exc, (requests.RequestException, urllib3.exceptions.HTTPError,
                                        OSError, ValueError)):
                    raise
                failure = Failure.from_exception(exc)
                if request.client_failure:
                    failure = Failure(Failure.CLIENT, request.client_failure)
                text = f"http backend {_name(backend)}: {failure.text}"
                failure.text = text
                self.report(request, environ, text)
                if failure.kind in (Failure.CONNECT, Failure.CONNECT_TIMEOUT) and hasattr(backend, "health"):
                    self.balancer.health.connect_failed(backend)  # passive check (max_fails)
                tried.append(backend)
                if (failure.retryable and request.method in IDEMPOTENT and request.replayable
                        and len(tried) <= self.retries):
                    other = self.balancer.pick_backend(pick, exclude=tried)
                    if other is not None:
                        backend = other
                        continue
                return HttpResponse.error(failure.kind), failure, backend
            response = HttpResponse(upstream.status_code, strip_hop_by_hop(upstream.raw.headers.items()),
                                    reason=upstream.reason, upstream=upstream,
                                    chunk_size=self.chunk_size, buffer_limit=self.buffer_limit)
            return response, None, backend

    def send(self, request, backend):
        base = backend.http_base()
        url = f"{base}{request.path}?{request.query}" if request.query else f"{base}{request.path}"
        headers = CaseInsensitiveDict(request.headers)
        body, length = request.send_body()
        if length is not None and (length or request.method not in ("GET", "HEAD")):
            headers["Content-Length"] = str(length)
        if self.backend_host or "Host" not in headers:
            headers["Host"] = self._netloc(base)
        for name in ("User-Agent", "Accept-Encoding"):  # urllib3 would add its own
            if name not in headers:
                headers[name] = SKIP_HEADER
        prepared = requests.PreparedRequest()
        prepared.method, prepared.url, prepared.headers, prepared.body = request.method, url, headers, body
        return self.adapter.send(prepared, stream=True, timeout=self.timeout, verify=self.verify,
                                 cert=self.cert)

    def resolve(self, backend):
        """The backend a handler left in ``event.backend``: a Backend, a guid or an http(s) URL."""
        if backend is None or hasattr(backend, "http_base"):
            return backend
        if isinstance(backend, str):
            if "://" in backend:
                return _UrlBackend(backend)
            found = self.balancer.registry.get(backend)
            if found is not None:
                return found
        log.warning("! http_request handler set an unknown backend %r", backend)
        return None

    def _netloc(self, base):
        netloc = self._netlocs.get(base)
        if netloc is None:
            netloc = self._netlocs[base] = urlsplit(base).netloc
        return netloc

    def report(self, request, environ, text):
        """Fire ``error`` (and log) for a failed request, with a connection describing it."""
        environ = environ or {}
        conn = Connection((request.peer_ip, int(environ.get("REMOTE_PORT") or 0)), request.path,
                          request.query, request.headers, CLIENT,
                          secure=request.scheme == "https")
        self.balancer.report_error(conn, f"{request.method} {request.path}: {text}")


def _name(backend):
    return getattr(backend, "name", None) or getattr(backend, "guid", None) or "-"


def _plain(start_response, status, body):
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))])
    return [body]
