"""TLS: TLS listeners beside plain ones, contexts from handlers, client certificates,
wss:// and https:// backends, start-up failures.

Every certificate is made here, at test time, by trustme: nothing is committed. Each test
runs a real Balancer on 127.0.0.1 port 0 (a plain and a TLS listener) with real clients;
TLS backends are ``ScriptedBackend``s served by glb's own ``TLSServer``.
"""

import contextlib
import json
import logging
import socket
import ssl
import subprocess
import sys
import time

import gevent
import gevent.event
import gevent.queue
import pytest
import requests
import websocket
from cryptography.hazmat.primitives import serialization

from glb import cli
from glb.agent import Agent
from glb.demo_backend import DemoHandler
from glb.errors import ConfigError, HandlerLoadError, HandshakeFailed
from glb.server import Balancer
from glb.tls import TLSServer
from glb.websocket import connect
from tests.backends import ScriptedBackend, started
from tests.support import make_settings, ROOT, ws_connect
from tests.pki import Pki

pytestmark = pytest.mark.timeout(30)

TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3


# --------------------------------------------------------------------------- certificates


@pytest.fixture
def pki(tmp_path):
    """The certificate glb's TLS listener serves."""
    return Pki(tmp_path, "glb")


@pytest.fixture
def backend_pki(tmp_path):
    """Another CA: the one wss:// and https:// backends' certificates come from."""
    return Pki(tmp_path, "backend")


# --------------------------------------------------------------------------- glb and backends


@contextlib.contextmanager
def tls_glb(pki, handlers=None, tls=None, **sections):
    """A started Balancer with a plain and a TLS listener; ``handlers`` ({event: func}) connected first."""
    sections["tls"] = {"listen": "127.0.0.1:0", "certfile": pki.certfile, "keyfile": pki.keyfile, **(tls or {})}
    balancer = Balancer(make_settings(**sections), handler_modules=[])
    for name, func in (handlers or {}).items():
        balancer.bus.add_handler(name, func, origin="test")
    balancer.start()
    try:
        yield balancer
    finally:
        balancer.stop(timeout=1)


def tls_url(balancer, path="/", scheme="wss"):
    host, port = balancer.tls_addresses[0]
    return f"{scheme}://{host}:{port}{path}"


class Waiter:
    """Collects events of one name; ``wait(match)`` returns the first one ``match`` accepts."""

    def __init__(self):
        self.events = []
        self.arrived = gevent.event.Event()

    def __call__(self, event):
        self.events.append(event)
        self.arrived.set()

    def wait(self, match=lambda event: True, timeout=5):
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if match(event):
                    return event
            self.arrived.clear()
            left = deadline - time.monotonic()
            if left <= 0 or not self.arrived.wait(left):
                raise AssertionError(f"no matching event in {timeout} s; saw {self.events}")


class TLSBackend(ScriptedBackend):
    """A ScriptedBackend served over TLS with ``context``; its HTTP requests' environs are queued."""

    def __init__(self, context, serve=None, **kwargs):
        super().__init__(serve, **kwargs)
        self.context = context
        self.http_environs = gevent.queue.Queue()

    def start(self):
        self.server = TLSServer((self.host, self.port), self.app, self.context, handler_class=DemoHandler,
                                log=None)
        self.server.demo = self
        self.server.start()
        self.port = self.server.address[1]
        return self.port

    def app(self, environ, start_response):
        self.http_environs.put({key: value for key, value in environ.items() if isinstance(value, str)})
        return super().app(environ, start_response)

    def static_section(self):
        return {"url": f"wss://127.0.0.1:{self.port}"}  # https:// for HTTP, derived


def echo_once(url, context, text="hi"):
    """Open a WebSocket with glb's client, send ``text``, return what comes back (HandshakeFailed if refused)."""
    ws, _, _ = connect(url, ssl_context=context, timeout=5)
    try:
        ws.send(text)
        return ws.receive()
    finally:
        ws.close()


