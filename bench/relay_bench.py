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
opening ``--idle-sessions`` sessions (one echo each), in a fresh process; for glb
both without handlers (raw sessions) and with the handler (decoded sessions).

After glb's own run, its ``/glb/metrics`` is read and set beside what the load
client sent and received through it (messages and bytes each way, closes by code).

``--compare DIR`` also runs the glb of another source tree (for example a
``git worktree`` of an earlier commit) against this one: each is started afresh
and measured in turn, ``--rounds`` times alternately, and the median CPU per
round trip of each is compared.

    python bench/relay_bench.py              # ~75 s
    python bench/relay_bench.py --quick      # ~20 s smoke run
    git worktree add /tmp/glb-before HEAD~1
    python bench/relay_bench.py --compare /tmp/glb-before --no-nginx --no-handler --idle-sessions 0
    python bench/relay_bench.py --callgrind --compare /tmp/glb-before   # instructions per round trip, ~3 min
"""
import argparse
import base64
import hashlib
import os
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from array import array

import _common
from _common import BENCH_DIR, free_port, process_tree, rss_kib, stop, tree_cpu, wait_for_port, wait_quiet

PAYLOAD = (b"glb relay bench " * 4)[:64]
WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
PATH = "/bench"
IDLE_FOR = 10.0  # seconds without any echo before a run is declared stuck

TARGET_P50_MS = 0.03  # single-connection p50 over nginx's
TARGET_KIB = 4  # per idle raw relayed session
TARGET_DECODED_KIB = 8  # per idle decoded session (a client_message handler is loaded)


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
    socks, pending = [], []
    try:
        while len(socks) < count:
            pending, keys = [], []
            for _ in range(min(batch, count - len(socks))):
                sock = socket.create_connection(("127.0.0.1", port), timeout=max(1.0, deadline - time.monotonic()))
                pending.append(sock)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                key = base64.b64encode(os.urandom(16))
                keys.append(key)
                sock.sendall(b"GET " + PATH.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n"
                             b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: %s\r\n"
                             b"Sec-WebSocket-Version: 13\r\n\r\n" % (port, key))
            for sock, key in zip(pending, keys):
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError(f"port {port} closed during the handshake: {head[:200]!r}")
                    head += chunk
                head, _, rest = head.partition(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 101") or accept_value(key) not in head or rest:
                    raise ConnectionError(f"port {port}: unexpected handshake answer {head[:300]!r}")
                sock.setblocking(False)
                socks.append(sock)
            pending = []
    except BaseException:
        for sock in socks + pending:
            sock.close()
        raise
    return socks


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


def close_all(socks):
    for sock in socks:
        sock.close()


# --------------------------------------------------------------------------- nginx (reference)


def start_nginx(nginx, directory, backend_port, deadline, max_connections):
    """nginx in the foreground, one worker, proxying WebSocket upgrades to the backend: (Popen, port)."""
    port = free_port()
    options = subprocess.run([nginx, "-V"], capture_output=True, text=True, timeout=10).stderr
    temp_paths = "".join(f"    {module}_temp_path {directory}/{module}_temp;\n"
                         for module in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
                         if module in ("client_body", "proxy") or f"--without-http_{module}_module" not in options)
    user = "user nobody nogroup;\n" if os.geteuid() == 0 else ""
    config = os.path.join(directory, "nginx.conf")
    with open(config, "w") as f:
        f.write(f"""\
