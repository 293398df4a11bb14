"""A plain TCP socket that holds an io watcher only while a greenlet waits on it.

gevent's socket makes a read and a write watcher for every socket when it is
made, and keeps both for the socket's life. A relayed leg is read by the relay
engine's own watcher and written without waiting nearly always, so those two
would sit idle in every session. ``LeanSocket`` takes the file descriptor over
from a gevent socket (``take_over``) and makes a watcher only for a greenlet
that must wait (a send the kernel cannot take yet, a read while a closing
handshake drains), closing it when the wait ends. It offers the part of the
socket API that ``glb.websocket.WebSocket`` and the relay use; ``_sock`` is the
OS socket itself.

Closing or shutting down a socket that a greenlet waits on wakes that greenlet
with OSError(EBADF), as gevent's sockets do, and the descriptor is closed only
after its watcher has stopped.
"""
import _socket
from errno import EBADF

from gevent import get_hub

READ = 1  # libev's EV_READ
WRITE = 2  # libev's EV_WRITE


class LeanSocket:
    """A non-blocking OS socket; blocking calls wait on a watcher made for that wait."""

    __slots__ = ("_sock", "_read_wait", "_write_wait")

    def __init__(self, sock):
        self._sock = sock  # the OS socket (named as in gevent's socket, so callers reach it alike)
        self._read_wait = None  # the watcher a greenlet blocked in a read waits on
        self._write_wait = None  # the same for a write

    @classmethod
    def take_over(cls, sock):
        """The descriptor of gevent socket ``sock`` in a LeanSocket; ``sock`` is detached (its watchers closed)."""
        family, kind, proto = sock.family, sock.type, sock.proto
        raw = _socket.socket(family, kind, proto, sock.detach())
        raw.setblocking(False)
        return cls(raw)

    def __repr__(self):
        return f"<LeanSocket fd={self._sock.fileno()}>"

    def fileno(self):
        return self._sock.fileno()

    # No __getattr__ delegating the rest: it would slow every attribute read of this object.
    def getsockopt(self, *args):
        return self._sock.getsockopt(*args)

    def setsockopt(self, *args):
        return self._sock.setsockopt(*args)

    def getpeername(self):
        return self._sock.getpeername()

    def getsockname(self):
        return self._sock.getsockname()

    # -- reading and writing -------------------------------------------------

    def recv(self, size, flags=0):
        while True:
            try:
                return self._sock.recv(size, flags)
            except BlockingIOError:
                self.wait_readable()

    def send(self, data, flags=0, timeout=None):
        """Send what the kernel takes; ``timeout=0.0`` never waits (BlockingIOError when it takes nothing)."""
        try:
            return self._sock.send(data, flags)
        except BlockingIOError:
            if timeout == 0.0:
                raise
        self._wait(WRITE)
        try:
            return self._sock.send(data, flags)
        except BlockingIOError:
            return 0

    def sendall(self, data):
        view = memoryview(data)
        with view:
            while view:
                try:
                    sent = self._sock.send(view)
                except BlockingIOError:
                    sent = 0
                if sent:
                    view = view[sent:]
                else:
                    self._wait(WRITE)

    def wait_readable(self):
        """Block this greenlet until the socket has bytes or EOF."""
        self._wait(READ)

    def _wait(self, events):
        hub = get_hub()
        watcher = hub.loop.io(self._sock.fileno(), events)
        if events == READ:
            self._read_wait = watcher
        else:
            self._write_wait = watcher
        try:
            hub.wait(watcher)
        finally:
            if events == READ:
                self._read_wait = None
            else:
                self._write_wait = None
            watcher.close()

    # -- ending --------------------------------------------------------------

    def shutdown(self, how):
        if how != _socket.SHUT_WR:
            self._cancel(self._read_wait)
        if how != _socket.SHUT_RD:
            self._cancel(self._write_wait)
        self._sock.shutdown(how)

    def close(self):
        """Close the descriptor: now, or once the greenlets waiting on it have been woken."""
        waits = [w for w in (self._read_wait, self._write_wait) if w is not None]
        for watcher in waits:
            self._cancel(watcher)
        if waits:
            get_hub().loop.run_callback(self._sock.close)  # after the waiters' watchers stopped
        else:
            self._sock.close()

    @staticmethod
    def _cancel(watcher):
        if watcher is not None:
            get_hub().cancel_wait(watcher, OSError(EBADF, "socket closed while waiting"), False)