# --------------------------------------------------------------------------- TLS listeners


def test_a_wss_client_through_the_tls_listener_to_a_plain_backend(pki, caplog):
    caplog.set_level(logging.INFO, logger="glb.server")
    backend = ScriptedBackend()
    connects = Waiter()
    with started(backend), tls_glb(pki, handlers={"connect": connects},
                                   **{"backend:b0": backend.static_section()}) as glb:
        assert glb.addresses and glb.tls_addresses
        assert set(glb.addresses).isdisjoint(glb.tls_addresses)
        ws = ws_connect(tls_url(glb, "/chat?room=1"), sslopt={"context": pki.client_context()})
        assert ws.sock.version() in ("TLSv1.2", "TLSv1.3")
        ws.send("héllo over TLS")
        assert ws.recv() == "héllo over TLS"
        ws.send_binary(b"\x00\xff")
        assert ws.recv() == b"\x00\xff"
        ws.close()
        assert connects.wait().connection.secure is True
        environ = backend.environs.get(timeout=5)
        assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
        assert environ["wsgi.url_scheme"] == "http"  # the backend leg is plain
        assert (environ["PATH_INFO"], environ["QUERY_STRING"]) == ("/chat", "room=1")
        host, port = glb.tls_addresses[0]
    assert f"= listening on https://{host}:{port}" in caplog.text


def test_a_wss_client_to_a_wss_backend_verified_with_the_backends_cafile(pki, backend_pki):
    def serve(ws, environ):
        ws.send(json.dumps({"tls": ws.sock.version(), "scheme": environ["wsgi.url_scheme"],
                            "forwarded": environ.get("HTTP_X_FORWARDED_PROTO")}))
        while (message := ws.receive()) is not None:
            ws.send(message)

    backend = TLSBackend(backend_pki.server_context(), serve)
    ended = Waiter()
    with started(backend), tls_glb(pki, handlers={"client_disconnect": ended},
                                   backends={"cafile": backend_pki.ca_file},
                                   **{"backend:b0": backend.static_section()}) as glb:
        ws = ws_connect(tls_url(glb), sslopt={"context": pki.client_context()})
        hello = json.loads(ws.recv())
        assert hello["tls"] in ("TLSv1.2", "TLSv1.3")
        assert (hello["scheme"], hello["forwarded"]) == ("https", "https")
        ws.send("two TLS legs")
        assert ws.recv() == "two TLS legs"
        ws.close(status=4000)
        # both TLS connections really close: the session ends at once, not at a timeout
        assert (ended.wait(timeout=1).code, ended.events[0].closed_by) == (4000, "client")


@pytest.mark.parametrize("decoded", [False, True])
def test_a_burst_over_two_tls_legs_arrives_whole_and_in_order(pki, backend_pki, decoded):
    # Many TLS records arrive together on both legs; the engine reads each leg in jobs
    # (never in the hub) and must relay them all, in order, raw or decoded.
    def serve(ws, environ):
        while (message := ws.receive()) is not None:
            ws.send(message)

    backend = TLSBackend(backend_pki.server_context(), serve)
    handlers = {"raw_message": lambda event: None} if decoded else {}
    with started(backend), tls_glb(pki, handlers=handlers, backends={"cafile": backend_pki.ca_file},
                                   **{"backend:b0": backend.static_section()}) as glb:
        ws, _, _ = connect(tls_url(glb), ssl_context=pki.client_context(), timeout=5)
        sent = [f"message {index} " + "x" * (index * 37 % 3000) for index in range(200)]
        for text in sent:  # written back to back, read only afterwards
            ws.send(text)
        with gevent.Timeout(10):
            assert [ws.receive() for _ in sent] == sent
        ws.close()


