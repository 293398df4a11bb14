"""Who may connect: glb.limits applied at the server's accept seam and on the upgrade path.

``Admission.guard(server)`` wraps three methods of a gevent server instance:
``do_read`` (accept: while glb is out of file descriptors, one pending
connection is accepted on a reserve descriptor and closed at once, so the
backlog drains instead of spinning), ``do_handle`` (count the new connection,
or refuse it) and ``do_close`` (the connection has ended: uncount it). A
WebSocket session that outlives its pywsgi handler (a detached plain socket)
keeps its count: ``hold`` moves it to the session, and ``release_held`` gives
it back when the session ends.

Refusals, each an ``error`` event::

    what                                   plain listener             TLS listener
    max_connections / max_connections_     503 after reading the      closed at once (no plaintext
    per_ip reached                         request head (1 s at most) answer before a handshake)
    out of file descriptors                closed at once             closed at once
    Origin not in allowed_origins          403                        403
    over handshake_rate_per_ip             429 (Retry-After: 1);      the same
                                           a control channel: 101,
                                           then close 1008
"""

import errno
import logging
import os
import resource
import socket

from gevent.monkey import get_original

from glb.connection import CONTROL
from glb.errors import CloseCode, Status
from glb.handshake import Rejection
from glb.limits import (TOO_MANY, TOO_MANY_FROM_IP, ConnectionLimits, HandshakeRate, client_key,
                        origin_allowed)
from glb.own_sessions import OwnSession

log = logging.getLogger("glb.admission")

FD_RESERVE = 64  # descriptors kept out of the derived max_connections: logs, listeners, DNS, backends
REFUSAL_WAIT = 1.0  # seconds a refused connection gets to send its request head before the 503
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# The spare descriptor must be free before the next accept: gevent's patched os.close may
# defer the close to the hub, so the stdlib's is used for it.
_close_now = get_original("os", "close")
REFUSAL_LABELS = {TOO_MANY: "max_connections", TOO_MANY_FROM_IP: "max_connections_per_ip"}


def raise_fd_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # an unlimited hard limit may be more than the kernel allows
            log.warning("! could not raise the file descriptor limit from %s to %s: %s", soft, hard, exc)
    return soft


