"""The control channel and the binding endpoint, end to end on a real glb (raw control channels)."""

import json

import gevent
import gevent.event
import pytest
import requests

from glb import control_records as records
from glb.control import SGC_BINDING_PATH, SGC_CONTROL_PATH, authorize
from glb.errors import CloseCode, HandshakeFailed
from glb.registry import READY
from tests.support import base_url, Recorder, running_glb, ws_connect
from tests.control_peer import closed_with, get_binding, open_channel, received, register


ALL_CHANNEL_EVENTS = ("connect", "server_connect", "server_ready", "server_disconnect", "disconnect",
                      "error")


# -- registration ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/glb/control", SGC_CONTROL_PATH])
def test_registration_fires_events_in_order_and_leaving_removes_the_backend(path):
    with running_glb() as glb:
        seen = Recorder(glb, *ALL_CHANNEL_EVENTS)
        ws = open_channel(glb, path=path)
        connected = seen.wait("server_connect")[0]
        assert connected.backend.guid is None
        assert connected.connection.kind == "control"
        assert glb.registry.get("b1") is None

        ws.send(records.encode_server_data("b1", weight=3))
        ws.send(records.encode_binding("127.0.0.1", 9001))
        ws.send(records.READY)
        ready = seen.wait("server_ready")[0]
        assert (ready.backend.guid, ready.backend.weight, ready.backend.clients) == ("b1", 3, 0)
        assert [b.netloc for b in ready.backend.bindings] == ["127.0.0.1:9001"]
        assert glb.registry.get("b1").state == READY
        assert glb.control_channels["b1"].conn is ready.connection

        ws.close(CloseCode.NORMAL, "bye")
        gone = seen.wait("server_disconnect")[0]
        assert (gone.backend.guid, gone.code) == ("b1", CloseCode.NORMAL)
        seen.wait("disconnect")
        assert glb.registry.get("b1") is None
        assert "b1" not in glb.control_channels
        assert seen.names() == ["connect", "server_connect", "server_ready", "server_disconnect",
                                "disconnect"]


def test_unspecified_binding_host_means_the_channel_address():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        ws = register(glb, "b1", 9001, seen, host="0.0.0.0")
        assert seen.of("server_ready")[0].backend.bindings[0].host == "127.0.0.1"
        ws.close()


def test_client_records_keep_the_client_count_current():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "raw_message", "error")
        ws = register(glb, "b1", 9001, seen, clients=["early"])
        backend = glb.registry.get("b1")
        assert seen.of("server_ready")[0].backend.clients == 1

        def sent(text):
            ws.send(text)
            seen.wait("raw_message", match=lambda e: e.text == text)  # applied in the same step

        sent(records.encode_client(True, "c1", ip="10.1.2.3"))
        sent(records.encode_client(True, "c2"))
        assert backend.clients == 3
        sent(records.encode_client(False, "early"))
        sent(records.encode_client(False, "c1"))
        assert backend.clients == 1
        sent('{"method":"sgc@lb@client@connection","active":"yes","guid":"c3"}')
        assert "malformed record" in seen.wait("error")[0].error
        assert backend.clients == 1 and not ws.closed  # a bad client record does not end the channel
        assert all(e.source == "control" for e in seen.of("raw_message"))
        ws.close()


def test_raw_message_handler_may_consume_a_record():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")

        def swallow_ready(event):
            if event.text == records.READY:
                event.handled = True

        glb.bus.add_handler("raw_message", swallow_ready, origin="test")
        ws = open_channel(glb)
        ws.send(records.encode_server_data("b1"))
        ws.send(records.encode_binding("127.0.0.1", 9001))
        ws.send(records.READY)
        ws.send(records.encode_client(True, "c1"))
        seen_client = Recorder(glb, "raw_message")
        ws.send(records.encode_client(True, "c2"))
        seen_client.wait("raw_message")
        assert seen.of("server_ready") == []
        assert glb.registry.get("b1").state != READY
        ws.close()