daemon off;
master_process on;
worker_processes 1;
{user}pid {directory}/nginx.pid;
error_log {directory}/nginx-error.log warn;
worker_rlimit_nofile {max_connections * 4 + 256};
events {{ worker_connections {max_connections * 4 + 256}; }}
http {{
    access_log off;
{temp_paths}    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://127.0.0.1:{backend_port};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
""")
    with open(os.path.join(directory, "nginx.out"), "w") as out:
        proc = subprocess.Popen([nginx, "-p", directory + "/", "-c", config, "-e", f"{directory}/nginx-error.log"],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, min(deadline, time.monotonic() + 10), proc)
    except BaseException:
        stop(proc)
        raise
    return proc, port


def nginx_log_tail(directory):
    lines = []
    for name in ("nginx.out", "nginx-error.log"):
        try:
            with open(os.path.join(directory, name)) as f:
                lines += f.read().splitlines()[-3:]
        except OSError:
            pass
    return " | ".join(lines)


# --------------------------------------------------------------------------- measuring


class Scenario:
    """One way to reach the echo backend, and what was measured through it."""

    def __init__(self, name, port, proxy_pids):
        self.name, self.port, self.proxy_pids = name, port, proxy_pids
        self.load = self.single = None
        self.memory = None  # (rss before KiB, rss after KiB, sessions)
        self.round_trips = 0  # every echo through this target, warm-ups included
        self.sessions = 0  # every session opened through it


def measure(scenario, args, backend_pids, deadline):
    """Throughput with ``--connections`` connections, then latency with one."""
    warmup = min(0.5, args.seconds / 4)
    socks = open_sessions(scenario.port, args.connections, deadline)
    scenario.sessions += len(socks)
    try:
        scenario.round_trips += run_load(socks, warmup, scenario.proxy_pids, backend_pids)["count"]
        scenario.load = run_load(socks, args.seconds, scenario.proxy_pids, backend_pids)
        scenario.round_trips += scenario.load["count"]
    finally:
        close_all(socks)
    wait_quiet(scenario.proxy_pids + backend_pids, limit=3)
    socks = open_sessions(scenario.port, 1, deadline)
    scenario.sessions += 1
    try:
        scenario.round_trips += run_load(socks, warmup, scenario.proxy_pids, backend_pids)["count"]
        scenario.single = run_load(socks, args.latency_seconds, scenario.proxy_pids, backend_pids)
        scenario.round_trips += scenario.single["count"]
    finally:
        close_all(socks)
    wait_quiet(scenario.proxy_pids + backend_pids, limit=3)


def measure_memory(scenario, count, backend_pids, deadline):
    """VmRSS of the proxy before and after ``count`` idle sessions (each has echoed one message)."""
    warm = open_sessions(scenario.port, min(50, count), deadline)  # first-use allocations, not per session
    scenario.sessions += len(warm)
    try:
        scenario.round_trips += run_load(warm, 0, scenario.proxy_pids, backend_pids)["count"]
    finally:
        close_all(warm)
    wait_quiet(scenario.proxy_pids, limit=3)
    before = rss_kib(scenario.proxy_pids)
    socks = open_sessions(scenario.port, count, deadline)
    scenario.sessions += len(socks)
    try:
        scenario.round_trips += run_load(socks, 0, scenario.proxy_pids, backend_pids)["count"]
        wait_quiet(scenario.proxy_pids, limit=3)
        scenario.memory = (before, rss_kib(scenario.proxy_pids), count)
    finally:
        close_all(socks)
    wait_quiet(scenario.proxy_pids + backend_pids, limit=5)


def scrape_metrics(port):
    """glb's ``/glb/metrics`` as {(name, labels text): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/glb/metrics", timeout=10) as answer:
        text = answer.read().decode()
    samples = {}
    for match in re.finditer(r"^(\w+)(?:\{(.*)\})? (\S+)$", text, re.M):
        samples[(match[1], match[2] or "")] = float(match[3])
    return samples


def wait_sessions_ended(port, sessions, deadline):
    """Scrape until glb counts ``sessions`` ended client sessions (closing handshakes take a moment)."""
    while True:
        samples = scrape_metrics(port)
        ended = sum(value for (name, _), value in samples.items() if name == "glb_ws_closes_total")
        if ended >= sessions or time.monotonic() > min(deadline, time.monotonic() + 10):
            return samples
        time.sleep(0.1)


def report_metrics(scenario, samples):
    """glb's own count beside the load client's: each round trip is one frame each way."""
    print(f"glb /glb/metrics after its run ({scenario.sessions} sessions, {scenario.round_trips} round trips "
          f"by the load client: {len(FRAME)}-byte frames sent, {len(ECHO)}-byte frames received):")
    for direction, frame in (("to_backend", FRAME), ("to_client", ECHO)):
        labels = f'backend="bench",direction="{direction}"'
        messages = samples.get(("glb_ws_messages_total", labels), 0)
        size = samples.get(("glb_ws_bytes_total", labels), 0)
        data = scenario.round_trips * len(frame)
        print(f"  {direction:<10} messages {messages:12.0f} (client: {scenario.round_trips})   "
              f"bytes {size:14.0f} (client's data frames: {data}; the rest: {size - data:.0f} bytes of close frames)")
    closes = {labels: value for (name, labels), value in samples.items() if name == "glb_ws_closes_total"}
    print("  closes: " + ", ".join(f"{labels} {value:.0f}" for labels, value in sorted(closes.items())))


def compare_trees(args, tmp, backend_port, backend_pids, deadline, procs):
    """This tree's glb and ``args.compare``'s, measured alternately; CPU per round trip, medians compared."""
    trees = [("this tree", _common.REPO), (os.path.basename(args.compare.rstrip("/")), args.compare)]
    cpu = {name: [] for name, _ in trees}
    for round_number in range(args.rounds):
        for name, source in trees:
            glb, port = _common.start_glb(sys.executable, tmp, backend_port, deadline, source=source)
            procs.append(glb)
            scenario = Scenario(name, port, [glb.pid])
            measure(scenario, args, backend_pids, deadline)
            stop(glb)
            cpu[name].append(micros(scenario.load["proxy"], scenario.load["count"]))
            print(f"  round {round_number + 1} {name:<16} CPU per round trip {cpu[name][-1]:6.2f} us "
                  f"({rate(scenario.load):.0f} msgs/s)", flush=True)
    (mine, _), (other, _) = trees
    a, b = statistics.median(cpu[mine]), statistics.median(cpu[other])
    print(f"compare: median CPU per round trip: {mine} {a:.2f} us, {other} {b:.2f} us: "
          f"{(a / b - 1) * 100:+.1f}% ({args.rounds} rounds each, alternating)")


def lockstep_rounds(socks, rounds):
    """Every socket sends one frame, then every echo is read; ``rounds`` times (a fixed amount of work)."""
    for sock in socks:
        sock.setblocking(True)
    for _ in range(rounds):
        for sock in socks:
            sock.sendall(FRAME)
        for sock in socks:
            got = 0
            while got < len(ECHO):
                chunk = sock.recv(4096)
                if not chunk:
                    raise ConnectionError("glb closed a session during the callgrind workload")
                got += len(chunk)


def callgrind_instructions(tmp, source, backend_port, deadline, connections=50, rounds=200):
    """Instructions glb (from the tree ``source``) executes per round trip, counted by valgrind's callgrind.

    A fixed workload (``connections`` sessions in lockstep, ``rounds`` echoes each) after a
    warm-up, counted between ``callgrind_control --zero`` and ``--dump``: the same count on a
    quiet or a busy machine, so small changes to the relay's CPU cost can be compared.
    """
    port = free_port()
    config = _common.write_glb_config(tmp, port, backend_port, name="lb-callgrind.ini")
    out = os.path.join(tmp, "callgrind.out")
    glb = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", sys.executable,
                            "-m", "glb", config], cwd=tmp, env=_common.glb_env(source=source),
                           stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, deadline, glb)
        socks = open_sessions(port, connections, deadline)
        try:
            lockstep_rounds(socks, 20)
            subprocess.run(["callgrind_control", "--zero", str(glb.pid)], check=True, capture_output=True, timeout=60)
            lockstep_rounds(socks, rounds)
            subprocess.run(["callgrind_control", "--dump", str(glb.pid)], check=True, capture_output=True,
                           timeout=60)
        finally:
            close_all(socks)
        dumps = sorted(name for name in os.listdir(tmp) if name.startswith("callgrind.out."))
        with open(os.path.join(tmp, dumps[-1])) as dump:
            total = next(int(line.split()[1]) for line in dump if line.startswith(("summary:", "totals:")))
        for name in dumps:
            os.remove(os.path.join(tmp, name))
        return total / (connections * rounds)
    finally:
        stop(glb)


