"""WebSocket relay: an echo backend direct, through glb, and through nginx; speed, CPU, memory.

One run starts, all on 127.0.0.1 and each stopped at the end:

- an echo backend (a child process: one epoll loop, glb.frames for anything but the
  common whole small frame) that sends every data frame back unmasked;
- glb as ``python -m glb`` (a child process) with a temporary config listing the
  backend statically and no handler modules; later a second glb that loads
  ``bench/handlers_passthrough.py`` (an empty ``client_message`` handler);
- nginx from the system as the reference, when ``nginx`` is on PATH (``--no-nginx``
  skips it): one worker, ``proxy_pass`` with the Upgrade/Connection headers;
- the load client is this process: one epoll loop over raw sockets, each connection
  sending a pre-masked 64-byte text frame and waiting for its echo before the next.

For each target (direct, glb, glb + handler, nginx): ``--connections`` connections
for ``--seconds`` (throughput), then one connection for ``--latency-seconds``.
The proxy's CPU time is the utime + stime delta of its processes (/proc/PID/stat;
nginx: master and worker) over the measured window, divided by the round trips.
Memory per idle relayed session: VmRSS of the proxy's processes before and after
opening ``--idle-sessions`` sessions (one echo each), in a fresh process.

    python bench/relay_bench.py              # ~100 s
    python bench/relay_bench.py --quick      # ~20 s smoke run
"""
import argparse
import base64
import hashlib
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from array import array

import _common
from _common import BENCH_DIR, process_tree, rss_kib, stop, tree_cpu, wait_for_port, wait_quiet

PAYLOAD = (b"glb relay bench " * 4)[:64]
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PATH = "/bench"
IDLE_FOR = 10.0  # seconds without any echo before a run is declared stuck

TARGETS_US = 30  # glb CPU per round trip, no handler
TARGET_P50_MS = 0.05  # single-connection p50 over nginx's
TARGET_KIB = 6  # per idle relayed session


# --------------------------------------------------------------------------- echo backend (child)


def accept_value(key):
    return base64.b64encode(hashlib.sha1(key + WEBSOCKET_GUID).digest())


class EchoConnection:
    """One client of the echo backend: handshake, then frames echoed as they come (fragments too)."""

    __slots__ = ("sock", "fd", "state", "head", "reader", "out", "reading")

    def __init__(self, sock):
        self.sock = sock
        self.fd = sock.fileno()
        self.state = "handshake"  # then "open", then "closing" (read and drop until EOF)
        self.head = b""
        self.reader = None  # FrameReader once open
        self.out = bytearray()  # bytes the socket did not take yet
        self.reading = True


