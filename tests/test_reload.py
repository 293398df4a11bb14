"""Reload (SIGHUP): the diff and the registry moves without sockets, then a real glb process
reloaded under traffic."""

import contextlib
import importlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys

import pytest
import requests
import websocket

from glb import config, reload
from glb.errors import HandlerLoadError
from glb.handlers import Handlers, swap_handlers
from glb.events import EventBus, Event
from glb.registry import DRAINING, READY, Registry
from glb.server import Balancer
from tests.backends import ScriptedBackend, started
from tests.support import GlbProcess, Traffic, make_settings, ws_connect
from tests.pki import Pki


# -- the diff (no sockets) -------------------------------------------------------------------------

def test_diff_of_equal_settings_is_only_the_handler_reimport():
    changes = reload.diff(make_settings(), make_settings())
    assert changes.settings == [] and not changes.backends_added and not changes.listeners_added
    assert changes.describe() == "handlers none imported afresh"


def test_diff_names_changed_settings_backends_and_listeners():
    old = make_settings(glb={"listen": "127.0.0.1:0", "idle_timeout": 0},
                        **{"backend:a": {"url": "ws://127.0.0.1:9001"}, "backend:b": {"url": "ws://127.0.0.1:9002"}})
    new = make_settings(glb={"listen": "127.0.0.1:0, 127.0.0.1:9100", "idle_timeout": 30, "balancing": "p2c"},
                        http={"read_timeout": 5},
                        **{"backend:b": {"url": "ws://127.0.0.1:9002", "weight": 3},
                           "backend:c": {"url": "ws://127.0.0.1:9003"}})
    changes = reload.diff(old, new)
    assert changes.settings == ["glb.balancing", "glb.idle_timeout", "glb.listen", "http.read_timeout"]
    assert (changes.backends_added, changes.backends_removed, changes.backends_changed) == (["c"], ["a"], ["b"])
    assert changes.listeners_added == ["http://127.0.0.1:9100"] and changes.listeners_removed == []
    line = changes.describe()
    assert "\n" not in line
    assert "backends +c" in line and "backends -a" in line and "backends ~b" in line
    assert "listeners +http://127.0.0.1:9100" in line


def test_diff_says_what_needs_a_restart():
    changes = reload.diff(make_settings(), make_settings(demo={"backends": 1}))
    assert changes.needs_restart() == ["demo.backends"]
    assert "needs a restart to apply: demo.backends" in changes.describe()


# -- static backends in the registry (no sockets) --------------------------------------------------

def test_removed_static_backend_drains_until_its_last_session_ends():
    registry = Registry()
    backend = registry.add_static("a", "ws://127.0.0.1:9001")
    registry.session_started(backend)
    registry.retire("a")
    assert backend.state == DRAINING and backend not in registry.candidates()
    assert registry.get("a") is backend  # still visible while its session lives
    registry.session_ended(backend)
    assert registry.get("a") is None


def test_static_backend_back_while_draining_takes_clients_again():
    registry = Registry()
    backend = registry.add_static("a", "ws://127.0.0.1:9001")
    registry.session_started(backend)
    registry.retire("a")
    assert registry.update_static("a", "ws://127.0.0.1:9001", weight=4) is backend
    assert backend.state == READY and backend.weight == 4 and backend in registry.candidates()
    registry.session_ended(backend)
    assert registry.get("a") is backend


def test_static_backend_with_a_new_url_is_a_new_backend_and_the_old_keeps_its_sessions():
    registry = Registry()
    old = registry.add_static("a", "ws://127.0.0.1:9001")
    registry.session_started(old)
    new = registry.update_static("a", "ws://127.0.0.1:9002")
    assert new is not old and registry.get("a") is new and registry.candidates() == (new,)
    registry.session_ended(old)  # the old one's session ending touches the new one not at all
    assert registry.get("a") is new and new.relayed == 0


# -- handler modules imported afresh (no sockets) --------------------------------------------------

@pytest.fixture
def module_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("reload_probe",):
        sys.modules.pop(name, None)