def report_callgrind(args, tmp, backend_port, deadline):
    trees = [("this tree", _common.REPO)] + ([(args.compare, args.compare)] if args.compare else [])
    counts = []
    for name, source in trees:
        counts.append(callgrind_instructions(tmp, source, backend_port, deadline))
        print(f"callgrind: {counts[-1]:8.0f} instructions per round trip in glb ({name}; 50 connections x 200 "
              f"lockstep echoes)", flush=True)
    if len(counts) == 2:
        print(f"callgrind: this tree {(counts[0] / counts[1] - 1) * 100:+.1f}% against {args.compare}")


# --------------------------------------------------------------------------- report


def rate(result):
    return result["count"] / result["elapsed"]


def percentile(latencies, fraction):
    return latencies[min(len(latencies) - 1, int(len(latencies) * fraction))] * 1e3


def micros(times, count):
    return sum(times) / max(count, 1) * 1e6


HEADER = (f"{'scenario':<14} {'conns':>5} {'msgs/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'proxy CPU us/rt':>18} {'backend':>7} {'client':>6} {'vs direct':>9}")


def table_row(name, result, direct, proxied=True):
    count = result["count"]
    user, system = result["proxy"]
    proxy = (f"{micros(result['proxy'], count):6.1f} ({user / count * 1e6:.0f}+{system / count * 1e6:.0f})"
             if proxied else "-")
    versus = f"{rate(result) / rate(direct):8.2f}x" if direct else ""
    return (f"{name:<14} {result['conns']:>5} {rate(result):8.0f} {percentile(result['latencies'], 0.5):7.3f} "
            f"{percentile(result['latencies'], 0.99):7.3f} {proxy:>18} "
            f"{micros(result['backend'], count):7.1f} {micros(result['client'], count):6.1f} {versus:>9}")