def serve_echo(max_message_size=1 << 20):
    """The backend child: prints its port, echoes until SIGTERM."""
    from glb.errors import CloseCode, ProtocolError
    from glb.frames import (OP_CLOSE, OP_PING, OP_PONG, FrameReader, encode_close_payload,
                            encode_frame)

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    listener.setblocking(False)
    listen_fd = listener.fileno()
    ep = select.epoll()
    ep.register(listen_fd, select.EPOLLIN)
    conns = {}

    def drop(conn):
        if conns.pop(conn.fd, None) is not None:
            ep.unregister(conn.fd)
            conn.sock.close()

    def watch(conn):
        ep.modify(conn.fd, (select.EPOLLIN if conn.reading else 0) | (select.EPOLLOUT if conn.out else 0))

    def send(conn, data):
        if not conn.out:
            try:
                sent = conn.sock.send(data)
            except BlockingIOError:
                sent = 0
            except OSError:
                drop(conn)
                return
            if sent == len(data):
                return
            conn.out += data[sent:]
        else:
            conn.out += data
        # a peer that does not read: stop reading it until it has caught up
        conn.reading = len(conn.out) <= 4 * max_message_size
        watch(conn)

    def flush(conn):
        try:
            sent = conn.sock.send(conn.out)
        except BlockingIOError:
            return
        except OSError:
            drop(conn)
            return
        del conn.out[:sent]
        conn.reading = len(conn.out) <= 4 * max_message_size
        watch(conn)

    def handshake(conn, data):
        """Answer the upgrade once its head is complete; returns bytes after the head."""
        conn.head += data
        end = conn.head.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.head) > 16384:
                drop(conn)
            return b""
        lines = conn.head[:end].decode("latin-1").split("\r\n")
        rest = conn.head[end + 4:]
        conn.head = b""
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if (not lines[0].startswith("GET ") or headers.get("upgrade", "").lower() != "websocket"
                or headers.get("sec-websocket-version") != "13" or "sec-websocket-key" not in headers):
            send(conn, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            end_stream(conn)
            return b""
        key = headers["sec-websocket-key"].encode("latin-1")
        send(conn, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Accept: " + accept_value(key) + b"\r\n\r\n")
        conn.state = "open"
        conn.reader = FrameReader(max_message_size, expect_masked=True)
        return rest

    def frames(conn, data):
        reader = conn.reader
        size = len(data)
        if size >= 6 and reader.at_boundary and not reader.in_message:
            first, second = data[0], data[1]
            if (first == 0x81 or first == 0x82) and second & 0x80 and (second & 0x7F) + 6 == size:
                # the common case, one whole small unfragmented message: no FrameReader needed
                length = size - 6
                key = data[2:6]
                payload = (int.from_bytes(data[6:], "little")
                           ^ int.from_bytes((key * (length // 4 + 1))[:length], "little")
                           ).to_bytes(length, "little")
                if first == 0x81:
                    try:
                        payload.decode("utf-8")
                    except UnicodeDecodeError:
                        fail(conn, CloseCode.INVALID_DATA, "invalid UTF-8")
                        return
                send(conn, bytes((first, length)) + payload)
                return
        reader.feed(data)
        while conn.state == "open":
            try:
                frame = reader.next_frame()
            except ProtocolError as exc:
                fail(conn, exc.code, exc.reason)
                return
            if frame is None:
                return
            if frame.opcode == OP_PING:
                send(conn, encode_frame(OP_PONG, frame.payload))
            elif frame.opcode == OP_CLOSE:
                send(conn, encode_frame(OP_CLOSE, frame.payload))  # its code and reason, echoed
                end_stream(conn)
            elif frame.opcode != OP_PONG:
                send(conn, encode_frame(frame.opcode, frame.payload, fin=frame.fin))

    def fail(conn, code, reason):
        send(conn, encode_frame(OP_CLOSE, encode_close_payload(code, reason)))
        end_stream(conn)

    def end_stream(conn):
        """Nothing more is sent; what arrives is dropped until the peer's EOF (or our unsent bytes are lost)."""
        conn.state = "closing"
        if not conn.out:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def readable(conn):
        try:
            data = conn.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            drop(conn)
        elif conn.state == "open":
            frames(conn, data)
        elif conn.state == "handshake":
            rest = handshake(conn, data)
            if rest and conn.state == "open":
                frames(conn, rest)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(listener.getsockname()[1], flush=True)
    while True:
        for fd, events in ep.poll():
            if fd == listen_fd:
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    conn = EchoConnection(sock)
                    conns[conn.fd] = conn
                    ep.register(conn.fd, select.EPOLLIN)
                continue
            conn = conns.get(fd)
            if conn is not None and events & select.EPOLLOUT:
                flush(conn)
                if conn.state == "closing" and not conn.out:
                    end_stream(conn)
            if conn is not None and fd in conns and conn.reading and events & ~select.EPOLLOUT:
                readable(conn)


# --------------------------------------------------------------------------- load client


def masked_frame(payload):
    """A text frame as a client sends it (one mask key for the whole run: the client's CPU stays low)."""
    key = os.urandom(4)
    length = len(payload)
    masked = (int.from_bytes(payload, "little")
              ^ int.from_bytes((key * (length // 4 + 1))[:length], "little")).to_bytes(length, "little")
    return bytes((0x81, 0x80 | length)) + key + masked


FRAME = masked_frame(PAYLOAD)
ECHO = bytes((0x81, len(PAYLOAD))) + PAYLOAD


def open_sessions(port, count, deadline, batch=100):
    """``count`` WebSocket sessions to 127.0.0.1:``port``, handshakes ``batch`` at a time; non-blocking sockets."""
    socks = []
    try:
        while len(socks) < count:
            pending = []
            for _ in range(min(batch, count - len(socks))):
                sock = socket.create_connection(("127.0.0.1", port), timeout=max(1.0, deadline - time.monotonic()))
                pending.append(sock)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                key = base64.b64encode(os.urandom(16))
                sock.sendall(b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                             b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n" % (port, key))
                sock.key = key
            for sock in pending:
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError(f"port {port} closed during the handshake: {head[:200]!r}")
                    head += chunk
                head, _, rest = head.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101") or accept_value(sock.key) not in head or rest:
                    raise ConnectionError(f"port {port}: unexpected handshake answer {head[:300]!r}")
                sock.setblocking(False)
                socks.append(sock)
            pending = []
    except BaseException:
        for sock in socks + pending:
            sock.close()
        raise
    return socks


class Socket(socket.socket):
    """A socket that can carry its handshake key."""

    __slots__ = ("key",)


def run_load(socks, seconds, proxy_pids, backend_pids):
    """Every socket keeps one message in flight for ``seconds`` (0: one round trip each).

    Returns a dict: round trips, elapsed seconds, sorted latencies (s), CPU (user, system)
    of the proxy, the backend and this client over the window.
    """
    ep = select.epoll(len(socks))
    by_fd = {}
    sent_at = {}
    for sock in socks:
        fd = sock.fileno()
        by_fd[fd] = sock
        ep.register(fd, select.EPOLLIN)
    latencies = array("d")
    record = latencies.append
    partial = {}  # fd -> bytes of an echo that came in pieces
    echo_size = len(ECHO)
    clock = time.perf_counter
    proxy_cpu, backend_cpu, own_cpu = tree_cpu(proxy_pids), tree_cpu(backend_pids), os.times()
    started = clock()
    stop_at = started + seconds
    for fd, sock in by_fd.items():
        sent_at[fd] = clock()
        sock.send(FRAME)
    in_flight = len(by_fd)
    done = 0
    try:
        while in_flight:
            events = ep.poll(IDLE_FOR)
            if not events:
                raise TimeoutError(f"{in_flight} echoes missing after {IDLE_FOR:g} s")
            now = clock()
            for fd, _ in events:
                sock = by_fd[fd]
                data = sock.recv(4096)
                if data != ECHO:
                    if not data:
                        raise ConnectionError("the server closed a session")
                    data = partial.pop(fd, b"") + data
                    if len(data) < echo_size:
                        partial[fd] = data
                        continue
                    if data != ECHO:
                        raise ValueError(f"unexpected echo {data[:100]!r}")
                record(now - sent_at[fd])
                done += 1
                if now < stop_at:
                    sent_at[fd] = clock()
                    if sock.send(FRAME) != len(FRAME):
                        raise ConnectionError("a 70-byte send was cut short")
                else:
                    in_flight -= 1
    finally:
        ep.close()
    elapsed = clock() - started
    own = os.times()
    latencies = array("d", sorted(latencies))
    return {
        "count": done, "elapsed": elapsed, "latencies": latencies,
        "proxy": _common.cpu_delta(proxy_cpu, tree_cpu(proxy_pids)),
        "backend": _common.cpu_delta(backend_cpu, tree_cpu(backend_pids)),
        "client": (own.user - own_cpu.user, own.system - own_cpu.system),
    }
