"""Reload and upgrade under load: what open sessions, new connections and agents see.

One run, all on 127.0.0.1, everything stopped at the end:

reload     glb (``python -m glb``) with a handler module that stamps each handshake
           with its version, and static echo backends. ``--sessions`` sessions
           exchange numbered messages (each echo checked) while the config is reloaded
           ``--reloads`` times, each time with a new handler version and a static
           backend added or removed. After each reload, new sessions must carry the new
           version and reach exactly the configured backends. Then a broken config is
           sent: glb must refuse it and keep serving. With nginx on PATH, the same
           sessions through nginx across the same number of ``nginx -s reload``-style
           reloads (SIGHUP to the master), for comparison: its old workers stay alive
           for as long as they hold a WebSocket.
upgrade    glb with 5 agent-registered backends and a static one, ``--sessions``
           sessions exchanging messages, and a client opening ``--rate`` connections
           per second (each checks one echo). SIGUSR2: the new glb must take every new
           connection (the handler module puts the accepting process's pid in an
           ``X-Glb-Pid`` response header), no connection may be refused or reset, the
           sessions keep working on the old process until its drain closes them with
           1001, and the agents must register with the new process (time from the old
           channel's close to ``ready`` on the new one).
failed     SIGUSR2 with a broken config on disk: the old glb keeps serving and logs why.

    python bench/reload_bench.py                    # ~90 s
    python bench/reload_bench.py --sessions 50 --reloads 3 --no-nginx   # smoke run
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402

import _common  # noqa: E402

sys.path.insert(0, _common.REPO)
from glb.agent import Agent  # noqa: E402
from tests.backends import ScriptedBackend  # noqa: E402
from tests.support import (  # noqa: E402
    Connector, GlbProcess, Traffic, open_session_pid, recv_close, ws_connect,
)

HANDLER = '''import os

VERSION = {version!r}


def on_handshake(event):
    event.response_headers["X-Handler-Version"] = VERSION
    event.response_headers["X-Glb-Pid"] = str(os.getpid())
'''


def write_handler(directory, version):
    with open(os.path.join(directory, "bench_reload_handler.py"), "w") as f:
        f.write(HANDLER.format(version=version))


def write_config(path, backends, extra=""):
    text = (f"[glb]\nlisten = 127.0.0.1:0\nbalancing = round_robin\nping_interval = 0\nlog_level = info\n{extra}"
            "[handlers]\nmodules = bench_reload_handler\n")
    for name, backend in backends.items():
        text += f"[backend:{name}]\nurl = ws://127.0.0.1:{backend.port}\n"
    with open(path, "w") as f:
        f.write(text)


def open_sessions(url, count):
    sessions = []
    for _ in range(count):
        sessions.append(ws_connect(url + "/app", timeout=30))
    return sessions


def traffic_over(sessions, groups=10):
    return [Traffic(sessions[i::groups]) for i in range(groups)]


def wait_rounds(traffics, rounds=1):
    for traffic in traffics:
        traffic.wait_rounds(rounds, timeout=60)


def stop_traffic(traffics):
    for traffic in traffics:
        traffic.stopping = True  # all at once: each finishes its round
    for traffic in traffics:
        traffic.stop()
    return (sum(t.sent for t in traffics), sum(t.received for t in traffics),
            [error for t in traffics for error in t.errors])


def backend_steps(reloads):
    """Backend sets after each reload: add the next one, then remove the oldest, and so on."""
    live, names, steps = ["b0"], [f"b{i}" for i in range(1, reloads + 2)], []
    for step in range(reloads):
        if step % 2 == 0:
            live = live + [names.pop(0)]
            steps.append((list(live), f"+{live[-1]}"))
        else:
            removed = live[0]
            live = live[1:]
            steps.append((list(live), f"-{removed}"))
    return steps


# --------------------------------------------------------------------------- reload


def reload_part(args, directory):
    steps = backend_steps(args.reloads)
    names = sorted({name for live, _ in steps for name in live} | {"b0"})
    backends = {name: ScriptedBackend(guid=name) for name in names}
    for backend in backends.values():
        backend.start()
    conf = os.path.join(directory, "reload.ini")
    write_handler(directory, "v0")
    write_config(conf, {"b0": backends["b0"]})
    glb = GlbProcess(conf, env={"PYTHONPATH": directory})
    print(f"reload: {args.sessions} sessions, {args.reloads} reloads (glb pid {glb.proc.pid})")
    apply_ms, seen_ok, closed_before = [], 0, 0
    try:
        sessions = open_sessions(glb.url, args.sessions)
        traffics = traffic_over(sessions)
        wait_rounds(traffics)
        for number, (live, change) in enumerate(steps, 1):
            version = f"v{number}"
            write_handler(directory, version)
            write_config(conf, {name: backends[name] for name in live})
            started = time.monotonic()
            glb.signal(signal.SIGHUP)
            line = glb.wait_for(r"reloaded .*").group(0)
            apply_ms.append((time.monotonic() - started) * 1000)
            reached, versions = set(), set()
            for _ in range(2 * len(live)):
                ws = ws_connect(glb.url + "/app")
                versions.add(ws.getheaders().get("x-handler-version"))
                ws.send("whoami")
                reached.add(ws.recv())
                ws.close()
            ok = versions == {version} and reached == set(live) and f"backends {change[0]}" in line
            seen_ok += ok
            print(f"  reload {number:2d}: backends {change:>4} -> {','.join(live):<8} new sessions: "
                  f"handler {','.join(sorted(versions))}, backends {','.join(sorted(reached))}  "
                  f"{'ok' if ok else 'WRONG'}")
            wait_rounds(traffics)
        with open(conf, "w") as f:
            f.write("[glb]\nlisten = 127.0.0.1:0\nbalancng = random\n")
        glb.signal(signal.SIGHUP)
        refused = glb.wait_for(r"reload refused; still running the previous config: (.*)").group(1)
        ws = ws_connect(glb.url + "/app")
        still = ws.getheaders().get("x-handler-version")
        ws.close()
        wait_rounds(traffics, 2)
        sent, received, errors = stop_traffic(traffics)
        closed_before = sum(1 for ws in sessions if not ws.connected)
        for ws in sessions:
            ws.close()
    finally:
        glb.stop()
        for backend in backends.values():
            backend.stop(timeout=1)
    print(f"  sessions closed by the reloads:   {closed_before + len(errors)} of {args.sessions}")
    print(f"  messages sent / echoed / lost:    {sent} / {received} / {sent - received}")
    print(f"  new sessions saw the new handler and backends after {seen_ok} of {args.reloads} reloads")
    print(f"  SIGHUP to 'reloaded' log line:    median {statistics.median(apply_ms):.0f} ms, "
          f"max {max(apply_ms):.0f} ms")
    print(f"  broken config: refused ({refused}); new sessions still get handler {still}")
    return {"sessions_closed": closed_before + len(errors), "lost": sent - received}


def nginx_reload_part(args, directory):
    """The same sessions through nginx across the same number of reloads (SIGHUP to the master)."""
    nginx = shutil.which("nginx")
    if nginx is None or args.no_nginx:
        print("nginx: skipped")
        return
    backend_a, backend_b = ScriptedBackend(guid="n0"), ScriptedBackend(guid="n1")
    backend_a.start()
    backend_b.start()
    port = _common.free_port()
    conf = os.path.join(directory, "nginx.conf")

    def write(servers):
        upstream = "".join(f"server 127.0.0.1:{b.port};" for b in servers)
        with open(conf, "w") as f:
            f.write(f"""worker_processes 1; daemon off; pid {directory}/nginx.pid;
