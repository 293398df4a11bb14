"""glb's own endpoints end to end: handshake checks, echo, close codes, events, handlers."""

import socket
import struct

import gevent
import gevent.event
import pytest
import websocket

from glb.errors import CloseCode
from tests.support import (RawClient, base_url, raw_http, recv_close, running_glb,
                           upgrade_request, ws_connect)


@pytest.fixture
def glb():
    with running_glb() as balancer:
        yield balancer


def record(balancer, *names):
    """Connect recorders to events; returns {name: [event, ...]} and an Event set on disconnect."""
    seen = {name: [] for name in names}
    done = gevent.event.Event()
    for name in names:
        balancer.bus.add_handler(name, seen[name].append, origin="test")
    balancer.bus.add_handler("disconnect", lambda event: done.set(), origin="test-done")
    return seen, done


# -- handshake ---------------------------------------------------------------

def test_echo_round_trip_text_and_binary(glb):
    ws = ws_connect(base_url(glb) + "/glb/echo")
    ws.send("héllo")
    assert ws.recv() == "héllo"
    ws.send_binary(b"\x00\xffbytes")
    assert ws.recv() == b"\x00\xffbytes"
    ws.close()


@pytest.mark.parametrize("request_bytes,status", [
    (upgrade_request(version="8"), b"426"),
    (upgrade_request(key="not-base64!"), b"400"),
    (upgrade_request(key="c2hvcnQ="), b"400"),
    (upgrade_request(http_version="HTTP/1.0"), b"400"),
    (upgrade_request(path="/glb/nothing-here"), b"404"),
])
def test_bad_upgrades_get_a_clear_http_answer(glb, request_bytes, status):
    answer = raw_http(glb.addresses[0], request_bytes)
    assert answer.split(b" ", 2)[1] == status, answer
    assert b"500" not in answer.split(b"\r\n", 1)[0]


def test_wrong_version_answer_names_version_13(glb):
    answer = raw_http(glb.addresses[0], upgrade_request(version="7"))
    assert answer.startswith(b"HTTP/1.1 426")
    assert b"Sec-WebSocket-Version: 13\r\n" in answer


def test_bad_upgrade_does_not_disturb_an_open_session(glb):
    ws = ws_connect(base_url(glb) + "/glb/echo")
    raw_http(glb.addresses[0], upgrade_request(key="garbage"))
    ws.send("still here")
    assert ws.recv() == "still here"
    ws.close()


# -- close codes ---------------------------------------------------------------

def test_client_close_4001_is_seen_by_handler_and_echoed(glb):
    seen, done = record(glb, "disconnect")
    ws = ws_connect(base_url(glb) + "/glb/echo")
    ws.send_close(4001, b"bye")
    assert recv_close(ws) == (4001, "bye")
    ws.shutdown()
    assert done.wait(5)
    assert (seen["disconnect"][0].code, seen["disconnect"][0].reason) == (4001, "bye")


@pytest.mark.parametrize("code", [1000, 1001, 1012, 1013, 1014, 3000, 4999])
def test_registered_close_codes_are_echoed(glb, code):
    ws = ws_connect(base_url(glb) + "/glb/echo")
    ws.send_close(code, b"r")
    assert recv_close(ws) == (code, "r")
    ws.shutdown()


def test_unmasked_client_frame_gets_1002(glb):
    client = RawClient(glb.addresses[0])
    client.send_frame(1, b"hello", mask=False)
    assert client.read_close()[0] == CloseCode.PROTOCOL_ERROR
    client.close()


def test_invalid_utf8_gets_1007(glb):
    client = RawClient(glb.addresses[0])
    client.send_frame(1, b"\xff\xfe")
    assert client.read_close()[0] == CloseCode.INVALID_DATA
    client.close()


def test_reserved_opcode_gets_1002(glb):
    client = RawClient(glb.addresses[0])
    client.send_frame(3, b"x")
    assert client.read_close()[0] == CloseCode.PROTOCOL_ERROR
    client.close()


def test_frame_over_max_message_size_gets_1009_without_reading_it():
    with running_glb(glb={"max_message_size": "1024"}) as balancer:
        client = RawClient(balancer.addresses[0])
        # announce 10 MiB, send only the header: glb must answer from the header alone
        client.sock.sendall(struct.pack("!BBQ", 0x82, 0x80 | 127, 10 << 20) + b"\x00\x00\x00\x00")
        assert client.read_close()[0] == CloseCode.MESSAGE_TOO_BIG
        client.close()


def test_fragmented_message_over_limit_gets_1009():
    with running_glb(glb={"max_message_size": "1000"}) as balancer:
        client = RawClient(balancer.addresses[0])
        client.send_frame(2, b"a" * 600, fin=False)
        client.send_frame(0, b"a" * 600, fin=True)
        assert client.read_close()[0] == CloseCode.MESSAGE_TOO_BIG
        client.close()


def test_large_text_round_trip(glb):
    ws = ws_connect(base_url(glb) + "/glb/echo")
    text = "ü" * (1 << 19)  # 1 MiB of UTF-8
    ws.send(text)
    assert ws.recv() == text
    ws.close()