def test_https_forwarding_through_the_tls_listener_to_an_https_backend(pki, backend_pki):
    backend = TLSBackend(backend_pki.server_context(), guid="https-backend")
    with started(backend), tls_glb(pki, backends={"cafile": backend_pki.ca_file},
                                   **{"backend:b0": backend.static_section()}) as glb:
        answer = requests.get(tls_url(glb, "/whoami", scheme="https"), verify=pki.ca_file, timeout=5)
        assert (answer.status_code, answer.text) == (200, "https-backend")
        environ = backend.http_environs.get(timeout=5)
        assert environ["wsgi.url_scheme"] == "https"
        assert environ["HTTP_X_FORWARDED_PROTO"] == "https"
        # and from the plain listener to the same https backend
        host, port = glb.addresses[0]
        answer = requests.get(f"http://{host}:{port}/whoami", timeout=5)
        assert (answer.status_code, answer.text) == (200, "https-backend")
        assert backend.http_environs.get(timeout=5)["HTTP_X_FORWARDED_PROTO"] == "http"


def test_an_untrusted_backend_certificate_is_a_502_and_an_error_event_promptly(pki, backend_pki):
    backend = TLSBackend(backend_pki.server_context())  # glb verifies against the system's CAs
    errors = Waiter()
    with started(backend), tls_glb(pki, handlers={"error": errors},
                                   **{"backend:b0": backend.static_section()}) as glb:
        began = time.monotonic()
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(tls_url(glb), sslopt={"context": pki.client_context()})
        assert refused.value.status_code == 502
        assert time.monotonic() - began < 3
        error = errors.wait(lambda event: "unreachable" in event.error)
        assert "CERTIFICATE_VERIFY_FAILED" in error.error and error.connection.secure

        began = time.monotonic()
        answer = requests.get(tls_url(glb, "/whoami", scheme="https"), verify=pki.ca_file, timeout=5)
        assert answer.status_code == 502
        assert time.monotonic() - began < 3
        error = errors.wait(lambda event: event.error.startswith("GET /whoami"))
        assert "CERTIFICATE_VERIFY_FAILED" in error.error


def test_backends_verify_false_accepts_an_untrusted_backend(pki, backend_pki):
    backend = TLSBackend(backend_pki.server_context(), guid="unchecked")
    with started(backend), tls_glb(pki, backends={"verify": False},
                                   **{"backend:b0": backend.static_section()}) as glb:
        assert echo_once(tls_url(glb), pki.client_context(), "whoami") == "unchecked"
        answer = requests.get(tls_url(glb, "/whoami", scheme="https"), verify=pki.ca_file, timeout=5)
        assert (answer.status_code, answer.text) == (200, "unchecked")


def test_mutual_tls_to_backends_presents_the_configured_client_certificate(pki, backend_pki, tmp_path):
    client = Pki(tmp_path, "glb-client", "glb.client.test")

    def serve(ws, environ):
        ws.send(json.dumps(ws.sock.getpeercert()["subjectAltName"]))
        ws.receive()

    backend = TLSBackend(backend_pki.server_context(client_ca=client.ca), serve, guid="mtls")
    with started(backend):
        static = {"backend:b0": backend.static_section()}
        with tls_glb(pki, backends={"cafile": backend_pki.ca_file, "certfile": client.certfile,
                                    "keyfile": client.keyfile}, **static) as glb:
            ws = ws_connect(tls_url(glb), sslopt={"context": pki.client_context()})
            assert json.loads(ws.recv()) == [["DNS", "glb.client.test"]]
            ws.close()
            answer = requests.get(tls_url(glb, "/whoami", scheme="https"), verify=pki.ca_file, timeout=5)
            assert (answer.status_code, answer.text) == (200, "mtls")

        errors = Waiter()
        with tls_glb(pki, handlers={"error": errors}, backends={"cafile": backend_pki.ca_file}, **static) as glb:
            with pytest.raises(websocket.WebSocketBadStatusException) as refused:  # no client certificate
                ws_connect(tls_url(glb), sslopt={"context": pki.client_context()})
            assert refused.value.status_code == 502
            errors.wait(lambda event: "unreachable" in event.error)
            answer = requests.get(tls_url(glb, "/whoami", scheme="https"), verify=pki.ca_file, timeout=5)
            assert answer.status_code == 502


