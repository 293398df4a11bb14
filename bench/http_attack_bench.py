"""Request smuggling and slowloris against glb: what glb answered, when, and what the backend saw.

One run starts, on 127.0.0.1, a raw backend (in this process: it records every
byte it receives and answers each request head with 200) and glb as ``python -m
glb`` in front of it (``handshake_timeout`` from ``--head-timeout``). Then:

- every smuggling case of tests/test_http_strict.py's table is sent on its own
  connection; printed: glb's status line, the time to it and to the close, and the
  bytes the backend received meanwhile (must be 0);
- ``--slow`` clients each send a request head one byte every 0.2 s; printed: how
  many were answered 408 and closed, and when (min/max seconds after connecting).

Every loop is bounded in count and time.

    python bench/http_attack_bench.py
    python bench/http_attack_bench.py --slow 200 --head-timeout 2
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

from _common import REPO, free_port, stop, temp_dir, wait_for_port

sys.path.insert(0, REPO)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slow", type=int, default=200, help="slowloris clients (default 200)")
    parser.add_argument("--head-timeout", type=float, default=2.0, help="glb's handshake_timeout (default 2)")
    args = parser.parse_args(argv)

    from gevent import monkey

    monkey.patch_all()
    import socket

    import gevent
    from gevent.server import StreamServer

    from tests.support import send_byte_by_byte
    from tests.test_http_strict import SMUGGLING

    received = bytearray()

    def backend(sock, address):
        while data := sock.recv(65536):
            received.extend(data)
            if b"\r\n\r\n" in data:
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    server = StreamServer(("127.0.0.1", 0), backend)
    server.start()
    tmp = temp_dir("glb-attack-")
    port = free_port()
    config = os.path.join(tmp, "lb.ini")
    with open(config, "w") as f:
        f.write(f"[glb]\nlisten = 127.0.0.1:{port}\nlog_level = error\nhandshake_timeout = {args.head_timeout}\n"
                f"[handlers]\nmodules =\n[backend:raw]\nurl = ws://127.0.0.1:{server.server_port}\n"
                f"http = http://127.0.0.1:{server.server_port}\n")
    glb = subprocess.Popen([sys.executable, "-m", "glb", config], cwd=tmp, env=dict(os.environ, PYTHONPATH=REPO))
    try:
        wait_for_port(port, time.monotonic() + 20, glb)
        print(f"{'case':<46}{'glb answered':<42}{'answer ms':>10}{'closed ms':>10}{'backend got':>12}")
        for name, raw, _ in SMUGGLING:
            before = len(received)
            started = time.monotonic()
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(raw)
                reply = sock.recv(65536)
                answered = time.monotonic() - started
                while sock.recv(65536):
                    pass
                closed = time.monotonic() - started
            gevent.sleep(0.05)  # anything forwarded would have reached the backend by now
            line = reply.split(b"\r\n", 1)[0].decode("latin-1")
            print(f"{name:<46}{line:<42}{answered * 1000:>10.1f}{closed * 1000:>10.1f}"
                  f"{len(received) - before:>10} B")

        head = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: slowloris\r\nX-Pad: " + b"p" * 100 + b"\r\n\r\n"
        outcomes = []

        def slow_client():
            started = time.monotonic()
            _, reply = send_byte_by_byte(("127.0.0.1", port), head, timeout=10)
            outcomes.append((reply.split(b"\r\n", 1)[0], time.monotonic() - started))

        clients = [gevent.spawn(slow_client) for _ in range(args.slow)]
        gevent.joinall(clients, timeout=len(head) * 0.2 + 30)
        answers = {}
        for status, _ in outcomes:
            key = status.decode("latin-1") or "(closed, no answer)"
            answers[key] = answers.get(key, 0) + 1
        times = [t for _, t in outcomes]
        print(f"\nslowloris: {args.slow} clients, one byte per 0.2 s of a {len(head)}-byte head "
              f"(would take {len(head) * 0.2:.0f} s); glb handshake_timeout = {args.head_timeout:g} s")
        print(f"  answers: {answers}")
        if times:
            print(f"  dropped after {min(times):.2f} s (first) to {max(times):.2f} s (last); "
                  f"{len(outcomes)} of {args.slow} ended; backend bytes received: {len(received)}")
        return 0
    finally:
        stop(glb)
        server.stop(timeout=0)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
