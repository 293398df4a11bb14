"""Upgrade (SIGUSR2) and systemd: inherited listeners, the hand-over between two real glb
processes, socket activation and readiness notifications."""

import os
import re
import signal
import socket
import sys

import gevent
import pytest

from glb import config, listeners, systemd
from glb.agent import Agent
from glb.listeners import InheritedListeners
from glb.server import Balancer
from tests.backends import ScriptedBackend, started
from tests.pki import Pki
from tests.support import (
    Connector, GlbProcess, Traffic, make_settings, open_session_pid as open_session, recv_close, ws_connect,
)


# -- inherited listeners and notifications (no glb process) ----------------------------------------

def test_listener_names_round_trip_through_the_environment_text():
    named = [("http://127.0.0.1:0", 5), ("https://[::1]:8443", 6)]
    text = listeners.encode(named)
    assert listeners.decode(text) == dict(named)
    assert listeners.listener_name("https", ("::1", 8443)) == "https://[::1]:8443"


@pytest.mark.parametrize("text", ["5", "http://127.0.0.1:80", "http://127.0.0.1:80=x", "127.0.0.1:80=5"])
def test_malformed_listener_text_is_refused(text):
    with pytest.raises(ValueError, match="GLB_LISTENERS"):
        listeners.decode(text)


def test_inherited_sockets_go_to_their_listener_by_name_or_by_bound_address():
    named = socket.create_server(("127.0.0.1", 0))
    unnamed = socket.create_server(("127.0.0.1", 0))
    leftover = socket.create_server(("127.0.0.1", 0))
    inherited = InheritedListeners({"http://127.0.0.1:0": named}, [unnamed, leftover])
    assert inherited.take("https", ("127.0.0.1", 0)) is None  # the scheme is part of the name
    assert inherited.take("http", ("127.0.0.1", 0)) is named
    assert inherited.take("http", ("127.0.0.1", 0)) is None  # taken once
    assert inherited.take("https", unnamed.getsockname()) is unnamed
    inherited.close_rest()
    assert leftover.fileno() == -1 and named.fileno() != -1
    named.close()
    unnamed.close()