def report(scenarios):
    direct = scenarios[0]
    print(HEADER)
    for field in ("load", "single"):
        for scenario in scenarios:
            result = getattr(scenario, field)
            if result is not None:
                reference = getattr(direct, field)
                print(table_row(scenario.name, result, None if scenario is direct else reference,
                                proxied=scenario is not direct))
    print("(proxy CPU: utime+stime of the proxy's processes per round trip, user+system in brackets;"
          " backend and client: the same for them, us/rt)")
    for scenario in scenarios:
        if scenario.memory is not None:
            before, after, count = scenario.memory
            print(f"idle sessions, {scenario.name}: {(after - before) / count:.2f} KiB per session "
                  f"(VmRSS {before / 1024:.1f} MiB -> {after / 1024:.1f} MiB with {count} sessions open)")


def report_targets(by_name):
    glb, handler, nginx = by_name.get("glb"), by_name.get("glb+handler"), by_name.get("nginx")
    if glb is None:
        return
    print("targets (glb, no handler):")
    cpu = micros(glb.load["proxy"], glb.load["count"])
    if nginx is not None:
        reference = micros(nginx.load["proxy"], nginx.load["count"])
        print(f"  CPU per round trip {cpu:6.1f} us   target <= nginx {reference:.1f} us: "
              f"{'met' if cpu <= reference else 'MISSED'} ({cpu / reference:.2f}x)")
    else:
        print(f"  CPU per round trip {cpu:6.1f} us   (no nginx in this run to compare with)")
    p50 = percentile(glb.single["latencies"], 0.5)
    if nginx is not None:
        reference = percentile(nginx.single["latencies"], 0.5)
        print(f"  N=1 p50            {p50:6.3f} ms   target <= nginx {reference:.3f} + {TARGET_P50_MS} ms: "
              f"{'met' if p50 <= reference + TARGET_P50_MS else 'MISSED'}")
    else:
        print(f"  N=1 p50            {p50:6.3f} ms   (no nginx in this run to compare with)")
    if glb.memory is not None:
        before, after, count = glb.memory
        kib = (after - before) / count
        line = f"  idle session       {kib:6.2f} KiB  target <= {TARGET_KIB} KiB: {'met' if kib <= TARGET_KIB else 'MISSED'}"
        if nginx is not None and nginx.memory is not None:
            line += f"; nginx {(nginx.memory[1] - nginx.memory[0]) / nginx.memory[2]:.2f} KiB"
        print(line)
    if handler is not None:
        extra = micros(handler.load["proxy"], handler.load["count"]) - cpu
        print(f"  with the empty client_message handler: {extra:+.1f} us per round trip")
        if handler.memory is not None:
            before, after, count = handler.memory
            kib = (after - before) / count
            print(f"  idle decoded session {kib:4.2f} KiB  target <= {TARGET_DECODED_KIB} KiB: "
                  f"{'met' if kib <= TARGET_DECODED_KIB else 'MISSED'}")


