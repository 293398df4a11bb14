"""Changing the pool while it runs, at full size: real glb and demo-backend processes, real clients.

Scenarios (each prints its figures; all on 127.0.0.1, every wait bounded)::

    rebalance   300 sessions on three backends, a fourth joins: with [glb] rebalance = on the
                four end within +-10% of 75 each (closes and time stated); with it off nothing moves
    drain       200 sessions on the drained backend, spread 10 s: first and last 1012 close,
                and how many new sessions reached the drained backend (must be 0); beside it
                HAProxy's way (runtime API: state drain, then shutdown sessions), if installed
    sigstop     a registered backend SIGSTOPped: time until glb evicts it (heartbeat_timeout),
                the close codes its clients got, and where they reconnected
    restart     glb restarted under 100 reconnecting clients, backends re-registering with
                their own back-off: how many end on one backend, rebalancing off and on

The clients are ``tests/fleet.py``'s: they reconnect on 1012, 1014 and 1011 (and on 1001
for the restart). Run from the repository root::

    python bench/pool_bench.py                 # every scenario
    python bench/pool_bench.py drain sigstop   # some of them
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import requests  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import REPO, free_port, glb_env, stop, temp_dir, wait_for_port  # noqa: E402

sys.path.insert(0, REPO)
from tests.fleet import Fleet  # noqa: E402

PYTHON = sys.executable


class Glb:
    """A ``python -m glb`` process on a free (or given) port with ``settings`` for [glb]/[backends]."""

    def __init__(self, directory, glb=None, backends=None, port=None):
        self.port = port or free_port()
        sections = {"glb": {"listen": f"127.0.0.1:{self.port}", "log_level": "warning", **(glb or {})},
                    "handlers": {"modules": ""}, "backends": backends or {}}
        self.config = os.path.join(directory, f"lb-{self.port}.ini")
        with open(self.config, "w") as f:
            for section, values in sections.items():
                f.write(f"[{section}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()))
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen([PYTHON, "-m", "glb", self.config], env=glb_env())
        wait_for_port(self.port, time.monotonic() + 20, self.proc)
        return self

    def stop(self):
        stop(self.proc)

    @property
    def http(self):
        return f"http://127.0.0.1:{self.port}"

    @property
    def lb(self):
        return f"ws://127.0.0.1:{self.port}"

    def status(self):
        return requests.get(self.http + "/glb/status", timeout=5).json()

    def ready(self):
        return sorted(b["guid"] for b in self.status()["backends"] if b["state"] == "ready")

    def wait_ready(self, count, timeout=30):
        deadline = time.monotonic() + timeout
        while len(self.ready()) < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {self.ready()} registered in time")
            gevent.sleep(0.05)

    def admin(self, path, body=None):
        return requests.post(self.http + "/glb/admin/" + path, json=body, timeout=5).json()


def demo_backend(glb, guid):
    port = free_port()
    proc = subprocess.Popen([PYTHON, "-m", "glb.demo_backend", "--port", str(port), "--lb", glb.lb,
                             "--guid", guid], env=glb_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_port(port, time.monotonic() + 20, proc)
    return proc


def wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out: {what}")
        gevent.sleep(0.05)


def spread_text(counts):
    return ", ".join(f"{guid} {n}" for guid, n in sorted(counts.items()))


class Run:
    """Processes started by one scenario, all stopped at its end."""

    def __init__(self):
        self.procs, self.fleets = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for fleet in self.fleets:
            fleet.stop()
        for proc in reversed(self.procs):
            if isinstance(proc, Glb):
                proc.stop()
            else:
                try:
                    proc.send_signal(signal.SIGCONT)
                except OSError:
                    pass
                stop(proc)

    def glb(self, directory, **kwargs):
        glb = Glb(directory, **kwargs).start()
        self.procs.append(glb)
        return glb

    def backend(self, glb, guid):
        proc = demo_backend(glb, guid)
        self.procs.append(proc)
        return proc

    def fleet(self, url, count, **kwargs):
        fleet = Fleet(url, count, **kwargs)
        self.fleets.append(fleet)
        return fleet.start(timeout=60)


# -- scenarios ------------------------------------------------------------------------------------

def rebalance(directory, enabled):
    sessions, cooldown = 300, 2
    with Run() as run:
        glb = run.glb(directory, glb={"rebalance": "on" if enabled else "off", "rebalance_threshold": 0.1,
                                      "rebalance_rate": 20, "rebalance_cooldown": cooldown})
        for i in range(1, 4):
            run.backend(glb, f"b{i}")
        glb.wait_ready(3)
        fleet = run.fleet(glb.lb + "/app", sessions)
        before = fleet.by_backend()
        gevent.sleep(cooldown)  # every session older than the cooldown, so all may move
        joined = time.monotonic()
        run.backend(glb, "b4")
        glb.wait_ready(4)
        if not enabled:
            gevent.sleep(5)  # a bench may look after a while: nothing moved meanwhile
            after = fleet.by_backend()
            print(f"rebalance off: before [{spread_text(before)}], 5 s after b4 joined [{spread_text(after)}], "
                  f"closes {len(fleet.closes())}, rebalance_closes {glb.status()['rebalance_closes']}")
            return

        def balanced():
            counts = fleet.by_backend()
            return fleet.connected() == sessions and len(counts) == 4 and \
                all(abs(n - 75) <= 7.5 for n in counts.values())

        wait(balanced, 60, "four backends within 10% of 75")
        done = time.monotonic()
        gevent.sleep(6)  # the rebalancer looks again after a pass: nothing more may move
        closes = fleet.closes(1012)
        after = fleet.by_backend()
        print(f"rebalance on:  before [{spread_text(before)}], after [{spread_text(after)}]")
        print(f"               {len(closes)} closes with 1012 (glb counted {glb.status()['rebalance_closes']}); "
              f"first {closes[0].at - joined:.2f} s, last {closes[-1].at - joined:.2f} s after b4 started; "
              f"balanced {done - joined:.2f} s after b4 started")


def drain(directory):
    with Run() as run:
        glb = run.glb(directory)
        for guid in ("a", "b"):
            run.backend(glb, guid)
        glb.wait_ready(2)
        fleet = run.fleet(glb.lb + "/app", 400)
        before = fleet.by_backend()
        started = time.monotonic()
        answer = glb.admin("backends/a/drain", {"spread": 10})
        wait(lambda: fleet.by_backend().get("a", 0) == 0 and fleet.connected() == 400, 60, "a drained")
        closes = fleet.closes(1012)
        arrived = [guid for _, guid in fleet.opened_since(started) if guid == "a"]
        print(f"drain: before [{spread_text(before)}], glb closing {answer['closing']} session(s) of a, spread 10 s")
        print(f"       {len(closes)} closes with 1012 \"{closes[0].reason}\": first {closes[0].at - started:.2f} s, "
              f"last {closes[-1].at - started:.2f} s after the drain call; after [{spread_text(fleet.by_backend())}]; "
              f"new sessions that reached a: {len(arrived)}")
        print("       closes per second of the window: "
              + " ".join(str(sum(1 for c in closes if s <= c.at - started < s + 1)) for s in range(10)))


HAPROXY_CONFIG = """\
global
    stats socket {socket} level admin
    maxconn 4000
