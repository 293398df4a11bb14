"""Connection limits: the socket-free decisions, then a real glb refusing what is over them."""

import logging
import resource
import socket

import gevent
import pytest

from glb.errors import CloseCode
from glb.limits import (TOO_MANY, TOO_MANY_FROM_IP, ConnectionLimits, HandshakeRate, client_key,
                        normalise_origin, origin_allowed)
from glb.websocket import connect
from tests.backends import ScriptedBackend, started
from tests.support import base_url, running_glb, upgrade_request, ws_connect


# -- decisions, no sockets -------------------------------------------------------------------------

def test_limits_count_per_address_and_in_all():
    limits = ConnectionLimits(max_total=3, max_per_ip=2)
    assert limits.admit("10.0.0.1") is None and limits.admit("10.0.0.1") is None
    assert limits.admit("10.0.0.1") == TOO_MANY_FROM_IP
    assert limits.admit("10.0.0.2") is None
    assert limits.admit("10.0.0.3") == TOO_MANY
    limits.release("10.0.0.1")
    assert limits.admit("10.0.0.3") is None
    for ip in ("10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.3"):  # one release too many is ignored
        limits.release(ip)
    assert (limits.total, limits.per_ip) == (0, {})


def test_zero_means_no_cap():
    limits = ConnectionLimits()
    assert all(limits.admit("10.0.0.1") is None for _ in range(1000))