error_log {directory}/nginx.err warn; events {{ worker_connections 4096; }}
http {{ access_log off; upstream be {{ {upstream} }}
  server {{ listen 127.0.0.1:{port}; location / {{ proxy_pass http://be; proxy_http_version 1.1;
    proxy_set_header Upgrade $http_upgrade; proxy_set_header Connection "upgrade"; proxy_read_timeout 1h; }} }} }}
""")

    write([backend_a])
    proc = subprocess.Popen([nginx, "-c", conf, "-p", directory])
    try:
        _common.wait_for_port(port, time.monotonic() + 10, proc)
        sessions = open_sessions(f"ws://127.0.0.1:{port}", args.sessions)
        traffics = traffic_over(sessions)
        wait_rounds(traffics)
        for number in range(args.reloads):
            write([backend_a, backend_b] if number % 2 == 0 else [backend_b])
            proc.send_signal(signal.SIGHUP)
            gevent.sleep(0.5)  # nginx says nothing on stdout when a reload is done
            wait_rounds(traffics)
        workers = len(_common.process_tree(proc.pid)) - 1
        sent, received, errors = stop_traffic(traffics)
        for ws in sessions:
            ws.close()
    finally:
        _common.stop(proc)
        backend_a.stop(timeout=1)
        backend_b.stop(timeout=1)
    print(f"nginx, same load, {args.reloads} reloads: sessions closed {len(errors)}, messages lost "
          f"{sent - received}, worker processes alive after the reloads: {workers} "
          "(each old worker stays while it holds a WebSocket)")


# --------------------------------------------------------------------------- upgrade


class AgentWatch:
    """Times each agent's gap between losing its registration and having it again."""

    def __init__(self, agents):
        self.agents = agents
        self.down, self.gaps = {}, {}
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        while len(self.gaps) < len(self.agents):
            now = time.monotonic()
            for agent in self.agents:
                link = agent.links[0]
                if agent.guid not in self.down and not link.registered and link.registrations == 1:
                    self.down[agent.guid] = now
                elif agent.guid in self.down and link.registrations >= 2 and agent.guid not in self.gaps:
                    self.gaps[agent.guid] = now - self.down[agent.guid]
            gevent.sleep(0.002)