# -- events ------------------------------------------------------------------

def test_events_fire_in_order_for_an_own_session(glb):
    order = []
    for name in ("handshake", "connect", "raw_message", "message", "binary", "disconnect"):
        glb.bus.add_handler(name, lambda event, name=name: order.append(name), origin="test")
    done = gevent.event.Event()
    glb.bus.add_handler("disconnect", lambda event: done.set(), origin="test")
    ws = ws_connect(base_url(glb) + "/glb/echo")
    ws.send("a")
    ws.recv()
    ws.send_binary(b"b")
    ws.recv()
    ws.close()
    assert done.wait(5)
    assert order == ["handshake", "connect", "raw_message", "message", "binary", "disconnect"]


def test_fragmented_fires_per_fragment(glb):
    seen, done = record(glb, "fragmented")
    client = RawClient(glb.addresses[0])
    client.send_frame(1, b"ab", fin=False)
    client.send_frame(0, b"cd", fin=False)
    client.send_frame(0, b"ef", fin=True)
    assert client.read_frame() == (1, b"abcdef")
    client.send_frame(8, struct.pack("!H", 1000))
    client.read_close()
    client.close()
    assert done.wait(5)
    assert [(e.data, e.opcode, e.continuation, e.final) for e in seen["fragmented"]] == [
        (b"ab", 1, False, False), (b"cd", 0, True, False), (b"ef", 0, True, True)]


def test_raw_message_handled_consumes_the_frame(glb):
    def consume(event):
        if event.text == "eat me":
            event.handled = True
    glb.bus.add_handler("raw_message", consume, origin="test")
    seen, _ = record(glb, "message")
    ws = ws_connect(base_url(glb) + "/glb/echo")
    ws.send("eat me")
    ws.send("after")
    assert ws.recv() == "after"
    assert [e.text for e in seen["message"]] == ["after"]
    ws.close()


def test_error_event_on_protocol_error(glb):
    seen, done = record(glb, "error")
    client = RawClient(glb.addresses[0])
    client.send_frame(1, b"x", mask=False)
    client.read_close()
    client.close()
    assert done.wait(5)
    assert seen["error"] and "1002" in seen["error"][0].error


# -- handler modules -----------------------------------------------------------

def test_handler_module_adds_header_and_rejects_path(caplog):
    with running_glb(handler_modules=["tests.handler_example"]) as balancer:
        assert "on_nothing_at_all matches no event" in caplog.text
        ws = ws_connect(base_url(balancer) + "/glb/echo")
        assert ws.getheaders()["x-served-by"] == "glb-test"
        ws.send("swallow")
        ws.send("kept")
        assert ws.recv() == "kept"  # 'swallow' was marked handled: not echoed
        ws.close()
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(base_url(balancer) + "/app/forbidden")
        assert refused.value.status_code == 403


def test_handler_exception_is_contained_and_fires_exception():
    with running_glb(handler_modules=["tests.handler_example"]) as balancer:
        seen, _ = record(balancer, "exception")
        ws = ws_connect(base_url(balancer) + "/glb/echo")
        ws.send_binary(b"boom")
        assert ws.recv() == b"boom"  # the session goes on: the message is still echoed
        ws.send("after")
        assert ws.recv() == "after"
        ws.close()
        assert isinstance(seen["exception"][0].exception, RuntimeError)


def test_no_receivers_builds_no_event(glb):
    assert glb.bus.fire(glb.bus.client_message, text="x") is None


def test_two_sessions_are_independent(glb):
    first = ws_connect(base_url(glb) + "/glb/echo")
    second = ws_connect(base_url(glb) + "/glb/echo")
    first.sock.sendall(b"\x81\x05garbage")  # unmasked: first is closed with 1002
    second.send("fine")
    assert second.recv() == "fine"
    assert recv_close(first)[0] == CloseCode.PROTOCOL_ERROR
    second.close()
    first.shutdown()


def test_shutdown_closes_sessions_with_1001():
    with running_glb() as balancer:
        ws = ws_connect(base_url(balancer) + "/glb/echo")
        ws.send("x")
        ws.recv()
        stopper = gevent.spawn(balancer.stop, 5)
        assert recv_close(ws) == (1001, "going away")
        ws.send_close(1001)
        stopper.join(5)
        assert stopper.ready()
        with pytest.raises(OSError):
            socket.create_connection(balancer.addresses[0], timeout=1).close()


def test_a_client_that_sends_no_request_is_let_go_after_handshake_timeout():
    with running_glb(glb={"handshake_timeout": "0.3"}) as balancer:
        with socket.create_connection(balancer.addresses[0], timeout=5) as idle:
            idle.sendall(b"GET /glb/echo HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            answer = idle.recv(1024)
            assert answer.startswith(b"HTTP/1.1 408")  # a head not complete in time is answered so
            assert idle.recv(1024) == b""  # and the connection is closed
        ws = ws_connect(base_url(balancer) + "/glb/echo")  # sessions are not bound by it
        gevent.sleep(0.5)
        ws.send("late")
        assert ws.recv() == "late"
        ws.close()