# --------------------------------------------------------------------------- handlers' contexts


def test_a_context_from_ssl_get_handler_is_used_as_it_is(pki, tmp_path):
    own = Pki(tmp_path, "own")  # not the configured certificate
    listeners, after = [], Waiter()

    def on_ssl_get_handler(event):
        assert event.context is None
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        own.cert.configure_cert(context)
        context.set_alpn_protocols(["glb-proof", "http/1.1"])
        listeners.append(event.listener)
        event.context = context

    handlers = {"ssl_get_handler": on_ssl_get_handler, "ssl_after_create_handler": after}
    with tls_glb(pki, handlers=handlers) as glb:
        ws = ws_connect(tls_url(glb, "/glb/echo"),
                        sslopt={"context": own.client_context(alpn=["glb-proof", "http/1.1"])})
        assert ws.sock.selected_alpn_protocol() == "glb-proof"
        ws.send("mine")
        assert ws.recv() == "mine"
        ws.close()
        with pytest.raises(ssl.SSLCertVerificationError):  # the configured certificate is not served
            ws_connect(tls_url(glb, "/glb/echo"), sslopt={"context": pki.client_context()})
    assert listeners == ["127.0.0.1:0"]
    assert after.events == []  # not called when a handler supplied the context


def test_the_default_context_offers_http11_by_alpn(pki):
    with tls_glb(pki) as glb:
        ws = ws_connect(tls_url(glb, "/glb/echo"),
                        sslopt={"context": pki.client_context(alpn=["glb-proof", "h2", "http/1.1"])})
        assert ws.sock.selected_alpn_protocol() == "http/1.1"
        ws.close()


def test_ssl_after_create_handler_raising_the_minimum_version_turns_tls12_clients_away(pki):
    tls12 = pki.client_context(maximum_version=TLS12)
    with tls_glb(pki) as glb:  # the default minimum is TLS 1.2: the same client is welcome
        assert echo_once(tls_url(glb, "/glb/echo"), tls12) == "hi"

    created, errors = [], Waiter()

    def on_ssl_after_create_handler(event):
        created.append((event.listener, event.context.minimum_version))
        event.context.minimum_version = TLS13

    handlers = {"ssl_after_create_handler": on_ssl_after_create_handler, "error": errors}
    with tls_glb(pki, handlers=handlers) as glb:
        with pytest.raises(HandshakeFailed, match="cannot connect"):
            echo_once(tls_url(glb, "/glb/echo"), tls12)
        failed = errors.wait()
        assert failed.error.startswith("TLS handshake failed") and failed.connection.secure
        ws = ws_connect(tls_url(glb, "/glb/echo"), sslopt={"context": pki.client_context()})
        assert ws.sock.version() == "TLSv1.3"
        ws.close()
    assert created == [("127.0.0.1:0", TLS12)]


def test_minimum_version_tls13_setting_turns_tls12_clients_away(pki):
    with tls_glb(pki, tls={"minimum_version": "TLSv1.3"}) as glb:
        with pytest.raises(HandshakeFailed):
            echo_once(tls_url(glb, "/glb/echo"), pki.client_context(maximum_version=TLS12))
        assert echo_once(tls_url(glb, "/glb/echo"), pki.client_context()) == "hi"