def upgrade_part(args, directory):
    echo = ScriptedBackend(guid="static")
    echo.start()
    conf = os.path.join(directory, "upgrade.ini")
    write_handler(directory, "v-upgrade")
    write_config(conf, {"static": echo}, f"drain_timeout = {args.drain_timeout}\ndrain_spread = {args.drain_spread}\n")
    old = GlbProcess(conf, env={"PYTHONPATH": directory})
    agents = [Agent(old.url, guid=f"agent-{i}", bindings=[("127.0.0.1", echo.port)]).start() for i in range(5)]
    new_pid = None
    print(f"upgrade: {args.sessions} sessions, {args.rate} connections/s, 5 agents (old glb pid {old.proc.pid})")
    try:
        for i in range(5):
            old.wait_for(r"backend agent-\d ready")
        sessions = open_sessions(old.url, args.sessions)
        traffics = traffic_over(sessions)
        connector = Connector(old.url, interval=1.0 / args.rate)
        wait_rounds(traffics)
        gevent.sleep(2)
        watch = AgentWatch(agents)
        before = len(connector.pids)
        signalled = time.monotonic()
        old.signal(signal.SIGUSR2)
        new_pid = int(old.wait_for(r"upgrade: pid (\d+) took over the listeners").group(1))
        handed_over = time.monotonic()
        took_over = handed_over - signalled
        watch.greenlet.join(timeout=10)
        rounds = min(t.rounds for t in traffics)
        # the sessions keep exchanging messages on the old glb until shortly before its drain closes them
        gevent.sleep(max(0.0, handed_over + args.drain_timeout - 1.5 - time.monotonic()))
        sent, received, errors = stop_traffic(traffics)
        rounds_after = min(t.rounds for t in traffics) - rounds
        codes, close_times = {}, []

        def await_close(ws):
            code, _ = recv_close(ws)
            close_times.append(time.monotonic())
            codes[code] = codes.get(code, 0) + 1
            ws.close()

        closers = [gevent.spawn(await_close, ws) for ws in sessions]
        gevent.joinall(closers, timeout=args.drain_timeout + 30)
        unclosed = sum(1 for closer in closers if not closer.successful())
        old_exit = old.proc.wait(timeout=30)
        gevent.sleep(2)  # the new glb serving alone
        connector.stop()
    finally:
        for agent in agents:
            agent.stop(timeout=2)
        if new_pid:
            try:
                os.kill(new_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        old.stop()
        echo.stop(timeout=1)
    after = connector.pids[before:]
    last_old = max((i for i, pid in enumerate(after) if pid == old.proc.pid), default=-1)
    gaps = sorted(watch.gaps.values())
    print(f"  SIGUSR2 to new glb (pid {new_pid}) ready and old one not accepting: {took_over:.2f} s")
    print(f"  connections opened: {len(connector.pids)}, refused or reset: {len(connector.failures)}"
          f"{' ' + connector.failures[0] if connector.failures else ''}")
    print(f"  after SIGUSR2: {after.count(old.proc.pid)} on the old pid (before it stopped accepting), "
          f"then {len(after) - last_old - 1} on the new pid and none on the old")
    print(f"  sessions: messages sent / echoed / lost: {sent} / {received} / {sent - received}, errors "
          f"{len(errors)}{' (' + errors[0] + ')' if errors else ''}; each session echoed {rounds_after} "
          "or more messages on the old glb after the hand-over")
    print(f"  drain: close codes received {codes} ({unclosed} without a close frame), {min(close_times) - handed_over:.1f} s to "
          f"{max(close_times) - handed_over:.1f} s after the hand-over (drain_timeout {args.drain_timeout} s, "
          f"drain_spread {args.drain_spread} s); old glb exit status {old_exit}")
    print(f"  agents registered with the new glb: {len(gaps)} of 5, gap from close to ready: "
          f"median {statistics.median(gaps) * 1000:.0f} ms, max {max(gaps) * 1000:.0f} ms" if gaps else
          "  agents: none re-registered")


def failed_part(args, directory):
    echo = ScriptedBackend(guid="static")
    echo.start()
    conf = os.path.join(directory, "failed.ini")
    write_handler(directory, "v-failed")
    write_config(conf, {"static": echo})
    glb = GlbProcess(conf, env={"PYTHONPATH": directory})
    try:
        ws, pid = open_session_pid(glb.url)
        with open(conf, "w") as f:
            f.write("[glb]\nlisten = 127.0.0.1:0\nidle_timeout = soon\n")
        glb.signal(signal.SIGUSR2)
        why = glb.wait_for(r"upgrade failed; this glb keeps serving: (.*)").group(1)
        ws.send("still here")
        echoed = ws.recv() == "still here"
        ws2, pid2 = open_session_pid(glb.url)
        ws.close()
        ws2.close()
    finally:
        glb.stop()
        echo.stop(timeout=1)
    print(f"failed upgrade: old glb logged: {why}")
    print(f"  open session still echoes: {echoed}; new session accepted by the same pid: {pid2 == pid}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--rate", type=float, default=20.0, help="new connections per second during the upgrade")
    parser.add_argument("--drain-timeout", type=float, default=8.0)
    parser.add_argument("--drain-spread", type=float, default=3.0)
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--only", choices=("reload", "upgrade", "failed"))
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    directory = _common.temp_dir("glb-reload-bench-")
    try:
        if args.only in (None, "reload"):
            reload_part(args, directory)
            nginx_reload_part(args, directory)
        if args.only in (None, "upgrade"):
            upgrade_part(args, directory)
        if args.only in (None, "failed"):
            failed_part(args, directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
