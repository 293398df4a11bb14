"""Keep-alive connections to backends for plain HTTP: one bounded pool per backend address.

A ``BackendConnection`` is a socket and its read buffer; ``Pools`` hands one out
(an idle one first, else a new connection) and takes it back when a response
ended cleanly and both sides allow keep-alive. Rules:

- at most ``maxsize`` idle connections per address and ``max_pools`` addresses
  (the least recently used pool is closed beyond that);
- an idle connection is closed after ``idle_timeout``, and every connection of a
  backend that left the registry is closed, by ``sweep()`` (HttpProxy's sweeper
  greenlet calls it) and when one is given back;
- an idle connection is watched for reading while it waits in the pool: the
  backend closing it (or sending anything unasked, such as a 408) closes it
  there and then, so it is never handed out; a request that is not safe to
  send twice also checks the socket itself at checkout (``get(..., check=True)``),
  for an end that arrived since the loop last polled. A safe one does not: if
  its reused connection fails before any answer byte, it is sent again on a
  new one (glb.http_proxy), as nginx and HAProxy do.
"""

import errno
import socket
import time
from collections import OrderedDict
from urllib.parse import urlsplit

import gevent.ssl

from glb.http_io import SocketIO
from glb.http_parse import HeadReader, parse_response_head
from glb.registry import GONE

RECV_SIZE = 65536
_PEEK = int(socket.MSG_PEEK | socket.MSG_DONTWAIT)  # an int: the flags enum costs a call per use


class BackendClosed(ConnectionResetError):
    """The backend closed the connection (before or during a response)."""


class BackendConnection:
    """One connection to a backend: the socket, bytes read but not used yet, and where it came from."""

    __slots__ = ("sock", "io", "buffer", "address", "backend", "reused", "idle_since", "got_bytes", "read_timeout",
                 "watched")

    def __init__(self, sock, address, backend, read_timeout=60.0):
        self.sock = sock
        self.io = SocketIO(sock)
        self.read_timeout = read_timeout  # for each wait on the backend (TimeoutError beyond it)
        self.buffer = bytearray()
        self.address = address
        self.backend = backend
        self.reused = False
        self.idle_since = 0.0
        self.got_bytes = False  # any byte of the current response arrived
        self.watched = None  # what to call if the backend closes (or writes to) it while idle in a pool

    def recv(self, size, wait_first=False):
        return self.io.recv(size, self.read_timeout, wait_first)

    def send(self, data):
        self.io.send(data, self.read_timeout)

    def fill(self, wait_first=False):
        """Read what the backend sent next into ``buffer``; BackendClosed at EOF."""
        self.buffer += self.take(wait_first)

    def take(self, wait_first=False):
        """What the backend sent next; BackendClosed at EOF."""
        data = self.io.recv(RECV_SIZE, self.read_timeout, wait_first)
        if not data:
            raise BackendClosed(errno.ECONNRESET, "the backend closed the connection")
        self.got_bytes = True
        return data

    def read_head(self, method, max_size):
        """The next response head (1xx included); raises HeadError for a malformed one.

        Called right after the request was written, when nothing can have
        arrived yet unless an interim answer left bytes in ``buffer``.
        """
        reader = HeadReader(response=True, max_size=max_size)
        buffer = self.buffer
        if not buffer:  # the common case: the whole head (and often the body) in the first read
            data = self.take(wait_first=True)
            end = reader.feed(data)
            if end is not None:
                buffer += memoryview(data)[end:]
                return parse_response_head(reader, method)
            buffer += data
        while True:
            end = reader.feed(buffer)
            if end is not None:
                del buffer[:end]
                return parse_response_head(reader, method)
            self.fill()

    def closed_while_idle(self):
        """True if the backend closed (or sent something) while this connection sat in the pool."""
        raw = getattr(self.sock, "_sock", None)  # gevent's socket wraps the OS one; TLS has none
        if raw is None or self.buffer:
            return bool(self.buffer)
        try:
            raw.recv(1, _PEEK)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return True

    def watch_idle(self, callback):
        """Call ``callback(self)`` from the hub if the socket becomes readable while idle."""
        self.watched = callback
        self.io.watch_idle(self._readable_while_idle)

    def _readable_while_idle(self):
        callback = self.watched
        if callback is not None:
            callback(self)

    def unwatch(self):
        self.watched = None
        self.io.unwatch_idle()

    def close(self):
        self.watched = None
        self.io.close()  # its watcher stops before the socket closes
        try:
            self.sock.close()
        except OSError:
            pass