def test_notify_sends_one_datagram_to_the_notify_socket(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind(path)
        assert systemd.notify("MAINPID=42", "READY=1", environ={"NOTIFY_SOCKET": path})
        assert receiver.recv(4096) == b"MAINPID=42\nREADY=1"
    assert not systemd.notify("READY=1", environ={})


# -- real glb processes ----------------------------------------------------------------------------

PID_HANDLER = '''import os


def on_handshake(event):
    event.response_headers["X-Glb-Pid"] = str(os.getpid())
'''


def write_config(path, backend, extra_glb=""):
    path.write_text(f"[glb]\nlisten = 127.0.0.1:0\nping_interval = 0\n{extra_glb}"
                    "[handlers]\nmodules = pid_handler\n"
                    f"[backend:static]\nurl = ws://127.0.0.1:{backend.port}\n")


def read_response(sock):
    """One HTTP response with a Content-Length, head and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?im)^content-length:\s*(\d+)", head).group(1))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.fixture
def glb_env(tmp_path):
    (tmp_path / "pid_handler.py").write_text(PID_HANDLER)
    return {"PYTHONPATH": str(tmp_path)}


def _kill_quietly(pid):
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass


@pytest.mark.timeout(90)
def test_sigusr2_hands_over_listeners_and_agents_then_drains_with_1001(tmp_path, glb_env):
    conf = tmp_path / "glb.ini"
    with started(ScriptedBackend(guid="static")) as (backend,):
        write_config(conf, backend, "drain_timeout = 5\ndrain_spread = 1\n")
        old = GlbProcess(conf, env=glb_env)
        agent = Agent(old.url, guid="agent-backend", bindings=[("127.0.0.1", backend.port)]).start()
        new_pid = None
        sessions = []
        try:
            old.wait_for(r"backend agent-backend ready")
            for _ in range(50):
                ws, pid = open_session(old.url)
                assert pid == old.proc.pid
                sessions.append(ws)
            traffic = Traffic(sessions)
            connector = Connector(old.url)
            keep_alive = socket.create_connection(("127.0.0.1", old.port), timeout=10)
            keep_alive.sendall(b"GET /glb/status HTTP/1.1\r\nHost: glb\r\n\r\n")
            assert read_response(keep_alive).startswith(b"HTTP/1.1 200")
            traffic.wait_rounds(1)
            old.signal(signal.SIGUSR2)
            new_pid = int(old.wait_for(r"upgrade: pid (\d+) took over the listeners; 1 control channel").group(1))
            assert new_pid != old.proc.pid
            assert keep_alive.recv(1) == b""  # an idle keep-alive connection: closed, the next one goes to new
            keep_alive.close()
            connector.wait_for_pid(new_pid)
            # the agent registers with the new glb (its first reconnect after a clean close is immediate)
            old.wait_for(r"backend agent-backend ready")
            assert agent.links[0].registrations == 2
            traffic.wait_rounds(1)  # the 50 keep working on the old process
            traffic.stop()
            assert traffic.errors == [] and traffic.received == traffic.sent
            # after drain_timeout, each of the 50 gets 1001 going away
            for ws in sessions:
                ws.settimeout(30)  # the drain takes drain_timeout + drain_spread
                assert recv_close(ws) == (1001, "going away")
                ws.close()
            assert old.proc.wait(timeout=20) == 0
            old.wait_for(r"upgrade: drained \(50 session\(s\) closed with 1001\)")
            after = len(connector.pids)
            connector.wait_for_pid(new_pid)  # the new glb goes on serving alone
            with gevent.Timeout(10):
                while len(connector.pids) < after + 3:
                    gevent.sleep(0.05)
            connector.stop()
            assert connector.failures == []  # never refused, never reset
            last_old = max(i for i, pid in enumerate(connector.pids) if pid == old.proc.pid)
            assert set(connector.pids[last_old + 1:]) == {new_pid}  # from the hand-over on: all new
        finally:
            agent.stop(timeout=2)
            if new_pid:
                _kill_quietly(new_pid)
            old.stop()


@pytest.mark.timeout(60)
def test_a_new_glb_that_cannot_start_leaves_the_old_one_serving(tmp_path, glb_env):
    conf = tmp_path / "glb.ini"
    with started(ScriptedBackend(guid="static")) as (backend,):
        write_config(conf, backend)
        glb = GlbProcess(conf, env=glb_env)
        try:
            ws, pid = open_session(glb.url)
            conf.write_text("[glb]\nlisten = 127.0.0.1:0\nidle_timeout = soon\n")
            glb.signal(signal.SIGUSR2)
            why = glb.wait_for(r"upgrade failed; this glb keeps serving: (.*)").group(1)
            assert "did not start: glb: file" in why and "key 'idle_timeout'" in why
            ws.send("still here")
            assert ws.recv() == "still here"
            ws2, pid2 = open_session(glb.url)
            assert pid2 == pid == glb.proc.pid
            ws.close()
            ws2.close()
        finally:
            assert glb.stop() == 0


ACTIVATE = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.environ['LISTEN_FDS'] = '1'; "
            "os.environ['LISTEN_PID'] = str(os.getpid()); "
            "os.execv(sys.executable, [sys.executable, '-m', 'glb', sys.argv[2]])")


@pytest.mark.timeout(60)
def test_systemd_socket_activation_and_notifications(tmp_path, glb_env):
    """What systemd does, done by hand: the listening socket as fd 3, LISTEN_PID, NOTIFY_SOCKET."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    notify_path = str(tmp_path / "notify")
    notifications = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notifications.bind(notify_path)
    notifications.settimeout(20)
    conf = tmp_path / "glb.ini"
    with started(ScriptedBackend(guid="static")) as (backend,):
        write_config(conf, backend)
        conf.write_text(conf.read_text().replace("listen = 127.0.0.1:0", f"listen = 127.0.0.1:{port}"))
        glb = GlbProcess(conf, env=dict(glb_env, NOTIFY_SOCKET=notify_path), pass_fds=[listener.fileno()],
                         argv=[sys.executable, "-c", ACTIVATE, str(listener.fileno()), str(conf)])
        try:
            assert glb.port == port and "(inherited)" in glb.log
            listener.close()  # only glb holds it now
            assert notifications.recv(4096) == b"READY=1"
            ws, pid = open_session(glb.url)
            assert pid == glb.proc.pid
            ws.close()
            glb.signal(signal.SIGHUP)
            assert notifications.recv(4096).startswith(b"RELOADING=1\nMONOTONIC_USEC=")
            assert notifications.recv(4096) == b"READY=1"
            glb.signal(signal.SIGTERM)
            assert notifications.recv(4096) == b"STOPPING=1"
        finally:
            assert glb.stop() == 0
            notifications.close()


def test_shipped_systemd_units_fit_the_shipped_config():
    root = GlbProcess.ROOT
    service = open(os.path.join(root, "conf", "glb.service"), encoding="utf-8").read()
    unit_socket = open(os.path.join(root, "conf", "glb.socket"), encoding="utf-8").read()
    assert re.search(r"^Type=notify$", service, re.M) and re.search(r"^NotifyAccess=all$", service, re.M)
    assert re.search(r"^ExecReload=/bin/kill -HUP \$MAINPID$", service, re.M)
    streams = re.findall(r"^ListenStream=(\S+)$", unit_socket, re.M)
    listen = config.load(os.path.join(root, "conf", "lb.ini")).glb.listen
    assert streams and all(config.HostPort().parse(stream, root) in listen for stream in streams)


@pytest.mark.timeout(30)
def test_inherited_tls_listener_serves_tls_with_the_configured_certificate(tmp_path):
    pki = Pki(tmp_path, "glb")
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    settings = make_settings(tls={"listen": "127.0.0.1:0", "certfile": pki.certfile, "keyfile": pki.keyfile})
    balancer = Balancer(settings)
    balancer.start(InheritedListeners({"https://127.0.0.1:0": sock}))
    try:
        assert balancer.tls_addresses == [("127.0.0.1", port)]
        ws = ws_connect(f"wss://127.0.0.1:{port}/glb/echo", sslopt={"context": pki.client_context()})
        ws.send("over tls")
        assert ws.recv() == "over tls"
        ws.close()
    finally:
        balancer.stop(timeout=1)
