"""Reads and writes of the plain-HTTP path on one socket, each wait bounded by glb.deadlines.

A plain gevent socket is driven through the OS socket under it and a read
watcher, not through gevent's wrapper methods, because a proxied request makes
four socket calls and the wrapper's way costs at each of them:

- a read that will find nothing yet (the backend's answer right after the
  request was sent, the next request of an idle keep-alive client) waits on the
  watcher first and then reads once, instead of a failed ``recv`` that raises,
  a wait, and a second ``recv``;
- a write the kernel takes whole (nearly every one) is one ``send`` with no
  deadline armed; only the rest of a write that would block waits, armed.

A TLS socket's bytes must go through its own methods; ``SocketIO`` uses them,
with the same deadlines.
"""

import errno
import time

from gevent import getcurrent
from gevent.socket import socket as _GeventSocket

from glb.deadlines import DEADLINES


class SocketIO:
    """``recv``/``send`` on ``sock`` for the HTTP path; TimeoutError when a deadline passes.

    A plain socket's reads wait on a read watcher of this object's own that stays
    started from one wait to the next: stopping and starting gevent's watcher
    around every wait made libev re-register the socket with epoll (a failing
    ``epoll_ctl``) at nearly every request. Readable with no one waiting (a
    pipelined request, a pooled connection the backend closed), the watcher
    stops and calls ``on_idle`` if set; the next wait starts it again.
    ``close()`` stops it, before the socket is closed or handed on.
    """

    __slots__ = ("sock", "raw", "watcher", "waiting", "on_idle")

    def __init__(self, sock):
        self.sock = sock
        self.raw = sock._sock if type(sock) is _GeventSocket else None  # None: TLS, gevent's own methods
        self.watcher = self.waiting = self.on_idle = None

    def recv(self, size, timeout, wait_first=False):
        """Up to ``size`` bytes, b'' at EOF. ``wait_first``: the caller knows nothing has arrived yet."""
        return self.recv_by(size, time.monotonic() + timeout, wait_first)

    def recv_by(self, size, deadline, wait_first=False):
        """``recv`` with an absolute (``time.monotonic``) deadline."""
        raw = self.raw
        if raw is None:
            DEADLINES.arm_at(deadline)
            try:
                return self.sock.recv(size)
            finally:
                DEADLINES.disarm()
        if not wait_first:
            try:
                return raw.recv(size)
            except BlockingIOError:
                pass
        while True:
            self._wait_readable(deadline)
            try:
                return raw.recv(size)
            except BlockingIOError:  # woken with nothing to read after all: wait again
                continue

    def _wait_readable(self, deadline):
        self._watch()
        self.waiting = getcurrent()
        DEADLINES.arm_at(deadline)
        try:
            self.sock.hub.switch()  # back when _readable switches here (or a deadline throws)
        finally:
            DEADLINES.disarm()
            self.waiting = None

    def _watch(self):
        watcher = self.watcher
        if watcher is None:
            if self.sock._read_event is None:  # gevent closed the socket
                raise OSError(errno.EBADF, "the socket was closed")
            watcher = self.watcher = self.sock.hub.loop.io(self.sock.fileno(), 1)
        if not watcher.active:
            watcher.start(self._readable)

    def _readable(self):
        """From the hub: wake the greenlet waiting to read; with none, stop watching and tell ``on_idle``."""
        waiting = self.waiting
        if waiting is not None:
            waiting.switch()
            return
        self.watcher.stop()
        if self.on_idle is not None:
            self.on_idle()

    def watch_idle(self, on_idle):
        """Call ``on_idle()`` from the hub when the socket turns readable while no one reads it."""
        self.on_idle = on_idle
        self._watch()

    def unwatch_idle(self):
        self.on_idle = None
        if self.raw is None and self.watcher is not None:  # TLS reads wait on gevent's watcher instead
            self.watcher.stop()

    def close(self):
        """Stop watching (the socket is about to be closed or handed on)."""
        watcher, self.watcher = self.watcher, None
        self.on_idle = None
        if watcher is not None:
            watcher.stop()

    def send(self, data, timeout):
        """All of ``data``; the part the kernel does not take at once is sent within ``timeout``."""
        raw = self.raw
        if raw is not None:
            try:
                sent = raw.send(data)
            except BlockingIOError:
                sent = 0
            if sent == len(data):
                return
            data = memoryview(data)[sent:]
        DEADLINES.arm(timeout)
        try:
            self.sock.sendall(data)
        finally:
            DEADLINES.disarm()