@pytest.mark.parametrize("frames,reason_part", [
    (['{"method":"sgc@lb@server@binding","host":"127.0.0.1","port":9001}'], "before server data"),
    (['{"method":"sgc@lb@server@binding"}'], "before server data"),
    (['{"method":"sgc@lb@server@data","guid":'], "not valid JSON"),
    (["hello"], "before server data"),
    ([b"\x00\x01"], "before server data"),
    ([records.encode_server_data("b9"), '{"method":"sgc@lb@server@binding","host":"127.0.0.1","port":70000}'],
     "port"),
    ([records.encode_server_data("b9"), '{"method":"sgc@lb@server@binding","host":"bad host!","port":1}'],
     "host"),
    ([records.encode_server_data("b9"), records.encode_server_data("b9")], "server data sent twice"),
    ([records.encode_server_data("b9"), records.READY, records.READY], "ready sent twice"),
    (['{"method":"sgc@lb@server@data","guid":"b9","weight":0}'], "weight"),
])
def test_protocol_violations_get_an_error_event_and_close_1008_while_others_carry_on(frames, reason_part):
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "error", "server_disconnect")
        good = register(glb, "good", 9001, seen)
        echo = ws_connect(base_url(glb) + "/glb/echo")

        bad = open_channel(glb)
        for frame in frames:
            bad.send(frame)
        code, reason = closed_with(bad)
        assert code == CloseCode.POLICY_VIOLATION
        assert reason_part in reason
        error = seen.wait("error")[0]
        assert reason_part in error.error
        seen.wait("server_disconnect")
        assert glb.registry.get("b9") is None

        echo.send("still here")
        assert echo.recv() == "still here"
        assert glb.registry.get("good").state == READY
        assert get_binding(glb).json()["port"] == 9001
        echo.close()
        good.close()


@pytest.mark.parametrize("text,error_part", [
    ('{"method":"sgc@lb@server@data","guid":', "not valid JSON"),
    ('{"method":"sgc@lb@nothing"}', "unknown record method"),
    ("12x", "3 ASCII digits"),
    ("999{}", "longer than the message"),
    ('010{"guid":1}xx', "must be a string"),
    ('005{"gu}xx', "header is not valid JSON"),
])
def test_after_server_data_garbage_is_an_error_and_dropped_but_the_channel_stays(text, error_part):
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "error", "message")
        ws = register(glb, "b1", 9001, seen)
        ws.send(text)
        error = seen.wait("error")[0]
        assert error_part in error.error and error.connection.kind == "control"
        assert not ws.closed and glb.registry.get("b1").state == READY
        ws.send(records.encode_client(True, "c1"))  # still served
        ws.send(records.encode_text_envelope("ping"))
        assert received(ws) == records.encode_text_envelope("ping")  # relayed back, nothing else before
        ws.close()


def test_duplicate_guid_is_refused_with_1008_and_the_first_stays():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "error", "server_disconnect")
        first = register(glb, "same", 9001, seen)
        second = open_channel(glb)
        second.send(records.encode_server_data("same"))
        assert closed_with(second) == (CloseCode.POLICY_VIOLATION, "duplicate guid")
        assert "duplicate guid" in seen.wait("error")[0].error
        gone = seen.wait("server_disconnect")[0]
        assert gone.backend.guid is None  # it never registered
        assert glb.registry.get("same").bindings[0].port == 9001
        assert glb.control_channels["same"].conn.websocket is not None
        first.close()


def test_server_connect_handler_may_reject_by_closing():
    with running_glb() as glb:
        seen = Recorder(glb, "server_connect", "server_disconnect", "disconnect")
        glb.bus.add_handler("server_connect", lambda e: e.connection.close(4003, "not today"),
                            origin="test")
        ws = open_channel(glb)
        assert closed_with(ws) == (4003, "not today")
        gone = seen.wait("server_disconnect")[0]
        assert gone.code == 4003 and gone.backend.guid is None
        seen.wait("disconnect")
        assert seen.names() == ["server_connect", "server_disconnect", "disconnect"]
        assert len(glb.registry) == 0


