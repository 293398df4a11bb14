"""A large download and upload through glb: throughput and how much glb's memory grows.

One run starts, on 127.0.0.1, a small backend (a child process: ``GET /download``
answers ``--size`` bytes in 1 MiB pieces; ``PUT /upload`` reads the body, drops
it and answers its length) and glb (``python -m glb``) in front of it. This
process is the client: it downloads ``--size`` bytes, then uploads as many, both
through glb on one keep-alive connection, reading glb's VmRSS every 0.1 s.

    python bench/http_transfer_bench.py                 # 1 GiB each way
    python bench/http_transfer_bench.py --size 268435456 --glb-src /tmp/glb-main
"""
import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

from _common import REPO, free_port, rss_kib, stop, temp_dir, wait_for_port, write_glb_config

PIECE = 1 << 20


def serve_backend(port):
    """The backend child: raw sockets, one request after another per connection, until SIGTERM."""
    from gevent import monkey

    monkey.patch_all()
    from gevent.server import StreamServer

    block = bytes(range(256)) * (PIECE // 256)

    def handle(sock, address):
        buffer = b""
        while True:
            while b"\r\n\r\n" not in buffer:
                data = sock.recv(PIECE)
                if not data:
                    return
                buffer += data
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            if head.startswith(b"GET /download"):
                size = int(re.search(rb"size=(\d+)", head).group(1))
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                for start in range(0, size, PIECE):
                    sock.sendall(block[:min(PIECE, size - start)])
            else:
                remaining = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1)) - len(buffer)
                got = len(buffer)
                buffer = b""
                while remaining > 0:
                    data = sock.recv(min(PIECE, remaining))
                    if not data:
                        return
                    remaining -= len(data)
                    got += len(data)
                answer = str(got).encode()
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(answer), answer))

    server = StreamServer(("127.0.0.1", port), handle)
    server.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


class RssWatch:
    """glb's VmRSS, sampled whenever ``sample()`` is called (at most every 0.1 s)."""

    def __init__(self, pid):
        self.pid = pid
        self.start = self.peak = rss_kib([pid])
        self.last = 0.0

    def sample(self):
        now = time.monotonic()
        if now - self.last >= 0.1:
            self.last = now
            self.peak = max(self.peak, rss_kib([self.pid]))


def read_head(sock, buffer, watch):
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(PIECE)
        if not data:
            raise ConnectionError("glb closed")
        buffer += data
        watch.sample()
    head, rest = buffer.split(b"\r\n\r\n", 1)
    return head, rest


def download(sock, size, watch):
    sock.sendall(b"GET /download?size=%d HTTP/1.1\r\nHost: bench\r\n\r\n" % size)
    head, rest = read_head(sock, b"", watch)
    assert head.startswith(b"HTTP/1.1 200"), head
    got = len(rest)
    while got < size:
        data = sock.recv(PIECE)
        if not data:
            raise ConnectionError(f"glb closed after {got} bytes")
        got += len(data)
        watch.sample()
    return got


def upload(sock, size, watch):
    sock.sendall(b"PUT /upload HTTP/1.1\r\nHost: bench\r\nContent-Length: %d\r\n\r\n" % size)
    block = b"u" * PIECE
    for start in range(0, size, PIECE):
        sock.sendall(block[:min(PIECE, size - start)])
        watch.sample()
    head, rest = read_head(sock, b"", watch)
    assert head.startswith(b"HTTP/1.1 200"), head
    return int(rest or sock.recv(64))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=1 << 30, help="bytes each way (default 1 GiB)")
    parser.add_argument("--glb-src", default=REPO, help="the checkout glb runs from (default: this one)")
    parser.add_argument("--deadline", type=float, default=300, help="whole run, seconds (default 300)")
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_backend:
        return serve_backend(args.serve_backend)
    deadline = time.monotonic() + args.deadline
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("bench: deadline passed"))
    signal.alarm(int(args.deadline) + 1)
    tmp = temp_dir("glb-transfer-bench-")
    backend = glb = None
    try:
        backend_port = free_port()
        backend = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--serve-backend", str(backend_port)])
        wait_for_port(backend_port, deadline, backend)
        port = free_port()
        config = write_glb_config(tmp, port, backend_port)
        glb = subprocess.Popen([sys.executable, "-m", "glb", config], cwd=tmp,
                               env=dict(os.environ, PYTHONPATH=os.path.abspath(args.glb_src)))
        wait_for_port(port, deadline, glb)
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            watch = RssWatch(glb.pid)
            download(sock, 1, watch)  # warm-up: imports, the pooled connection
            watch = RssWatch(glb.pid)
            print(f"glb from {os.path.abspath(args.glb_src)}; {args.size / (1 << 20):.0f} MiB each way; "
                  f"glb RSS at start {watch.start / 1024:.1f} MiB")
            for name, step in (("download", download), ("upload", upload)):
                started = time.monotonic()
                moved = step(sock, args.size, watch)
                took = time.monotonic() - started
                assert moved == args.size, (name, moved)
                print(f"{name:>8}: {moved / (1 << 20):.0f} MiB in {took:.1f} s = {moved / took / (1 << 20):.0f} MiB/s; "
                      f"glb RSS peak so far {watch.peak / 1024:.1f} MiB "
                      f"(+{(watch.peak - watch.start) / 1024:.1f} MiB)")
        growth = (watch.peak - watch.start) / 1024
        print(f"glb RSS growth over both transfers: {growth:.1f} MiB (target < 10 MiB)")
        return 0
    finally:
        stop(glb)
        stop(backend)
        shutil.rmtree(tmp, ignore_errors=True)
        signal.alarm(0)


if __name__ == "__main__":
    sys.exit(main())