@pytest.mark.parametrize("policy", ["required", "optional"])
def test_client_certificates_are_checked_against_the_tls_cafile(pki, tmp_path, policy):
    clients = Pki(tmp_path, "clients", "alice.test")
    stranger = Pki(tmp_path, "stranger", "mallory.test")  # a certificate from a CA glb does not trust
    errors = Waiter()
    with tls_glb(pki, handlers={"error": errors}, tls={"verify_client": policy, "cafile": clients.ca_file}) as glb:
        url = tls_url(glb, "/glb/echo")
        assert echo_once(url, pki.client_context(client_cert=clients.cert)) == "hi"
        with pytest.raises(HandshakeFailed):
            echo_once(url, pki.client_context(client_cert=stranger.cert))
        assert "CERTIFICATE_VERIFY_FAILED" in errors.wait().error
        if policy == "required":
            with pytest.raises(HandshakeFailed):
                echo_once(url, pki.client_context())
            errors.wait(lambda event: "CERTIFICATE" in event.error and "VERIFY" not in event.error)
        else:
            assert echo_once(url, pki.client_context()) == "hi"


def test_an_encrypted_key_loads_with_its_password(pki, tmp_path):
    key = serialization.load_pem_private_key(pki.cert.private_key_pem.bytes(), password=None)
    encrypted = tmp_path / "encrypted-key.pem"
    encrypted.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.BestAvailableEncryption(b"s3cret")))
    with tls_glb(pki, tls={"keyfile": str(encrypted), "password": "s3cret"}) as glb:
        assert echo_once(tls_url(glb, "/glb/echo"), pki.client_context()) == "hi"


# --------------------------------------------------------------------------- control channel, binding endpoint


def test_control_channel_binding_endpoint_and_sessions_over_tls(pki, backend_pki):
    backend = TLSBackend(backend_pki.server_context(), guid="registered-over-tls")
    ready = Waiter()
    with started(backend), tls_glb(pki, handlers={"server_ready": ready},
                                   backends={"cafile": backend_pki.ca_file}) as glb:
        agent = Agent(tls_url(glb), guid="agent-1", bindings=[("127.0.0.1", backend.port, True)],
                      ssl_context=pki.client_context())
        agent.start()
        try:
            event = ready.wait()
            assert event.backend.guid == "agent-1" and event.connection.secure
            answer = requests.get(tls_url(glb, "/glb/binding", scheme="https"), verify=pki.ca_file, timeout=5)
            assert answer.status_code == 200
            assert answer.json() == {"method": answer.json()["method"], "host": "127.0.0.1",
                                     "port": backend.port, "ssl": True}
            # the registered binding says ssl, so the relay reaches it over wss://
            assert echo_once(tls_url(glb), pki.client_context(), "whoami") == "registered-over-tls"
        finally:
            agent.stop(timeout=2)


@pytest.mark.parametrize("url, ssl_flag", [("ws://127.0.0.1:9001", False), ("wss://127.0.0.1:9443", True)])
def test_the_binding_endpoint_reports_ssl_as_the_binding_has_it(pki, url, ssl_flag):
    with tls_glb(pki, **{"backend:b0": {"url": url}}) as glb:
        for base in (tls_url(glb, scheme="https"), "http://%s:%s/" % glb.addresses[0]):
            answer = requests.get(base + "glb/binding", verify=pki.ca_file, timeout=5).json()
            assert (answer["port"], answer["ssl"]) == (int(url.rsplit(":", 1)[1]), ssl_flag)


# --------------------------------------------------------------------------- handshakes that go wrong


def test_a_silent_or_plain_http_client_on_the_tls_port_is_closed_and_an_error(pki):
    errors = Waiter()
    with tls_glb(pki, handlers={"error": errors}, glb={"listen": "127.0.0.1:0", "handshake_timeout": 0.3}) as glb:
        address = glb.tls_addresses[0]
        with socket.create_connection(address, timeout=5) as silent:
            began = time.monotonic()
            assert silent.recv(100) == b""
            assert time.monotonic() - began < 3
        assert "timed out" in errors.wait().error
        with socket.create_connection(address, timeout=5) as plain:
            plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert plain.recv(100) == b""
            except ConnectionResetError:  # closed with the request unread: also closed
                pass
        errors.wait(lambda event: event.error.startswith("TLS handshake failed"))
        assert echo_once(tls_url(glb, "/glb/echo"), pki.client_context()) == "hi"  # the listener carries on


