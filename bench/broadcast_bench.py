"""Broadcast fan-out through glb: messages delivered per second and glb's CPU per delivered message.

One run starts, all on 127.0.0.1 and each stopped at the end:

- glb as ``python -m glb`` (a child process) with a temporary config: no handler modules,
  round-robin balancing (so the binding endpoint shows when every backend is ready);
- for each K in ``--backends`` (default 2 and 8): K backend processes, each a real
  ``glb.demo_backend.DemoBackend`` registered with glb through the agent, with ``--clients``
  (default 100) WebSocket clients connected to it directly; the clients only count the bytes
  they receive (every message is one 66-byte frame: 2-byte header, 64-byte payload);
- backend 0 broadcasts ``--messages`` 64-byte messages with ``agent.broadcast``, at most
  ``--window`` ahead of what its own first client has received (flow control, so the
  benchmark measures throughput rather than glb's slow-consumer cut-off).

glb relays each envelope to all K backends (the sender included); each backend writes it to its
100 clients. Reported per K: envelopes glb delivered to backends per second, messages delivered
to clients per second, and glb's CPU time (utime + stime from /proc/PID/stat, over the measured
phase) per envelope delivered to a backend and per message delivered to a client. Every phase is
bounded by ``--seconds``; the whole run by ``--deadline``.

    python bench/broadcast_bench.py                          # K = 2 and 8, 100 clients each
    python bench/broadcast_bench.py --backends 2 --messages 10000
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from urllib.parse import parse_qs

from _common import REPO, cpu_delta, cpu_times, free_port, glb_env, http_get, stop, temp_dir

if REPO not in sys.path:
    sys.path.insert(0, REPO)
PAYLOAD_SIZE = 64
FRAME_SIZE = 2 + PAYLOAD_SIZE  # an unmasked text frame with a payload under 126 bytes


# --------------------------------------------------------------------------- backend (child)


def serve_backend(lb_url, clients):
    """A backend child: a DemoBackend with ``clients`` counting clients; prints its port, serves until SIGTERM.

    HTTP ``GET /stats`` answers the bytes each client received, how many times the agent
    registered and ``done_at`` (CLOCK_MONOTONIC, comparable across processes: when every
    client had received ``target`` bytes); ``GET /expect?bytes=B`` sets that target;
    ``GET /send?n=N&window=W`` starts broadcasting N messages in the background.
    The clients are read by one greenlet through an epoll set, so counting costs little.
    """
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import gevent.socket
    from gevent.event import Event

    from glb.demo_backend import DemoBackend
    from glb.websocket import connect

    received = [0] * clients
    progress = Event()
    state = {"sent": 0, "target": None, "done_at": None}

    class BenchBackend(DemoBackend):
        def app(self, environ, start_response):
            path = environ.get("PATH_INFO")
            if path == "/stats":
                link = self.agent.links[0]
                body = {"received": received, "sent": state["sent"], "registrations": link.registrations,
                        "registered": self.agent.registered, "done_at": state["done_at"]}
            elif path == "/expect":
                state["target"] = int(parse_qs(environ.get("QUERY_STRING", ""))["bytes"][0])
                state["done_at"] = None
                body = {"target": state["target"]}
            elif path == "/send":
                query = parse_qs(environ.get("QUERY_STRING", ""))
                self.sessions.spawn(send, int(query["n"][0]), int(query["window"][0]))
                body = {"started": True}
            else:
                return super().app(environ, start_response)
            data = json.dumps(body).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
            return [data]

    backend = BenchBackend(0, "127.0.0.1", [lb_url])
    port = backend.start()

    epoll = monkey.get_original("select", "epoll")()
    sockets = {}  # fd -> (client index, socket)
    for index in range(clients):
        ws, _, _ = connect(f"ws://127.0.0.1:{port}/", timeout=10)
        received[index] += len(ws.take_unread())
        sockets[ws.sock.fileno()] = (index, ws.sock)
        epoll.register(ws.sock.fileno(), 0x001)  # EPOLLIN

    def count():
        while True:
            gevent.socket.wait_read(epoll.fileno())
            for fd, _ in epoll.poll(0):
                index, _ = sockets[fd]
                try:
                    data = os.read(fd, 1 << 20)
                except BlockingIOError:
                    continue
                if not data:
                    epoll.unregister(fd)
                    continue
                received[index] += len(data)
            progress.set()
            target = state["target"]
            if target is not None and state["done_at"] is None and min(received) >= target:
                state["done_at"] = time.monotonic()

    def send(n, window):
        payload = "m" * PAYLOAD_SIZE
        agent = backend.agent
        start = state["sent"]
        for i in range(n):
            while start + i - received[0] // FRAME_SIZE >= window:
                progress.clear()
                progress.wait(5)
            agent.broadcast(payload)
            state["sent"] += 1

    readers = [gevent.spawn(count)]
    print(port, flush=True)
    stop = Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    backend.stop(timeout=1)
    gevent.killall(readers, timeout=1)


# --------------------------------------------------------------------------- helpers


def http_json(port, path, timeout=20):
    data = http_get(port, path, "bench", timeout)
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"{path}: {head[:100]!r}")
    return json.loads(body)


def wait_for(condition, deadline, what):
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


def offered_ports(glb_port, count):
    try:
        answers = [http_json(glb_port, "/sgc@lb@client@get@binding", timeout=2) for _ in range(2 * count)]
    except (OSError, RuntimeError, ValueError):
        return set()
    return {a["port"] for a in answers}


def total_messages(stats):
    return sum(sum(s["received"]) for s in stats) // FRAME_SIZE


# --------------------------------------------------------------------------- one K


def run_fanout(k, args, glb, glb_port, env, deadline):
    backends, ports = [], []
    try:
        for _ in range(k):
            proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-backend",
                                     "--lb", f"ws://127.0.0.1:{glb_port}", "--clients", str(args.clients)],
                                    stdout=subprocess.PIPE, text=True, env=env)
            backends.append(proc)
        ports = [int(proc.stdout.readline()) for proc in backends]
        wait_for(lambda: offered_ports(glb_port, k) == set(ports), deadline, f"{k} backends ready in glb")

        def stats():
            return [http_json(port, "/stats") for port in ports]

        wait_for(lambda: all(len(s["received"]) == args.clients for s in stats()), deadline, "clients")
        # Warm-up: one small round, so every client is connected and every path is hot.
        warm = 200
        before = total_messages(stats())
        http_json(ports[0], f"/send?n={warm}&window={args.window}")
        wait_for(lambda: total_messages(stats()) - before >= warm * k * args.clients, deadline, "warm-up")

        start_stats = stats()
        base = total_messages(start_stats)
        expected = args.messages * k * args.clients
        for port, s in zip(ports, start_stats):
            http_json(port, f"/expect?bytes={min(s['received']) + args.messages * FRAME_SIZE}")
        cpu_before = cpu_times(glb.pid)
        started = time.monotonic()
        http_json(ports[0], f"/send?n={args.messages}&window={args.window}")
        stop_at = min(deadline, started + args.seconds)
        while True:
            time.sleep(0.5)
            current = stats()
            if all(s["done_at"] for s in current) or time.monotonic() > stop_at:
                break
        cpu_after = cpu_times(glb.pid)  # glb is idle once the last delivery is in: the extra wait adds ~0
        delivered = total_messages(current) - base
        finished = [s["done_at"] for s in current]
        elapsed = (max(finished) if all(finished) else time.monotonic()) - started
        sent = current[0]["sent"] - start_stats[0]["sent"]
        reconnects = sum(s["registrations"] - 1 for s in current)
        user, system = cpu_delta(cpu_before, cpu_after)
        envelopes = delivered / args.clients  # envelopes glb delivered to backends (each reaches 100 clients)
        print(f"K={k} backends x {args.clients} clients, {sent} broadcasts of {PAYLOAD_SIZE} B "
              f"(window {args.window}) in {elapsed:.2f} s")
        print(f"  delivered to clients:  {delivered:9d} of {expected} = {delivered / elapsed:10.0f} msg/s")
        print(f"  glb -> backends:       {envelopes:9.0f} envelopes   = {envelopes / elapsed:10.0f} env/s "
              f"({sent / elapsed:.0f} broadcasts/s in)")
        print(f"  glb CPU: {user + system:.2f} s (user {user:.2f} + system {system:.2f}) = "
              f"{(user + system) / max(envelopes, 1) * 1e6:.1f} us per envelope delivered to a backend, "
              f"{(user + system) / max(delivered, 1) * 1e9:.0f} ns per message delivered to a client")
        print(f"  control channels dropped and re-registered during the run: {reconnects}")
        return delivered == expected and reconnects == 0
    finally:
        for proc in backends:
            stop(proc)


# --------------------------------------------------------------------------- the run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="2,8", help="comma-separated K values (default 2,8)")
    parser.add_argument("--clients", type=int, default=100, help="clients per backend (default 100)")
    parser.add_argument("--messages", type=int, default=3000, help="broadcasts per K (default 3000)")
    parser.add_argument("--window", type=int, default=256,
                        help="most broadcasts in flight, counted at the sender's first client (default 256)")
    parser.add_argument("--seconds", type=float, default=30, help="cap on each measured phase (default 30)")
    parser.add_argument("--deadline", type=float, default=180, help="whole run, seconds (default 180)")
    parser.add_argument("--serve-backend", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lb", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend:
        return serve_backend(args.lb, args.clients)

    deadline = time.monotonic() + args.deadline
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("bench: deadline passed"))
    signal.alarm(int(args.deadline) + 1)
    glb = None
    tmp = temp_dir("glb-bench-")
    ok = True
    try:
        glb_port = free_port()
        config = os.path.join(tmp, "lb.ini")
        with open(config, "w") as f:
            f.write(textwrap.dedent(f"""\
                [glb]
                listen = 127.0.0.1:{glb_port}
                balancing = round_robin
                log_level = {os.environ.get("GLB_BENCH_LOG", "warning")}
                [handlers]
                modules =
                """))
        env = glb_env()
        glb = subprocess.Popen([sys.executable, "-m", "glb", config], cwd=tmp, env=env)
        wait_for(lambda: _listening(glb_port), deadline, "glb")
        print(f"cpus={os.cpu_count()} payload={PAYLOAD_SIZE}B clients/backend={args.clients} "
              f"messages={args.messages} window={args.window}")
        for k in (int(v) for v in args.backends.split(",")):
            ok = run_fanout(k, args, glb, glb_port, env, deadline) and ok
        return 0 if ok else 1
    finally:
        stop(glb)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.alarm(0)


def _listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    sys.exit(main())