def test_handshake_rate_is_a_token_bucket_per_address():
    now = [0.0]
    rate = HandshakeRate(rate=2, burst=3, clock=lambda: now[0])
    assert [rate.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rate.allow("b")  # another address has its own bucket
    now[0] += 0.5  # one token back
    assert [rate.allow("a") for _ in range(2)] == [True, False]
    now[0] += 100  # refills up to the burst, not beyond
    assert [rate.allow("a") for _ in range(4)] == [True, True, True, False]


def test_handshake_rate_forgets_idle_addresses():
    now = [0.0]
    rate = HandshakeRate(rate=10, burst=1, clock=lambda: now[0])
    for index in range(1024):
        rate.allow(f"10.0.{index // 256}.{index % 256}")
    now[0] += 1  # every bucket full again
    rate.allow("192.0.2.1")
    assert len(rate.buckets) == 1


def test_client_key_folds_ipv4_mapped_addresses():
    assert client_key("::ffff:127.0.0.1") == "127.0.0.1"
    assert client_key("fe80::1%eth0") == "fe80::1"


@pytest.mark.parametrize("origin, normal", [
    ("https://App.Example.com", "https://app.example.com"),
    ("https://app.example.com:443/", "https://app.example.com"),
    ("http://localhost:8080", "http://localhost:8080"),
    ("https://app.example.com/path", None),
    ("null", None),
])
def test_origins_are_normalised(origin, normal):
    assert normalise_origin(origin) == normal


def test_origin_check():
    allowed = frozenset({"https://app.example.com"})
    assert origin_allowed("https://APP.example.com:443", allowed)
    assert not origin_allowed("https://evil.example", allowed)
    assert not origin_allowed("null", allowed)
    assert origin_allowed(None, allowed)  # not a browser
    assert origin_allowed("https://evil.example", frozenset())


# -- a real glb --------------------------------------------------------------------------------------

def upgrade(address, source="127.0.0.1", path="/glb/echo", extra=""):
    """A raw upgrade from ``source``: (status code, socket); the socket stays open for the caller."""
    sock = socket.create_connection(address, timeout=5, source_address=(source, 0))
    sock.sendall(upgrade_request(path, extra=extra))
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    if not head:
        return None, sock
    return int(head.split(b" ", 2)[1]), sock


def wait_until(condition, seconds=5):
    with gevent.Timeout(seconds, AssertionError("condition not met in time")):
        while not condition():
            gevent.sleep(0.01)


def recorder(balancer, name):
    seen = []
    balancer.bus.add_handler(name, seen.append, origin="test")
    return seen


@pytest.mark.timeout(60)
def test_the_101st_connection_from_one_address_is_refused_while_another_address_connects():
    with running_glb(glb={"max_connections_per_ip": "100"}) as glb:
        address = glb.addresses[0]
        errors = recorder(glb, "error")
        held = []
        try:
            for _ in range(100):
                status, sock = upgrade(address)
                held.append(sock)
                assert status == 101
            status, refused = upgrade(address)
            held.append(refused)
            assert status == 503
            assert any("max_connections_per_ip" in event.error for event in errors)
            status, other = upgrade(address, source="127.0.0.2")
            held.append(other)
            assert status == 101
            held.pop(0).close()  # one of the hundred leaves: room for one more from 127.0.0.1
            wait_until(lambda: glb.admission.limits.per_ip.get("127.0.0.1", 0) < 100)
            status, again = upgrade(address)
            held.append(again)
            assert status == 101
        finally:
            for sock in held:
                sock.close()
        wait_until(lambda: glb.admission.limits.total == 0)


def test_max_connections_counts_plain_http_keep_alive_connections_too():
    with running_glb(glb={"max_connections": "2"}) as glb:
        address = glb.addresses[0]
        first, second = (socket.create_connection(address, timeout=5) for _ in range(2))
        for sock in (first, second):  # a request each, so both are surely accepted and counted
            sock.sendall(b"GET /glb/status HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        status, third = upgrade(address)
        assert status == 503
        third.close()
        second.sendall(b"GET /glb/metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        scraped = b""
        while b'glb_connections_refused_total{limit="max_connections"}' not in scraped:
            data = second.recv(65536)
            assert data, "metrics ended without the refusal counter"
            scraped += data
        assert b'glb_connections_refused_total{limit="max_connections"} 1.0' in scraped
        first.close()
        wait_until(lambda: glb.admission.limits.total < 2)
        status, fourth = upgrade(address)
        assert status == 101
        for sock in (second, fourth):
            sock.close()


def test_a_relayed_session_keeps_its_count_until_it_ends():
    backend = ScriptedBackend()
    with started(backend), running_glb(glb={"max_connections_per_ip": "1"},
                                       **{"backend:b": backend.static_section()}) as glb:
        ws = ws_connect(base_url(glb) + "/")
        ws.send("x")
        assert ws.recv() == "x"
        status, refused = upgrade(glb.addresses[0], path="/")
        refused.close()
        assert status == 503  # the session's pywsgi handler has long returned; its count has not
        ws.close()
        wait_until(lambda: glb.admission.limits.total == 0)
        again = ws_connect(base_url(glb) + "/")
        again.close()


def test_upgrades_from_origins_not_listed_get_403():
    with running_glb(glb={"allowed_origins": "https://app.example.com, http://localhost:8080"}) as glb:
        address = glb.addresses[0]
        results = {}
        for origin in ("https://app.example.com", "http://LOCALHOST:8080", "https://evil.example", None):
            status, sock = upgrade(address, extra=f"Origin: {origin}\r\n" if origin else "")
            sock.close()
            results[origin] = status
        assert results == {"https://app.example.com": 101, "http://LOCALHOST:8080": 101,
                           "https://evil.example": 403, None: 101}


def test_handshakes_over_the_rate_get_429_and_control_channels_1008():
    with running_glb(glb={"handshake_rate_per_ip": "0.01", "handshake_burst_per_ip": "2"}) as glb:
        address = glb.addresses[0]
        errors = recorder(glb, "error")
        statuses = []
        for _ in range(3):
            status, sock = upgrade(address)
            statuses.append(status)
            sock.close()
        assert statuses == [101, 101, 429]
        assert any("handshake_rate_per_ip" in event.error for event in errors)
        ws, _, _ = connect(base_url(glb) + "/glb/control", timeout=5)
        with gevent.Timeout(5):
            while ws.receive() is not None:
                pass
        assert (ws.close_code, ws.close_reason) == (CloseCode.POLICY_VIOLATION, "handshake rate exceeded")
        assert glb.control_channels == {}


def test_the_file_descriptor_limit_is_raised_and_logged(caplog):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and soft > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        with caplog.at_level(logging.INFO, logger="glb.admission"), running_glb() as glb:
            assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == hard
            assert glb.admission.limits.max_total > 0 or hard == resource.RLIM_INFINITY
        assert any("file descriptors" in record.getMessage() for record in caplog.records)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_out_of_descriptors_a_new_connection_is_closed_at_once_and_glb_recovers(tmp_path):
    """A glb process limited to 40 descriptors, with 40 connections pending: the ones it cannot
    take are accepted on its spare descriptor and closed, instead of waiting in the backlog."""
    import select
    import subprocess
    import sys
    import time

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = tmp_path / "lb.ini"
    config.write_text(f"[glb]\nlisten = 127.0.0.1:{port}\nmax_connections = 10000\nhandshake_timeout = 60\n"
                      "[handlers]\nmodules =\n")
    glb = subprocess.Popen([sys.executable, "-m", "glb", str(config)], stderr=subprocess.PIPE, text=True,
                           preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)))
    socks = []
    try:
        deadline = time.monotonic() + 20
        while True:  # until it listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert glb.poll() is None and time.monotonic() < deadline, "glb did not start"
                time.sleep(0.05)
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(40)]
        ended = set()
        while not ended and time.monotonic() < deadline:  # nobody sent a request: only a shed ends
            readable, _, _ = select.select(socks, [], [], 0.2)
            ended = {s for s in readable if s.recv(16) == b""}
        assert ended, "no connection was closed while glb was out of descriptors"
        for sock in socks:
            sock.close()
        socks = []
        while True:  # its descriptors come back: glb serves again
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    sock.sendall(b"GET /glb/status HTTP/1.1\r\nHost: x\r\n\r\n")
                    if sock.recv(16).startswith(b"HTTP/1.1 200"):
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "glb did not recover"
            time.sleep(0.05)
    finally:
        for sock in socks:
            sock.close()
        glb.terminate()
        output = glb.communicate(timeout=10)[1]
    assert "out of file descriptors" in output
