"""Plain HTTP through glb vs. direct: requests/s, glb CPU per request, backend connections.

One run starts, all on 127.0.0.1 and each stopped at the end:

- a small gevent WSGI backend (a child process) that answers GET with ``--size`` bytes
  and counts the TCP connections it accepted (read from a separate stats port);
- glb as ``python -m glb`` (a child process) with a temporary config that lists the
  backend statically and loads no handler modules;
- a load client: ``wrk`` when installed (``--client auto``), else a gevent client in
  this process, ``--concurrency`` keep-alive connections, each sending a request and
  reading the response before the next.

The client runs ``--seconds`` against the backend directly, then the same against glb.
glb's CPU time comes from /proc/PID/stat (utime + stime) around the glb phase. Every
phase is bounded by time and by ``--max-requests``; the whole run by ``--deadline``.

    python bench/http_bench.py                     # ~15 s
    python bench/http_bench.py --seconds 3 --size 65536 --client python
"""
import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from _common import cpu_delta, cpu_times, http_get, start_glb, stop, temp_dir


# --------------------------------------------------------------------------- backend (child)


def serve_backend(size):
    """The backend child: prints "PORT STATS_PORT", serves until SIGTERM."""
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from gevent.pywsgi import WSGIServer

    counts = {"accepted": 0, "requests": 0}
    body = b"x" * size

    class CountingServer(WSGIServer):
        def handle(self, sock, address):
            counts["accepted"] += 1
            # pywsgi writes the head and the body separately; without this, Nagle holds the
            # body until the peer's delayed ACK (~40 ms a request) and measures nothing else.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return super().handle(sock, address)

    def app(environ, start_response):
        counts["requests"] += 1
        environ["wsgi.input"].read()
        start_response("200 OK", [("Content-Type", "application/octet-stream"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    def stats(environ, start_response):
        data = json.dumps(counts).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(data)))])
        return [data]

    server = CountingServer(("127.0.0.1", 0), app, log=None, backlog=1024)
    stats_server = WSGIServer(("127.0.0.1", 0), stats, log=None)
    server.start()
    stats_server.start()
    print(server.server_port, stats_server.server_port, flush=True)
    gevent.signal_handler(signal.SIGTERM, lambda: (server.stop(timeout=0), stats_server.stop(timeout=0)))
    server.serve_forever()


# --------------------------------------------------------------------------- helpers


def per_request(times, count):
    """"U us/request (user A + system B)" for (user, system) seconds over ``count`` requests."""
    count = max(count, 1)
    user, system = times
    return (f"{(user + system) / count * 1e6:.0f} us/request "
            f"(user {user / count * 1e6:.0f} + system {system / count * 1e6:.0f})")


def backend_stats(stats_port):
    data = http_get(stats_port, "/", "stats", timeout=5)
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


# --------------------------------------------------------------------------- load clients


def python_client(port, seconds, concurrency, max_requests):
    """(requests completed, elapsed seconds, errors): gevent, raw keep-alive sockets."""
    import gevent

    request = f"GET /bench HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
    state = {"done": 0, "errors": 0}
    stop_at = time.monotonic() + seconds

    def worker():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffer = b""
        try:
            while time.monotonic() < stop_at and state["done"] < max_requests:
                sock.sendall(request)
                while b"\r\n\r\n" not in buffer:
                    chunk = sock.recv(262144)
                    if not chunk:
                        raise ConnectionError("server closed")
                    buffer += chunk
                head, buffer = buffer.split(b"\r\n\r\n", 1)
                match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                if not head.startswith(b"HTTP/1.1 200") or not match:
                    raise ValueError(f"unexpected response head: {head[:200]!r}")
                length = int(match.group(1))
                while len(buffer) < length:
                    chunk = sock.recv(262144)
                    if not chunk:
                        raise ConnectionError("server closed mid-body")
                    buffer += chunk
                buffer = buffer[length:]
                state["done"] += 1
        except (OSError, ValueError) as exc:
            state["errors"] += 1
            print(f"  client error: {exc}", file=sys.stderr)
        finally:
            sock.close()

    started = time.monotonic()
    workers = [gevent.spawn(worker) for _ in range(concurrency)]
    gevent.joinall(workers, timeout=seconds + 15)
    gevent.killall(workers, timeout=2)
    return state["done"], time.monotonic() - started, state["errors"]