def derived_max_connections(fd_limit):
    """max_connections when the setting is 0: a relayed session holds two descriptors."""
    if fd_limit == resource.RLIM_INFINITY:
        return 0
    return max(1, (fd_limit - FD_RESERVE) // 2)


class Admission:
    """The limits of one Balancer, and the glue that applies them to its listeners."""

    def __init__(self, balancer):
        self.balancer = balancer
        glb = balancer.settings.glb
        self.limits = ConnectionLimits(glb.max_connections, glb.max_connections_per_ip)
        self.rate = HandshakeRate(glb.handshake_rate_per_ip, glb.handshake_burst_per_ip)
        self.allowed_origins = frozenset(glb.allowed_origins)
        self._counted = {}  # accepted socket -> address, while its listener's handler runs
        self._held = {}  # connection id -> address, for sessions that outlived their handler
        self._reserve = None  # a spare descriptor, given up to shed a connection when none are left

    def start(self):
        """At start-up: raise the descriptor limit, settle max_connections, keep a spare descriptor."""
        fd_limit = raise_fd_limit()
        if not self.limits.max_total:
            self.limits.max_total = derived_max_connections(fd_limit)
        log.info("= file descriptors: %s; max_connections %s, max_connections_per_ip %s", fd_limit,
                 self.limits.max_total or "unlimited", self.limits.max_per_ip or "unlimited")
        self._reserve = os.open(os.devnull, os.O_RDONLY)

    def stop(self):
        if self._reserve is not None:
            _close_now(self._reserve)
            self._reserve = None

    def guard(self, server):
        """Apply the connection limits to a gevent server's accepted connections."""
        accept, handle, close = server.do_read, server.do_handle, server.do_close
        tls = server.ssl_enabled

        def do_read():
            try:
                return accept()
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    raise
                self._shed(server, exc)
                return None

        def do_handle(sock, address):
            ip = client_key(address[0] if isinstance(address, tuple) else "")
            reason = self.limits.admit(ip)
            if reason is None:
                self._counted[sock] = ip
                return handle(sock, address)
            # Out of the hub (handlers run on the error event), bounded by REFUSAL_WAIT.
            self.balancer.sessions.spawn(self._refuse, sock, ip, reason, tls)

        def do_close(sock, *args):
            ip = self._counted.pop(sock, None)
            if ip is not None:
                self.limits.release(ip)
            return close(sock, *args)

        server.do_read, server.do_handle, server.do_close = do_read, do_handle, do_close

    def _refuse(self, sock, ip, reason, tls):
        self.balancer.stats.connection_refused(REFUSAL_LABELS[reason])
        self.balancer.report_error(None, f"connection from {ip} refused: {reason}")
        if tls:  # no plaintext answer before a TLS handshake
            sock.close()
        else:
            _answer_503(sock, reason)

    def _shed(self, server, exc):
        """Out of descriptors: accept one pending connection on the spare one and close it."""
        self.balancer.stats.connection_refused("out_of_descriptors")
        self.balancer.sessions.spawn(self.balancer.report_error, None, f"out of file descriptors "
                                     f"({exc.strerror}); a new connection was closed at once")
        if self._reserve is None:
            return
        _close_now(self._reserve)
        self._reserve = None
        try:
            fd, _ = server.socket._accept()
            _close_now(fd)
        except OSError:
            pass
        finally:
            try:
                self._reserve = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass

    # -- sessions that outlive their handler -----------------------------------------------------

    def hold(self, sock, conn_id):
        """``sock``'s count now belongs to the session of connection ``conn_id``."""
        ip = self._counted.pop(sock, None)
        if ip is not None:
            self._held[conn_id] = ip

    def release_held(self, conn_id):
        ip = self._held.pop(conn_id, None)
        if ip is not None:
            self.limits.release(ip)

    # -- upgrades ---------------------------------------------------------------------------------

    def refuse_upgrade(self, conn):
        """None to go on; a Rejection (403, 429) to answer with; or, for a control channel over the
        handshake rate, the session class that closes it with 1008 once upgraded."""
        if not origin_allowed(conn.headers.get("Origin"), self.allowed_origins):
            self.balancer.report_error(conn, f"origin {conn.headers.get('Origin')!r} not allowed")
            return Rejection(Status.FORBIDDEN, "origin not allowed")
        if not self.rate.allow(client_key(conn.peer_ip)):
            self.balancer.report_error(conn, "handshake_rate_per_ip exceeded")
            if conn.kind == CONTROL:
                return OverRate
            return Rejection(Status.TOO_MANY_REQUESTS, "too many handshakes; slow down",
                             [("Retry-After", "1")])
        return None


class OverRate(OwnSession):
    """A control channel over the handshake rate: closed with 1008 as soon as it is open."""

    kind = CONTROL

    def run(self):
        self.conn.websocket.close(CloseCode.POLICY_VIOLATION, "handshake rate exceeded")


def _answer_503(sock, reason):
    """A refused connection: read its request head (bounded), answer 503, close."""
    body = f"{reason}; try again later\n".encode("ascii")
    response = (f"HTTP/1.1 {Status.SERVICE_UNAVAILABLE}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                f"Content-Length: {len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode("ascii") + body
    try:
        sock.settimeout(REFUSAL_WAIT)
        head = b""
        try:
            while b"\r\n\r\n" not in head and len(head) < 16384:
                data = sock.recv(16384)
                if not data:
                    break
                head += data
        except OSError:  # no complete head in time: answer anyway
            pass
        sock.sendall(response)
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass
    finally:
        sock.close()