def test_fresh_import_runs_the_source_on_disk_even_within_the_same_second(module_dir):
    path = module_dir / "reload_probe.py"
    path.write_text("def on_connect(event):\n    event.seen = 'one'\n")
    importlib.import_module("reload_probe")
    stat = os.stat(path)
    path.write_text("def on_connect(event):\n    event.seen = 'two'\n")  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same mtime
    bus = EventBus()
    receivers = Handlers(["reload_probe"]).connect(bus)
    receivers = swap_handlers(bus, receivers, Handlers(["reload_probe"], fresh=True))
    event = bus.fire(bus.connect, connection=None)
    assert event.seen == "two"
    assert len(bus.connect.receivers) == 1 and len(receivers) == 1
    assert sys.modules["reload_probe"].on_connect.__code__.co_consts.count("two") == 1


def test_a_module_that_fails_to_import_afresh_leaves_the_running_one(module_dir):
    path = module_dir / "reload_probe.py"
    path.write_text("def on_connect(event):\n    event.seen = 'one'\n")
    running = importlib.import_module("reload_probe")
    path.write_text("def on_connect(event:\n")
    with pytest.raises(HandlerLoadError, match="reload_probe"):
        Handlers(["reload_probe"], fresh=True)
    assert sys.modules["reload_probe"] is running
    event = Event("connect")
    running.on_connect(event)
    assert event.seen == "one"


# -- a real glb process reloaded under traffic -----------------------------------------------------

HANDLER = '''VERSION = {version!r}


def on_handshake(event):
    event.response_headers["X-Handler-Version"] = VERSION
'''


def write_config(path, backends, extra_glb=""):
    text = (f"[glb]\nlisten = 127.0.0.1:0\nbalancing = round_robin\nping_interval = 0\n{extra_glb}"
            "[handlers]\nmodules = reload_handler\n")
    for name, backend in backends.items():
        text += f"[backend:{name}]\nurl = ws://127.0.0.1:{backend.port}\n"
    path.write_text(text)


def open_session(url, path="/app"):
    ws = ws_connect(url + path)
    headers = ws.getheaders()
    ws.send("whoami")
    return ws, headers.get("x-handler-version"), ws.recv()


@pytest.mark.timeout(90)
def test_sighup_applies_new_handlers_and_backends_without_touching_open_sessions(tmp_path):
    backends = {name: ScriptedBackend(guid=name) for name in ("a", "b", "c")}
    handler = tmp_path / "reload_handler.py"
    conf = tmp_path / "glb.ini"
    handler.write_text(HANDLER.format(version="v0"))
    with started(*backends.values()):
        write_config(conf, {"a": backends["a"]})
        glb = GlbProcess(conf, env={"PYTHONPATH": str(tmp_path)})
        sessions = []
        try:
            for _ in range(50):
                ws, version, backend = open_session(glb.url)
                assert (version, backend) == ("v0", "a")
                sessions.append(ws)
            traffic = Traffic(sessions)
            traffic.wait_rounds(1)
            # each reload: a changed handler module and a static backend added or removed
            steps = [("v1", {"a", "b"}, "backends +b"), ("v2", {"b"}, "backends -a"),
                     ("v3", {"b", "c"}, "backends +c")]
            for version, names, said in steps:
                handler.write_text(HANDLER.format(version=version))
                write_config(conf, {name: backends[name] for name in sorted(names)})
                glb.signal(signal.SIGHUP)
                line = glb.wait_for(r"reloaded .*").group(0)
                assert said in line and "handlers reload_handler imported afresh" in line
                seen = set()
                for _ in range(2 * len(names)):
                    ws, got_version, backend = open_session(glb.url)
                    assert got_version == version
                    seen.add(backend)
                    ws.close()
                assert seen == names  # round robin reaches exactly the configured backends
                traffic.wait_rounds(1)  # the 50 from the start (all on a) still echo every message
            # a broken config: refused with the start-up error line, the running one stays
            conf.write_text("[glb]\nlisten = 127.0.0.1:0\nbalancng = random\n")
            glb.signal(signal.SIGHUP)
            refused = glb.wait_for(r"reload refused; still running the previous config: (glb: .*)").group(1)
            assert f"file {conf}" in refused and "section [glb]" in refused and "'balancng'" in refused
            ws, got_version, backend = open_session(glb.url)
            assert got_version == "v3" and backend in {"b", "c"}
            ws.close()
            traffic.wait_rounds(2)
            traffic.stop()
            assert traffic.errors == [] and traffic.sent >= 50 * 6
            assert traffic.received == traffic.sent  # no session closed, no message lost
        finally:
            for ws in sessions:
                ws.close()
            assert glb.stop() == 0


