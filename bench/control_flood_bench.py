"""A control-channel flood against glb's fairness: how long an echo canary waits meanwhile.

One run starts, all on 127.0.0.1 and each stopped at the end:

- glb as ``python -m glb`` (a child process) with a temporary config;
- a canary: one WebSocket on ``/glb/echo`` sending a 16-byte message and waiting for it back,
  over and over; first ``--idle-seconds`` with nothing else going on (the baseline), then
  throughout the flood;
- the flood: a backend process (``python -m tests.control_flood``) that registers over the
  control channel and sends ``--records`` ``sgc@lb@client@connection`` records in
  ``--write-size`` writes (default 100,000 records in 64 KiB writes), then the ready marker;
  the flood is over when glb's ``/glb/status`` shows that backend ready.

Reported: the canary's round trips (count, p50, p99, worst) idle and during the flood, the
ratio of the two worsts, and the records glb processed per second. glb's reader yields after a
bounded amount of work (glb.websocket.TURN_BYTES), so the target is a worst round trip during
the flood of at most 50 ms. The run is bounded by ``--deadline``.

    python bench/control_flood_bench.py
    python bench/control_flood_bench.py --records 20000 --write-size 8192
"""
import argparse
import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import _common


class Canary:
    """A raw echo client: one masked 16-byte text frame out, the same frame back."""

    FRAME = struct.pack("!BB", 0x81, 0x80 | 16) + b"\0\0\0\0" + b"canary-canary-16"

    def __init__(self, port, deadline):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=max(1.0, deadline - time.monotonic()))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(b"GET /glb/echo HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\n"
                          b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                          b"Sec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"echo refused: {head[:40]!r}")

    def round_trip(self):
        start = time.perf_counter()
        self.sock.sendall(self.FRAME)
        got = b""
        while len(got) < 18:
            data = self.sock.recv(64)
            if not data:
                raise RuntimeError("glb closed the canary")
            got += data
        return time.perf_counter() - start

    def close(self):
        self.sock.close()


def flood_ready(port):
    """True once glb's status shows the flood backend ready (so every record has been processed)."""
    try:
        raw = _common.http_get(port, "/glb/status", "bench", timeout=5)
        status = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    except (OSError, ValueError, IndexError):
        return False
    return any(b["guid"] == "flood" and b["state"] == "ready" for b in status["backends"])


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def report(name, rtts):
    ms = [value * 1000 for value in rtts]
    print(f"  {name:<14} {len(ms):>7} round trips   p50 {percentile(ms, 0.5):7.2f} ms   "
          f"p99 {percentile(ms, 0.99):7.2f} ms   worst {max(ms):7.2f} ms")
    return max(ms)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=100_000, help="client records in the flood")
    parser.add_argument("--write-size", type=int, default=65536, help="bytes per write of the flood")
    parser.add_argument("--idle-seconds", type=float, default=2.0, help="canary baseline before the flood")
    parser.add_argument("--deadline", type=float, default=180.0, help="whole run, seconds")
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.deadline
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("control_flood_bench: deadline passed"))
    signal.alarm(int(args.deadline) + 1)

    directory = _common.temp_dir("glb-flood-")
    glb = flood = None
    try:
        glb, port = _common.start_glb(sys.executable, directory, _common.free_port(), deadline)
        canary = Canary(port, deadline)
        idle, end = [], time.monotonic() + args.idle_seconds
        while time.monotonic() < end:
            idle.append(canary.round_trip())

        flood = subprocess.Popen([sys.executable, "-m", "tests.control_flood", "127.0.0.1", str(port),
                                  str(args.records), "--write-size", str(args.write_size)],
                                 cwd=_common.REPO, env=_common.glb_env(), stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE)
        done = threading.Event()

        def watch():
            while not done.is_set() and time.monotonic() < deadline:
                if flood_ready(port):
                    done.set()
                time.sleep(0.05)
        watcher = threading.Thread(target=watch, daemon=True)
        started = time.monotonic()
        watcher.start()
        during = []
        while not done.is_set() and time.monotonic() < deadline:
            during.append(canary.round_trip())
        took = time.monotonic() - started
        canary.close()

        print(f"control-channel flood: {args.records} client records in {args.write_size}-byte writes")
        idle_worst = report("idle", idle)
        flood_worst = report("during flood", during)
        print(f"  worst during flood / worst idle: {flood_worst / idle_worst:.1f}x   "
              f"flood processed in {took:.2f} s ({args.records / took:,.0f} records/s, "
              f"including the backend process's start)")
        print(f"  target: worst during flood <= 50 ms: {'met' if flood_worst <= 50 else 'NOT met'}")
    finally:
        if flood is not None:
            flood.stdin.close()
            try:
                flood.wait(timeout=5)
            except subprocess.TimeoutExpired:
                flood.kill()
        _common.stop(glb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