# -- authentication ----------------------------------------------------------------------------------

def test_token_and_allow_list():
    with running_glb(backends={"allow": "10.0.0.0/8", "token": "s3cret"}) as glb:
        seen = Recorder(glb, "connect", "server_connect", "server_ready")
        with pytest.raises(HandshakeFailed) as missing:
            open_channel(glb)
        assert missing.value.status == 401
        with pytest.raises(HandshakeFailed) as wrong:
            open_channel(glb, token="s3cret-not")
        assert wrong.value.status == 403
        with pytest.raises(HandshakeFailed) as sgc_wrong:
            open_channel(glb, token="nope", path=SGC_CONTROL_PATH)
        assert sgc_wrong.value.status == 403
        assert seen.events == []  # refused channels never reach connect or server_connect

        ws = open_channel(glb, token="s3cret")
        seen.wait("server_connect")
        ws.send(records.encode_server_data("b1"))
        ws.send(records.encode_binding("127.0.0.1", 9001))
        ws.send(records.READY)
        seen.wait("server_ready")
        ws.close()


def test_without_a_token_only_the_allow_list_counts():
    with running_glb(backends={"allow": "10.0.0.0/8"}) as glb:
        with pytest.raises(HandshakeFailed) as refused:
            open_channel(glb, token="anything")
        assert refused.value.status == 403
    with running_glb() as glb:  # default allow: loopback, no token needed
        open_channel(glb).close()


class _Backends:
    def __init__(self, token, allow):
        import ipaddress
        self.token, self.allow = token, [ipaddress.ip_network(n) for n in allow]


@pytest.mark.parametrize("peer,header,allowed", [
    ("127.0.0.1", None, True),
    ("::ffff:127.0.0.1", None, True),
    ("::1", None, True),
    ("10.1.2.3", None, False),
    ("10.1.2.3", "Bearer tok", True),
    ("10.1.2.3", "bearer tok", True),
    ("10.1.2.3", "Basic tok", False),
    ("10.1.2.3", "Bearer tok2", False),
    ("not-an-ip", None, False),
])
def test_authorize(peer, header, allowed):
    assert (authorize(_Backends("tok", ["127.0.0.0/8", "::1/128"]), peer, header) is None) == allowed


# -- envelopes ---------------------------------------------------------------------------------------

def test_envelopes_are_relayed_unchanged_to_every_ready_backend_including_the_sender():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "message", "binary")
        a = register(glb, "a", 9001, seen)
        b = register(glb, "b", 9002, seen)
        pending = open_channel(glb)  # registered but not ready: gets nothing
        pending.send(records.encode_server_data("p"))

        text = records.encode_text_envelope('{"method":"sgc@lb@server@ready"} hi', channel="news")
        a.send(text)
        assert received(a) == text and received(b) == text
        assert seen.wait("message")[0].text == text

        data = records.encode_binary_envelope("c7", b"\x00\xff")
        b.send(data)
        assert received(a) == data and received(b) == data
        assert seen.wait("binary")[0].data == data

        bad = b"12345"
        a.send(bad)
        a.send(text)  # the bad one was dropped: the next thing back is this
        assert received(a) == text and received(b) == text
        pending.send(records.READY)
        seen.wait("server_ready", count=3)
        for ws in (a, b, pending):
            ws.close()


def test_a_message_handler_may_keep_an_envelope_from_being_relayed():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")

        def keep_secret(event):
            event.handled = event.text.endswith("secret")

        glb.bus.add_handler("message", keep_secret, origin="test")
        ws = register(glb, "a", 9001, seen)
        ws.send(records.encode_text_envelope("secret"))
        ws.send(records.encode_text_envelope("public"))
        assert received(ws) == records.encode_text_envelope("public")
        ws.close()


# -- binding endpoint ----------------------------------------------------------------------------------