# -- listeners on reload (a real Balancer in this process) -----------------------------------------

@contextlib.contextmanager
def glb_from_file(conf, text="[glb]\nlisten = 127.0.0.1:0\n[handlers]\nmodules =\n"):
    """A started Balancer whose config is the file ``conf`` (written with ``text``), so it can reload."""
    conf.write_text(text)
    balancer = Balancer(config.load(conf))
    balancer.start()
    try:
        yield balancer
    finally:
        balancer.stop(timeout=1)


def echo_once(url, text="hi", **options):
    ws = ws_connect(url + "/glb/echo", **options)
    ws.send(text)
    assert ws.recv() == text
    return ws


@pytest.mark.timeout(30)
def test_reload_binds_added_listeners_and_closes_removed_ones_whose_sessions_continue(tmp_path):
    conf = tmp_path / "glb.ini"
    with glb_from_file(conf) as balancer:
        busy = socket.create_server(("127.0.0.3", 0))
        try:
            (first_port,) = [port for _, port in balancer.addresses]
            on_first = echo_once(f"ws://127.0.0.1:{first_port}")
            conf.write_text("[glb]\nlisten = 127.0.0.1:0, 127.0.0.2:0\n[handlers]\nmodules =\n")
            changes = balancer.reload()
            assert changes.listeners_added == ["http://127.0.0.2:0"]
            assert dict(balancer.addresses)["127.0.0.1"] == first_port  # a port-0 listener keeps its port
            second_port = dict(balancer.addresses)["127.0.0.2"]
            echo_once(f"ws://127.0.0.2:{second_port}").close()
            # a port in use refuses the whole reload: nothing changes
            conf.write_text(f"[glb]\nlisten = 127.0.0.2:0, 127.0.0.3:{busy.getsockname()[1]}\n"
                            "[handlers]\nmodules =\n")
            with pytest.raises(OSError, match="cannot listen on http://127.0.0.3"):
                balancer.reload()
            assert sorted(balancer.addresses) == [("127.0.0.1", first_port), ("127.0.0.2", second_port)]
            conf.write_text("[glb]\nlisten = 127.0.0.2:0\n[handlers]\nmodules =\n")
            assert balancer.reload().listeners_removed == ["http://127.0.0.1:0"]
            assert balancer.addresses == [("127.0.0.2", second_port)]
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", first_port), timeout=5)
            on_first.send("still here")  # accepted by the removed listener, relayed as before
            assert on_first.recv() == "still here"
            on_first.close()
        finally:
            busy.close()


@pytest.mark.timeout(30)
def test_reload_gives_new_tls_handshakes_the_renewed_certificate_and_leaves_open_ones(tmp_path):
    first, second = Pki(tmp_path, "first"), Pki(tmp_path, "second")
    live_cert, live_key = tmp_path / "live-cert.pem", tmp_path / "live-key.pem"
    shutil.copy(first.certfile, live_cert)
    shutil.copy(first.keyfile, live_key)
    conf = tmp_path / "glb.ini"
    text = ("[glb]\nlisten = 127.0.0.1:0\n[handlers]\nmodules =\n"
            "[tls]\nlisten = 127.0.0.1:0\ncertfile = live-cert.pem\nkeyfile = live-key.pem\n")
    with glb_from_file(conf, text) as balancer:
        url = f"wss://127.0.0.1:{balancer.tls_addresses[0][1]}"
        opened_before = echo_once(url, sslopt={"context": first.client_context()})
        shutil.copy(second.certfile, live_cert)  # renewed on disk; the config is the same
        shutil.copy(second.keyfile, live_key)
        assert balancer.reload().settings == []
        echo_once(url, sslopt={"context": second.client_context()}).close()
        with pytest.raises(ssl.SSLError):
            ws_connect(url + "/glb/echo", sslopt={"context": first.client_context()})
        opened_before.send("still here")
        assert opened_before.recv() == "still here"
        opened_before.close()