def test_a_tls_session_still_open_at_shutdown_is_ended_quietly(pki, backend_pki, capfd):
    release = gevent.event.Event()

    def deaf(ws, environ):  # never answers glb's close
        release.wait(5)

    backend = TLSBackend(backend_pki.server_context(), deaf)
    with started(backend):
        glb = Balancer(make_settings(tls={"listen": "127.0.0.1:0", "certfile": pki.certfile,
                                          "keyfile": pki.keyfile},
                                     backends={"cafile": backend_pki.ca_file},
                                     **{"backend:b0": backend.static_section()}), handler_modules=[])
        glb.start()
        ws = ws_connect(tls_url(glb), sslopt={"context": pki.client_context()})
        began = time.monotonic()
        glb.stop(timeout=0.2)
        assert time.monotonic() - began < 2
        assert len(glb.sessions) == 0
        ws.close()
        release.set()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "AssertionError" not in err


# --------------------------------------------------------------------------- start-up failures


def run_glb(path):
    return subprocess.run([sys.executable, "-m", "glb", str(path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)


def test_a_missing_or_unusable_certificate_stops_start_up_with_exit_2(pki, tmp_path):
    not_pem = tmp_path / "not-pem.pem"
    not_pem.write_text("this is not a certificate\n")
    for certfile, reason in ((tmp_path / "missing.pem", "file not found"),
                             (not_pem, "cannot load certificate and key")):
        config = tmp_path / "lb.ini"
        config.write_text(f"[glb]\nlisten = 127.0.0.1:0\n[handlers]\nmodules =\n"
                          f"[tls]\nlisten = 127.0.0.1:0\ncertfile = {certfile}\nkeyfile = {pki.keyfile}\n")
        result = run_glb(config)
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip().splitlines()[-1]
        assert "[tls]" in line and "'certfile'" in line and reason in line and str(config) in line


def test_a_certificate_gone_by_start_up_binds_nothing_and_exits_2(pki, tmp_path, capsys):
    certfile = tmp_path / "short-lived.pem"
    certfile.write_bytes(open(pki.certfile, "rb").read())
    settings = make_settings(tls={"listen": "127.0.0.1:0", "certfile": str(certfile), "keyfile": pki.keyfile})
    certfile.unlink()
    balancer = Balancer(settings, handler_modules=[])
    with pytest.raises(ConfigError, match="cannot load certificate and key") as failed:
        balancer.start()
    assert (failed.value.section, failed.value.key) == ("tls", "certfile")
    assert balancer.servers == []
    assert cli.run(settings) == cli.EXIT_BAD_CONFIG
    assert "[tls]" in capsys.readouterr().err


def _supplies(value):
    def on_ssl_get_handler(event):
        event.context = value
    return on_ssl_get_handler


def _raises(event):
    raise RuntimeError("handler bug")


@pytest.mark.parametrize("name, handler, reason", [
    ("ssl_get_handler", _supplies("not a context"), "expected an ssl.SSLContext"),
    ("ssl_get_handler", _supplies(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)), "client-side context"),
    ("ssl_get_handler", _raises, "raised RuntimeError: handler bug"),
    ("ssl_after_create_handler", _raises, "raised RuntimeError: handler bug"),
])
def test_a_broken_tls_handler_stops_start_up_before_anything_binds(pki, name, handler, reason):
    balancer = Balancer(make_settings(tls={"listen": "127.0.0.1:0", "certfile": pki.certfile,
                                           "keyfile": pki.keyfile}), handler_modules=[])
    exceptions = Waiter()
    balancer.bus.add_handler(name, handler, origin="test")
    balancer.bus.add_handler("exception", exceptions, origin="test")
    with pytest.raises(HandlerLoadError, match=reason):
        balancer.start()
    assert balancer.servers == []
    if handler is _raises:
        assert isinstance(exceptions.wait().exception, RuntimeError)  # logged and fired as for any handler