@pytest.mark.parametrize("path", [SGC_BINDING_PATH, "/glb/binding"])
def test_binding_endpoint_503_without_backends_then_a_binding(path):
    with running_glb() as glb:
        answer = get_binding(glb, path)
        assert answer.status_code == 503
        assert answer.headers["Content-Type"] == "application/json"
        assert "error" in answer.json()

        seen = Recorder(glb, "server_ready")
        ws = register(glb, "b1", 9001, seen)
        answer = get_binding(glb, path)
        assert answer.status_code == 200
        assert answer.headers["Content-Type"] == "application/json"
        assert answer.headers["Cache-Control"] == "no-store"
        assert answer.json() == {"method": "sgc@lb@server@binding", "host": "127.0.0.1",
                                 "port": 9001, "ssl": False}
        assert requests.post(base_url(glb, "http") + path, timeout=5).status_code == 405
        ws.close()


def test_before_send_server_binding_may_rewrite_the_binding():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "before_send_server_binding")

        def public_name(event):
            event.binding.host = "ws.example.com"
            event.binding.port = 443
            event.binding.ssl = True

        glb.bus.add_handler("before_send_server_binding", public_name, origin="test")
        ws = register(glb, "b1", 9001, seen)
        answer = get_binding(glb)
        assert answer.json() == {"method": "sgc@lb@server@binding", "host": "ws.example.com",
                                 "port": 443, "ssl": True}
        event = seen.of("before_send_server_binding")[0]
        assert event.connection.kind == "own" and event.connection.peer_ip == "127.0.0.1"
        assert glb.registry.get("b1").bindings[0].port == 9001  # the registry is untouched
        ws.close()


def test_a_handler_breaking_the_binding_gets_500_and_an_error_event():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "error")
        glb.bus.add_handler("before_send_server_binding", lambda e: setattr(e.binding, "port", 0),
                            origin="test")
        ws = register(glb, "b1", 9001, seen)
        assert get_binding(glb).status_code == 500
        assert "port" in seen.wait("error")[0].error
        ws.close()


def test_a_backend_that_left_is_never_offered_again():
    with running_glb(glb={"balancing": "round_robin"}) as glb:
        seen = Recorder(glb, "server_ready", "server_disconnect")
        a = register(glb, "a", 9001, seen)
        b = register(glb, "b", 9002, seen)
        assert {get_binding(glb).json()["port"] for _ in range(4)} == {9001, 9002}
        b.close()
        seen.wait("server_disconnect")
        assert {get_binding(glb).json()["port"] for _ in range(20)} == {9001}
        a.close()
        seen.wait("server_disconnect", count=2)
        assert get_binding(glb).status_code == 503


def test_binding_endpoint_skips_backends_without_a_binding_and_full_ones():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        ws = open_channel(glb)
        ws.send(records.encode_server_data("nobind"))
        ws.send(records.READY)
        seen.wait("server_ready")
        assert get_binding(glb).status_code == 503
        full = register(glb, "full", 9003, seen, clients=["c1"], max_clients=1)
        assert get_binding(glb).status_code == 503
        ws.close()
        full.close()


def test_channels_still_open_when_glb_stops_get_server_disconnect():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "server_disconnect", "disconnect")
        ws = register(glb, "b1", 9001, seen)
        backend_side = gevent.spawn(closed_with, ws)  # the backend answers glb's close
    assert backend_side.get(timeout=5) == (CloseCode.GOING_AWAY, "going away")
    assert seen.of("server_disconnect")[0].code == CloseCode.GOING_AWAY
    assert seen.names()[-2:] == ["server_disconnect", "disconnect"]
    assert len(glb.registry) == 0 and glb.control_channels == {}


def test_binding_json_is_plain_json():
    body = json.dumps(records.binding_json(records.Binding("::1", 80)))
    assert json.loads(body)["host"] == "::1"


# -- one backend cannot hold glb: fairness and caps ---------------------------------------------------

FLOOD_RECORDS = 60000