@pytest.mark.timeout(30)
def test_reload_moves_glb_endpoints_to_a_new_prefix_swaps_the_policy_and_calls_reload_hooks(tmp_path):
    conf = tmp_path / "glb.ini"
    with glb_from_file(conf) as balancer:
        calls = []
        balancer.reload_hooks.append(lambda old, new: calls.append((old.glb.prefix, new.glb.prefix)))
        url = f"ws://127.0.0.1:{balancer.addresses[0][1]}"
        conf.write_text("[glb]\nlisten = 127.0.0.1:0\nprefix = /lb/\nbalancing = round_robin\n"
                        "[handlers]\nmodules =\n")
        old_policy = balancer.policy
        changes = balancer.reload()
        assert changes.settings == ["glb.balancing", "glb.prefix"]
        assert balancer.policy is not old_policy and calls == [("/glb/", "/lb/")]
        ws = ws_connect(url + "/lb/echo")
        ws.send("moved")
        assert ws.recv() == "moved"
        ws.close()
        with pytest.raises(websocket.WebSocketBadStatusException):
            ws_connect(url + "/lb/nothing-here")  # under the new prefix: glb's, so 404, not relayed


@pytest.mark.timeout(60)
def test_admin_api_and_ctl_reload_like_sighup(tmp_path):
    conf = tmp_path / "glb.ini"
    with glb_from_file(conf) as balancer:
        url = f"http://127.0.0.1:{balancer.addresses[0][1]}"
        conf.write_text("[glb]\nlisten = 127.0.0.1:0\nidle_timeout = 30\n[handlers]\nmodules =\n")
        answer = requests.post(url + "/glb/admin/reload", timeout=10)
        assert answer.status_code == 200 and answer.json()["settings"] == ["glb.idle_timeout"]
        assert balancer.settings.glb.idle_timeout == 30
        conf.write_text("[glb]\nlisten = 127.0.0.1:0\nidle_timeout = soon\n")
        refused = requests.post(url + "/glb/admin/reload", timeout=10)
        assert refused.status_code == 409 and "key 'idle_timeout'" in refused.json()["error"]
        assert balancer.settings.glb.idle_timeout == 30
        metrics = requests.get(url + "/glb/metrics", timeout=10).text
        assert 'glb_config_reloads_total{result="applied"} 1.0' in metrics
        assert 'glb_config_reloads_total{result="refused"} 1.0' in metrics
        assert "glb_config_last_reload_successful 0.0" in metrics
        conf.write_text("[glb]\nlisten = 127.0.0.1:0\nidle_timeout = 0\n[handlers]\nmodules =\n")
        ctl = subprocess.run([sys.executable, "-m", "glb.ctl", url, "reload"], capture_output=True, text=True,
                             timeout=30, cwd=GlbProcess.ROOT)
        assert ctl.returncode == 0, ctl.stderr
        assert ctl.stdout.startswith(f"reloaded {conf}: settings glb.idle_timeout")
        assert balancer.settings.glb.idle_timeout == 0


@pytest.mark.timeout(30)
def test_reload_applies_new_limits_to_new_handshakes(tmp_path):
    conf = tmp_path / "glb.ini"
    with glb_from_file(conf) as balancer:
        url = f"ws://127.0.0.1:{balancer.addresses[0][1]}/glb/echo"
        opened = ws_connect(url, origin="https://other.example")
        conf.write_text("[glb]\nlisten = 127.0.0.1:0\nallowed_origins = https://app.example\n"
                        "max_connections_per_ip = 3\n[handlers]\nmodules =\n")
        balancer.reload()
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(url, origin="https://other.example")
        assert refused.value.status_code == 403
        ws_connect(url, origin="https://app.example").close()
        assert balancer.admission.limits.max_per_ip == 3
        opened.send("admitted before the reload")  # limits apply to new handshakes only
        assert opened.recv() == "admitted before the reload"
        opened.close()