# --------------------------------------------------------------------------- the run


def raise_fd_limit(wanted):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children (glb) inherit it
        soft = hard
    return soft


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=10, help="throughput phase per target (default 10)")
    parser.add_argument("--latency-seconds", type=float, default=5,
                        help="single-connection phase per target (default 5)")
    parser.add_argument("--connections", type=int, default=200, help="connections in the throughput phase")
    parser.add_argument("--idle-sessions", type=int, default=2000, help="sessions for the memory figure")
    parser.add_argument("--no-nginx", action="store_true", help="skip the nginx reference")
    parser.add_argument("--no-handler", action="store_true", help="skip the run with a client_message handler")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 s, 1 s, 50 connections, 200 idle sessions")
    parser.add_argument("--deadline", type=float, help="whole run, seconds (default: from the phases)")
    parser.add_argument("--compare", metavar="DIR", help="also measure the glb in this source tree "
                        "(e.g. a git worktree of an earlier commit), alternately with this one")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds for --compare (default 3)")
    parser.add_argument("--callgrind", action="store_true",
                        help="only count glb's instructions per round trip under valgrind's callgrind (a fixed "
                        "workload, repeatable on a busy machine); with --compare, for both trees")
    parser.add_argument("--serve-echo", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_echo:
        return serve_echo()
    if args.quick:
        args.seconds, args.latency_seconds, args.connections, args.idle_sessions = 2, 1, 50, 200
    if min(args.seconds, args.latency_seconds) <= 0 or args.connections < 1 or args.idle_sessions < 0:
        parser.error("durations and --connections must be positive, --idle-sessions not negative")
    nginx = None if args.no_nginx else shutil.which("nginx")
    if args.deadline is None:
        args.deadline = 4 * (args.seconds + args.latency_seconds + 10) + args.idle_sessions / 100 + 60
        if args.compare:
            args.deadline += 2 * args.rounds * (args.seconds + args.latency_seconds + 10)
    if args.callgrind and not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        parser.error("--callgrind needs valgrind (Debian: apt-get install valgrind)")
    if args.compare and not os.path.isdir(os.path.join(args.compare, "glb")):
        parser.error(f"--compare {args.compare}: no glb package there")
    fd_limit = raise_fd_limit(args.idle_sessions + args.connections + 64)
    if fd_limit < 2 * args.idle_sessions + 64:
        shrunk = max(0, (fd_limit - 64) // 2)
        print(f"fd limit {fd_limit} (ulimit -n): --idle-sessions {args.idle_sessions} -> {shrunk}")
        args.idle_sessions = shrunk
    deadline = time.monotonic() + args.deadline
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("relay_bench: deadline passed"))
    signal.alarm(int(args.deadline) + 1)

    tmp = _common.temp_dir("glb-relay-bench-")
    procs = []  # every child, stopped in the finally
    nginx_pids = []
    try:
        backend = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-echo"],
                                   stdout=subprocess.PIPE, text=True, env=_common.glb_env())
        procs.append(backend)
        backend_port = int(backend.stdout.readline())
        backend_pids = [backend.pid]
        if args.callgrind:
            report_callgrind(args, tmp, backend_port, deadline)
            return 0
        version = ""
        if nginx:
            version = subprocess.run([nginx, "-v"], capture_output=True, text=True,
                                     timeout=10).stderr.strip().split("/")[-1]
        print(f"relay bench: {len(PAYLOAD)}-byte text echo; {args.connections} connections x {args.seconds:g} s,"
              f" 1 connection x {args.latency_seconds:g} s, {args.idle_sessions} idle sessions; "
              f"cpus={os.cpu_count()} fd limit={fd_limit} python={sys.version.split()[0]} "
              f"nginx={version or 'not used'}", flush=True)

        scenarios = [Scenario("direct", backend_port, [])]
        measure(scenarios[0], args, backend_pids, deadline)

        glb, port = _common.start_glb(sys.executable, tmp, backend_port, deadline)
        procs.append(glb)
        scenarios.append(Scenario("glb", port, [glb.pid]))
        if args.idle_sessions:
            measure_memory(scenarios[-1], args.idle_sessions, backend_pids, deadline)
        measure(scenarios[-1], args, backend_pids, deadline)
        glb_metrics = wait_sessions_ended(port, scenarios[-1].sessions, deadline)
        stop(glb)

        if not args.no_handler:
            glb, port = _common.start_glb(sys.executable, tmp, backend_port, deadline, name="lb-handler.ini",
                                          modules="handlers_passthrough", extra_paths=(BENCH_DIR,))
            procs.append(glb)
            scenarios.append(Scenario("glb+handler", port, [glb.pid]))
            if args.idle_sessions:
                measure_memory(scenarios[-1], args.idle_sessions, backend_pids, deadline)
            measure(scenarios[-1], args, backend_pids, deadline)
            stop(glb)

        if nginx:
            try:
                proc, port = start_nginx(nginx, tmp, backend_port, deadline,
                                         max(args.idle_sessions, args.connections) + 64)
            except (OSError, RuntimeError) as exc:
                print(f"nginx did not start ({exc}): {nginx_log_tail(tmp)}")
            else:
                procs.append(proc)
                time.sleep(0.2)  # the worker is forked after the master listens
                nginx_pids = process_tree(proc.pid)
                scenarios.append(Scenario("nginx", port, nginx_pids))
                if args.idle_sessions:
                    measure_memory(scenarios[-1], args.idle_sessions, backend_pids, deadline)
                measure(scenarios[-1], args, backend_pids, deadline)

        for scenario in scenarios:
            scenario.load["conns"] = args.connections
            scenario.single["conns"] = 1
        report(scenarios)
        report_targets({scenario.name: scenario for scenario in scenarios})
        report_metrics(scenarios[1], glb_metrics)
        if args.compare:
            print(f"compare with {args.compare}:", flush=True)
            compare_trees(args, tmp, backend_port, backend_pids, deadline, procs)
        return 0
    finally:
        for proc in reversed(procs):
            stop(proc)
        for pid in nginx_pids:  # workers outlive a master killed the hard way
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        shutil.rmtree(tmp, ignore_errors=True)
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