def wrk_client(port, seconds, concurrency, max_requests):
    """(requests completed, elapsed seconds, errors) from wrk's report."""
    threads = max(1, min(2, concurrency))
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{concurrency}", f"-d{max(1, round(seconds))}s",
                          f"http://127.0.0.1:{port}/bench"],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    done = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if not done:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    unit = {"ms": 0.001, "s": 1, "m": 60}[done.group(3)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    count = int(errors.group(1)) if errors else 0
    count += sum(map(int, socket_errors.groups())) if socket_errors else 0
    return int(done.group(1)), float(done.group(2)) * unit, count


# --------------------------------------------------------------------------- the run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5, help="length of each phase (default 5)")
    parser.add_argument("--concurrency", type=int, default=16, help="client connections (default 16)")
    parser.add_argument("--size", type=int, default=1024, help="response body bytes (default 1024)")
    parser.add_argument("--max-requests", type=int, default=500000, help="most requests per phase")
    parser.add_argument("--client", choices=("auto", "python", "wrk"), default="auto")
    parser.add_argument("--deadline", type=float, default=90, help="whole run, seconds (default 90)")
    parser.add_argument("--serve-backend", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend:
        return serve_backend(args.size)

    from gevent import monkey

    monkey.patch_all()
    client_name = args.client
    if client_name == "auto":
        client_name = "wrk" if shutil.which("wrk") else "python"
    client = wrk_client if client_name == "wrk" else python_client
    deadline = time.monotonic() + args.deadline
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("bench: deadline passed"))
    signal.alarm(int(args.deadline) + 1)

    backend = glb = None
    tmp = temp_dir("glb-bench-")
    try:
        backend = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-backend",
                                    "--size", str(args.size)], stdout=subprocess.PIPE, text=True)
        port, stats_port = map(int, backend.stdout.readline().split())
        glb, glb_port = start_glb(sys.executable, tmp, port, deadline)

        print(f"client={client_name} concurrency={args.concurrency} size={args.size}B "
              f"seconds={args.seconds:g} cpus={os.cpu_count()}")
        start = backend_stats(stats_port)
        client(glb_port, 0.5, min(args.concurrency, 4), 2000)  # warm-up: imports, first pool connections

        before = backend_stats(stats_port)
        backend_cpu = cpu_times(backend.pid)
        done_direct, took_direct, errors_direct = client(port, args.seconds, args.concurrency, args.max_requests)
        backend_cpu = cpu_delta(backend_cpu, cpu_times(backend.pid))
        middle = backend_stats(stats_port)
        glb_cpu = cpu_times(glb.pid)
        done_glb, took_glb, errors_glb = client(glb_port, args.seconds, args.concurrency, args.max_requests)
        glb_cpu = cpu_delta(glb_cpu, cpu_times(glb.pid))
        after = backend_stats(stats_port)

        rps_direct, rps_glb = done_direct / took_direct, done_glb / took_glb
        print(f"direct:      {rps_direct:9.0f} req/s  ({done_direct} requests in {took_direct:.1f}s, "
              f"{errors_direct} errors, backend accepted {middle['accepted'] - before['accepted']} connections)")
        print(f"through glb: {rps_glb:9.0f} req/s  ({done_glb} requests in {took_glb:.1f}s, "
              f"{errors_glb} errors)")
        print(f"ratio glb/direct: {rps_glb / rps_direct:.2f}")
        print(f"glb CPU: {sum(glb_cpu):.2f}s for {done_glb} requests = {per_request(glb_cpu, done_glb)}")
        print(f"for scale, the bare gevent backend, direct: {per_request(backend_cpu, done_direct)}")
        from_glb = (before["accepted"] - start["accepted"]) + (after["accepted"] - middle["accepted"])
        served = (before["requests"] - start["requests"]) + (after["requests"] - middle["requests"])
        print(f"keep-alive pool: the backend accepted {from_glb} TCP connections from glb for "
              f"{served} requests (warm-up included; {after['accepted'] - middle['accepted']} "
              f"new during the measured phase)")
        return 0 if not (errors_direct or errors_glb) else 1
    finally:
        stop(glb)
        stop(backend)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
