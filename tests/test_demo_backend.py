"""The demo backend: echo and whoami directly, its HTTP pages, and registering with a real glb."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import gevent
import pytest
import requests

from glb import control_records as records
from glb.demo_backend import DemoBackend, DemoFleet, lb_url_for
from glb.errors import CloseCode
from tests.support import base_url, free_port, Recorder, recv_close, running_glb, ws_connect
from tests.control_peer import get_binding

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo():
    backend = DemoBackend(guid="demo-under-test")
    backend.start()
    yield backend
    backend.stop()


def ws_url(backend, path="/anything"):
    return f"ws://127.0.0.1:{backend.port}{path}"


def http_url(backend, path):
    return f"http://127.0.0.1:{backend.port}{path}"


def test_echoes_text_and_binary_and_answers_whoami(demo):
    ws = ws_connect(ws_url(demo))
    ws.send("héllo")
    assert ws.recv() == "héllo"
    ws.send_binary(b"\x00\xff\x01")
    assert ws.recv() == b"\x00\xff\x01"
    ws.send("whoami")
    assert ws.recv() == "demo-under-test"
    ws.send_binary(b"whoami")  # only the text asks
    assert ws.recv() == b"whoami"
    ws.close()


def test_echoes_the_close_code_and_reason(demo):
    ws = ws_connect(ws_url(demo, "/"))
    ws.send_close(4001, b"bye")
    assert recv_close(ws) == (4001, "bye")
    ws.shutdown()


def test_bad_upgrade_gets_an_http_error(demo):
    answer = requests.get(http_url(demo, "/x"), headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                                        "Sec-WebSocket-Version": "8"}, timeout=5)
    assert answer.status_code == 426


def test_serves_the_page_and_whoami(demo):
    page = requests.get(http_url(demo, "/"), timeout=5)
    assert page.status_code == 200 and page.headers["Content-Type"].startswith("text/html")
    assert "location.host" in page.text and "whoami" in page.text
    who = requests.get(http_url(demo, "/whoami"), timeout=5)
    assert who.status_code == 200 and who.headers["Content-Type"].startswith("text/plain")
    assert who.text == "demo-under-test"
    assert requests.get(http_url(demo, "/nope"), timeout=5).status_code == 404
    assert requests.post(http_url(demo, "/whoami"), timeout=5).status_code == 405


def test_stop_closes_clients_with_1001():
    backend = DemoBackend()
    backend.start()
    ws = ws_connect(ws_url(backend))
    ws.send("x")
    assert ws.recv() == "x"
    closing = gevent.spawn(recv_close, ws)
    backend.stop()
    assert closing.get(timeout=5) == (CloseCode.GOING_AWAY, "going away")


def test_registers_and_reports_its_clients():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "raw_message", "server_disconnect")
        backend = DemoBackend(lb_urls=[base_url(glb)], guid="d1")
        port = backend.start()
        try:
            ready = seen.wait("server_ready")[0]
            assert ready.backend.guid == "d1" and ready.backend.bindings[0].port == port
            assert get_binding(glb).json()["port"] == port

            relayed = ws_connect(base_url(glb) + "/chat")  # through glb: glb counts it, not the report
            relayed.send("whoami")
            assert relayed.recv() == "d1"
            client = ws_connect(ws_url(backend))
            seen.wait("raw_message", match=lambda e: '"active":true' in e.text)
            entry = glb.registry.get("d1")
            assert (entry.relayed, len(entry.reported_clients), entry.clients) == (1, 1, 2)
            client.close()
            seen.wait("raw_message", match=lambda e: '"active":false' in e.text)
            assert (entry.relayed, len(entry.reported_clients), entry.clients) == (1, 0, 1)
            relayed.close()
        finally:
            backend.stop()
        assert seen.wait("server_disconnect")[0].code == CloseCode.NORMAL


def test_fleet_registers_every_backend_and_each_answers_whoami():
    with running_glb(glb={"balancing": "round_robin"}) as glb:
        seen = Recorder(glb, "server_connect", "server_ready", "server_disconnect")
        fleet = DemoFleet(2, glb.addresses[0])
        ports = fleet.start()
        try:
            ready = seen.wait("server_ready", count=2)
            assert [seen.names(e.connection) for e in ready] == [["server_connect", "server_ready"]] * 2
            guids = {e.backend.guid for e in ready}
            assert guids == {b.guid for b in fleet.backends}
            offered = {get_binding(glb).json()["port"] for _ in range(4)}
            assert offered == set(ports)
            for port in ports:
                ws = ws_connect(f"ws://127.0.0.1:{port}/")
                ws.send("whoami")
                assert ws.recv() in guids
                ws.close()
        finally:
            fleet.stop()
        assert len(seen.wait("server_disconnect", count=2)) == 2
        assert get_binding(glb).status_code == 503


@pytest.mark.parametrize("address,url", [
    (("127.0.0.1", 8080), "ws://127.0.0.1:8080/sgc@load_balancer_client"),
    (("0.0.0.0", 8080), "ws://127.0.0.1:8080/sgc@load_balancer_client"),
    (("::", 8080), "ws://[::1]:8080/sgc@load_balancer_client"),
    (("::1", 8080, 0, 0), "ws://[::1]:8080/sgc@load_balancer_client"),
])
def test_lb_url_for(address, url):
    assert lb_url_for(address) == url


@pytest.mark.timeout(30)
def test_command_line_backend_registers_and_leaves_on_sigterm():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "server_disconnect")
        port = free_port()
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        process = subprocess.Popen(
            [sys.executable, "-m", "glb.demo_backend", "--port", str(port), "--lb", base_url(glb),
             "--guid", "cli-demo"], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            ready = seen.wait("server_ready", timeout=20)[0]
            assert ready.backend.guid == "cli-demo" and ready.backend.bindings[0].port == port
            ws = ws_connect(f"ws://127.0.0.1:{port}/")
            ws.send("whoami")
            assert ws.recv() == "cli-demo"
            ws.close()
            process.send_signal(signal.SIGTERM)
            gone = seen.wait("server_disconnect", timeout=10)[0]
            assert gone.code == CloseCode.NORMAL
            assert process.wait(timeout=10) == 0
        finally:
            if process.poll() is None:
                process.kill()
            _, stderr = process.communicate(timeout=5)
        assert b"Traceback" not in stderr, stderr.decode()


def test_text_envelope_reaches_a_demo_backend_agent():
    # The seam later broadcast work builds on: envelopes from glb arrive at the agent.
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        backend = DemoBackend(lb_urls=[base_url(glb)])
        backend.start()
        try:
            seen.wait("server_ready")
            got = gevent.event.AsyncResult()
            backend.agent.on_envelope = got.set
            assert backend.agent.send_envelope(records.encode_text_envelope("to everyone"))
            assert got.get(timeout=5).payload == "to everyone"
        finally:
            backend.stop()