defaults
    mode http
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    timeout tunnel 1h
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance leastconn
    server a 127.0.0.1:{a} check
    server b 127.0.0.1:{b} check
"""


def haproxy_command(socket_path, command):
    import socket as stdlib_socket

    with stdlib_socket.socket(stdlib_socket.AF_UNIX) as sock:
        sock.settimeout(5)
        sock.connect(socket_path)
        sock.sendall(command.encode() + b"\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer.decode().strip()


def drain_haproxy(directory):
    """The same drain through HAProxy: no new sessions, then its sessions cut at once."""
    haproxy = shutil.which("haproxy")
    if haproxy is None:
        print("drain (HAProxy): not installed, skipped")
        return
    with Run() as run:
        ports = {}
        for guid in ("a", "b"):
            ports[guid] = free_port()
            proc = subprocess.Popen([PYTHON, "-m", "glb.demo_backend", "--port", str(ports[guid]), "--guid", guid],
                                    env=glb_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            run.procs.append(proc)
            wait_for_port(ports[guid], time.monotonic() + 20, proc)
        port, socket_path = free_port(), os.path.join(directory, "haproxy.sock")
        config = os.path.join(directory, "haproxy.cfg")
        with open(config, "w") as f:
            f.write(HAPROXY_CONFIG.format(socket=socket_path, port=port, a=ports["a"], b=ports["b"]))
        proc = subprocess.Popen([haproxy, "-f", config], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        run.procs.append(proc)
        wait_for_port(port, time.monotonic() + 20, proc)
        fleet = run.fleet(f"ws://127.0.0.1:{port}/app", 400, reconnect_on={1006, 1011, 1012, 1014})
        before = fleet.by_backend()
        started = time.monotonic()
        haproxy_command(socket_path, "set server be/a state drain")
        gevent.sleep(10)  # HAProxy has no spread: a drained server keeps its sessions for as long as they last
        kept = fleet.by_backend().get("a", 0)
        cut = time.monotonic()
        haproxy_command(socket_path, "shutdown sessions server be/a")
        wait(lambda: fleet.by_backend().get("a", 0) == 0 and fleet.connected() == 400, 60, "a emptied")
        closes = [c for c in fleet.closes() if c.at >= cut]
        codes = sorted({c.code for c in closes})
        arrived = [guid for _, guid in fleet.opened_since(started) if guid == "a"]
        print(f"drain (HAProxy 'set server state drain'): before [{spread_text(before)}]; 10 s later a still "
              f"had {kept}; 'shutdown sessions': {len(closes)} closes with {codes}, first "
              f"{(closes[0].at - cut) * 1000:.0f} ms, last {(closes[-1].at - cut) * 1000:.0f} ms after it; "
              f"new sessions that reached a: {len(arrived)}")


def sigstop(directory):
    timeout = 3
    with Run() as run:
        glb = run.glb(directory, backends={"heartbeat_interval": 1, "heartbeat_timeout": timeout})
        procs = {guid: run.backend(glb, guid) for guid in ("x", "y", "z")}
        glb.wait_ready(3)
        fleet = run.fleet(glb.lb + "/app", 90)
        before = fleet.by_backend()
        stopped = time.monotonic()
        procs["x"].send_signal(signal.SIGSTOP)
        wait(lambda: "x" not in glb.ready(), 30, "x evicted")
        evicted = time.monotonic()
        wait(lambda: fleet.by_backend().get("x", 0) == 0 and fleet.connected() == 90, 30, "x's clients moved")
        closes = fleet.closes()
        codes = sorted({(c.code, c.reason) for c in closes})
        print(f"sigstop: before [{spread_text(before)}]; x SIGSTOPped; out of the pool after {evicted - stopped:.2f} s "
              f"(heartbeat_interval 1 s, heartbeat_timeout {timeout} s)")
        print(f"         its {len(closes)} clients got {codes}, last close {closes[-1].at - stopped:.2f} s after "
              f"the SIGSTOP; after [{spread_text(fleet.by_backend())}]")


def restart(directory, enabled, downtime=6.0, cooldown=5):
    with Run() as run:
        settings = {"rebalance": "on" if enabled else "off", "rebalance_cooldown": cooldown}
        glb = run.glb(directory, glb=settings)
        for i in range(1, 4):
            run.backend(glb, f"b{i}")
        glb.wait_ready(3)
        fleet = run.fleet(glb.lb + "/app", 100, reconnect_on={1001, 1011, 1012, 1014})
        before = fleet.by_backend()
        glb.stop()
        run.procs.remove(glb)
        # While glb is down the agents' reconnect back-off grows (up to 5 s) and the clients keep
        # retrying (up to 1 s apart): when glb is back, clients arrive before most backends do.
        gevent.sleep(downtime)
        restarted = time.monotonic()
        glb = run.glb(directory, glb=settings, port=glb.port)
        wait(lambda: fleet.connected() == 100 and len(glb.ready()) == 3, 30, "every client and backend back")
        first = fleet.by_backend()
        back = time.monotonic() - restarted
        settle = cooldown + 8.0  # sessions come of age, then a pass and its look-again
        gevent.sleep(settle)
        after = fleet.by_backend()
        print(f"restart (rebalance {'on' if enabled else 'off'}, cooldown {cooldown} s): before "
              f"[{spread_text(before)}]; glb down {downtime:g} s; when every client and backend was back "
              f"({back:.1f} s) [{spread_text(first)}]; {settle:g} s later [{spread_text(after)}]; "
              f"most on one backend: {max(after.values())} of 100, moved {glb.status()['rebalance_closes']}")


SCENARIOS = ("rebalance", "drain", "sigstop", "restart")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=textwrap.dedent(__doc__.split("::", 1)[1]))
    parser.add_argument("scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)}")
    args = parser.parse_args(argv)
    unknown = set(args.scenarios) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(sorted(unknown))}; choose from {', '.join(SCENARIOS)}")
    directory = temp_dir("glb-pool-bench-")
    for name in args.scenarios or SCENARIOS:
        if name in ("rebalance", "restart"):
            globals()[name](directory, True)
            globals()[name](directory, False)
        elif name == "drain":
            drain(directory)
            drain_haproxy(directory)
        else:
            globals()[name](directory)


if __name__ == "__main__":
    main()