@pytest.mark.timeout(90)
def test_a_control_channel_flood_does_not_stall_other_sessions():
    """A separate process floods a control channel with client records in 64 KiB writes; an echo
    canary completes its round trips while the flood is still being processed."""
    import subprocess
    import sys

    with running_glb() as glb:
        canary = ws_connect(base_url(glb) + "/glb/echo")
        host, port = glb.addresses[0]
        flood = subprocess.Popen([sys.executable, "-m", "tests.control_flood", host, str(port),
                                  str(FLOOD_RECORDS)], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            def reported():
                backend = glb.registry.get("flood")
                return len(backend.reported_clients) if backend is not None else 0
            with gevent.Timeout(30, AssertionError("the flood never started")):
                while reported() == 0:
                    gevent.sleep(0.001)
            first = reported()
            for index in range(20):
                canary.send(f"ping {index}")
                assert canary.recv() == f"ping {index}"
            during = reported() - first
            # The canary was answered while the flood went on, and often: each round trip took
            # a few turns of the hub, each turn at most a few hundred records of the flood.
            assert reported() < FLOOD_RECORDS
            assert during < 20 * 1000, f"{during} records processed during 20 round trips"
            with gevent.Timeout(60, AssertionError("the flood was not processed in time")):
                while reported() < FLOOD_RECORDS:
                    gevent.sleep(0.01)
            canary.close()
        finally:
            flood.stdin.close()
            flood.wait(timeout=10)


def test_client_records_beyond_max_clients_reported_are_dropped_with_one_error():
    with running_glb(backends={"max_clients_reported": "3"}) as glb:
        seen = Recorder(glb, "server_ready", "error")
        ws = register(glb, "b1", 9001, seen, clients=[f"c{i}" for i in range(6)])
        backend = glb.registry.get("b1")
        assert sorted(backend.reported_clients) == ["c0", "c1", "c2"]
        assert backend.state == READY  # still in the pool
        errors = seen.of("error")
        assert len(errors) == 1 and "max_clients_reported" in errors[0].error
        ws.send(records.encode_client(False, "c0"))
        ws.send(records.encode_client(True, "c9"))  # room again
        ws.send(records.encode_client(True, "c10"))
        with gevent.Timeout(5):
            while "c9" not in backend.reported_clients:
                gevent.sleep(0.01)
        assert sorted(backend.reported_clients) == ["c1", "c2", "c9"]
        ws.close()


def test_bindings_beyond_max_bindings_close_the_channel_with_1008():
    with running_glb(backends={"max_bindings": "2"}) as glb:
        seen = Recorder(glb, "error")
        ws = open_channel(glb)
        ws.send(records.encode_server_data("b1"))
        for port in (9001, 9002, 9003):
            ws.send(records.encode_binding("127.0.0.1", port))
        code, reason = closed_with(ws)
        assert code == CloseCode.POLICY_VIOLATION and "max_bindings" in reason
        assert "max_bindings" in seen.wait("error")[0].error
        assert glb.registry.get("b1") is None


def test_a_channel_glb_closes_leaves_the_pool_at_once_so_its_guid_can_register_again():
    with running_glb(glb={"max_message_size": "1024"}) as glb:
        seen = Recorder(glb, "server_ready")
        old = register(glb, "b1", 9001, seen)
        old.send("x" * 2048)  # over max_message_size: glb closes with 1009
        # Read glb's close frame off the socket without answering it or closing TCP (a backend
        # that is slow to let go): glb now waits for our EOF before it closes its side.
        head = old.sock.recv(4)
        assert head[0] == 0x88 and int.from_bytes(head[2:4], "big") == CloseCode.MESSAGE_TOO_BIG
        again = open_channel(glb)
        again.send(records.encode_server_data("b1"))
        again.send(records.encode_binding("127.0.0.1", 9002))
        again.send(records.READY)
        ready = seen.wait("server_ready", count=2)[1]
        assert ready.backend.guid == "b1" and ready.backend.bindings[0].port == 9002
        assert not again.closed
        again.close()
        old.sock.close()