class Pools:
    """Every backend address's idle connections; ``get``/``put``/``discard`` around each exchange."""

    def __init__(self, connect_timeout, read_timeout, maxsize, max_pools, idle_timeout, ssl_context=None):
        self.connect_timeout, self.read_timeout = connect_timeout, read_timeout
        self.maxsize, self.max_pools, self.idle_timeout = maxsize, max_pools, idle_timeout
        self.ssl_context = ssl_context  # a callable giving the client context for https:// backends
        self._idle = OrderedDict()  # address -> [BackendConnection], most recently used last
        self._addresses = {}  # base URL -> (scheme, host, port, netloc)
        self.opened = 0  # connections made, ever (for tests and the benchmark)

    def address(self, base):
        """``(scheme, host, port, netloc)`` of a backend's base URL (cached)."""
        found = self._addresses.get(base)
        if found is None:
            parts = urlsplit(base)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) backend address: {base!r}")
            port = parts.port or (443 if parts.scheme == "https" else 80)
            found = self._addresses[base] = (parts.scheme, parts.hostname, port, parts.netloc)
        return found

    def get(self, base, backend=None, check=True, fresh=False):
        """A connection to ``base``: an idle one still open, else a new one (OSError if none can be made).

        ``check``: look at an idle one's socket too (for a request not safe to send twice);
        ``fresh``: a new connection in any case (the retry of a request a reused one failed).
        """
        address = self.address(base)
        idle = None if fresh else self._idle.get(address)
        while idle:
            conn = idle.pop()
            conn.unwatch()
            if check and conn.closed_while_idle():
                conn.close()
                continue
            conn.reused = True
            conn.got_bytes = False
            conn.backend = backend
            return conn
        scheme, host, port, _ = address
        sock = socket.create_connection((host, port), timeout=self.connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if scheme == "https":
                sock = self.ssl_context().wrap_socket(sock, server_hostname=host)
            sock.settimeout(None)  # each wait is bounded by glb.deadlines (read_timeout)
        except BaseException:
            sock.close()
            raise
        self.opened += 1
        return BackendConnection(sock, address, backend, self.read_timeout)

    def put(self, conn):
        """Keep ``conn`` for the next request to its address (or close it if the pool is full or the backend left)."""
        if conn.buffer or _gone(conn.backend):
            return conn.close()
        idle = self._idle.get(conn.address)
        if idle is None:
            idle = self._idle[conn.address] = []
            while len(self._idle) > self.max_pools:
                _, oldest = self._idle.popitem(last=False)
                _close_all(oldest)
        else:
            self._idle.move_to_end(conn.address)
        if len(idle) >= self.maxsize:
            return conn.close()
        conn.idle_since = time.monotonic()
        idle.append(conn)
        conn.watch_idle(self._readable_while_idle)

    def _readable_while_idle(self, conn):
        """From the hub: the backend closed (or wrote to) an idle connection; it is dropped."""
        idle = self._idle.get(conn.address)
        if idle is not None and conn in idle:
            idle.remove(conn)
        conn.close()

    def discard(self, conn):
        conn.close()

    def sweep(self, now=None):
        """Close connections idle longer than ``idle_timeout`` and those of backends that left."""
        now = time.monotonic() if now is None else now
        for address in list(self._idle):
            idle = self._idle[address]
            keep = []
            for conn in idle:
                if now - conn.idle_since > self.idle_timeout or _gone(conn.backend):
                    conn.close()
                else:
                    keep.append(conn)
            if keep:
                self._idle[address] = keep
            else:
                del self._idle[address]

    def idle_count(self):
        return sum(len(idle) for idle in self._idle.values())

    def close(self):
        for idle in self._idle.values():
            _close_all(idle)
        self._idle.clear()


def _gone(backend):
    return getattr(backend, "state", None) == GONE


def _close_all(conns):
    for conn in conns:
        conn.close()


def backend_ssl_context_factory(balancer):
    """The client TLS context for https:// backends: the balancer's (from ``[backends]``), else a default one."""
    def context():
        try:
            return balancer.backend_ssl_context()
        except AttributeError:
            return gevent.ssl.create_default_context()
    return context
