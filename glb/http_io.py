"""Reads and writes of the plain-HTTP path on one socket, each wait bounded by glb.deadlines.

A plain gevent socket is driven through the OS socket under it and its read
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

from gevent.socket import socket as _GeventSocket

from glb.deadlines import DEADLINES


class SocketIO:
    """``recv``/``send`` on ``sock`` for the HTTP path; TimeoutError when a deadline passes."""

    __slots__ = ("sock", "raw", "hub_wait")

    def __init__(self, sock):
        self.sock = sock
        if type(sock) is _GeventSocket:
            self.raw, self.hub_wait = sock._sock, sock.hub.wait
        else:  # TLS (or a socket gevent did not make): its own methods
            self.raw = self.hub_wait = None

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
            readable = self.sock._read_event  # None once the socket was closed
            if readable is None:
                raise OSError(errno.EBADF, "the socket was closed")
            DEADLINES.arm_at(deadline)
            try:
                self.hub_wait(readable)
            finally:
                DEADLINES.disarm()
            try:
                return raw.recv(size)
            except BlockingIOError:  # woken with nothing to read after all: wait again
                continue

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
