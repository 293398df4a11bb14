"""Client sessions end to end: real clients, a real glb and real backends on 127.0.0.1."""

import socket
import struct

import gevent
import gevent.event
import gevent.queue
import gevent.server
import pytest
import websocket

from glb.errors import CloseCode
from glb.frames import OP_BINARY, OP_CONTINUATION, OP_TEXT
from tests.backends import ScriptedBackend, recording_close, recording_frames, started
from tests.support import RawClient, base_url, recv_close, running_glb, ws_connect


def pool(*backends, **sections):
    """running_glb with these backends as static ones."""
    for index, backend in enumerate(backends):
        sections[f"backend:b{index}"] = backend.static_section()
    return running_glb(**sections)


def recorder(balancer, name):
    seen, done = [], gevent.event.Event()

    def record(event):
        seen.append(event)
        done.set()
    balancer.bus.add_handler(name, record, origin="test")
    return seen, done


# -- pairing -----------------------------------------------------------------

def test_text_and_binary_relayed_unchanged_with_path_query_and_headers():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        ws = ws_connect(base_url(glb) + "/chat/room?user=ann", cookie="session=abc",
                        header=["X-Custom: 1"])
        ws.send("héllo")
        assert ws.recv() == "héllo"
        ws.send_binary(b"\x00\x01\xff")
        assert ws.recv() == b"\x00\x01\xff"
        ws.close()
        environ = backend.environs.get(timeout=5)
        assert environ["PATH_INFO"] == "/chat/room" and environ["QUERY_STRING"] == "user=ann"
        assert environ["HTTP_COOKIE"] == "session=abc" and environ["HTTP_X_CUSTOM"] == "1"
        assert environ["HTTP_X_FORWARDED_FOR"] == "127.0.0.1"
        assert environ["HTTP_X_FORWARDED_PROTO"] == "http"
        assert environ["HTTP_X_FORWARDED_HOST"] == "%s:%s" % glb.addresses[0]


def test_backend_chooses_the_subprotocol():
    def serve(ws, environ):
        ws.send(environ.get("HTTP_SEC_WEBSOCKET_PROTOCOL", ""))
        ws.receive()
    backend = ScriptedBackend(serve, subprotocol="v2")
    with started(backend), pool(backend) as glb:
        ws = ws_connect(base_url(glb) + "/", subprotocols=["v1", "v2"])
        assert ws.getsubprotocol() == "v2"
        assert [p.strip() for p in ws.recv().split(",")] == ["v1", "v2"]
        ws.close()


def test_backend_refusing_with_403_gives_the_client_403():
    backend = ScriptedBackend(refuse=(403, b"go away"))
    with started(backend), pool(backend) as glb:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(base_url(glb) + "/")
        assert refused.value.status_code == 403
        assert refused.value.resp_body == b"go away"


def test_no_backend_gives_503():
    with running_glb() as glb:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(base_url(glb) + "/")
        assert refused.value.status_code == 503


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_backend_is_skipped_for_another():
    backend = ScriptedBackend()
    with started(backend), running_glb(**{"glb": {"balancing": "round_robin"},
                                          "backend:dead": {"url": f"ws://127.0.0.1:{free_port()}"},
                                          "backend:live": backend.static_section()}) as glb:
        errors, _ = recorder(glb, "error")
        for _ in range(4):  # round robin meets the dead one at least once
            ws = ws_connect(base_url(glb) + "/")
            ws.send("x")
            assert ws.recv() == "x"
            ws.close()
        assert any("unreachable" in event.error for event in errors)


def test_every_backend_unreachable_gives_502():
    with running_glb(**{"backend:dead": {"url": f"ws://127.0.0.1:{free_port()}"}}) as glb:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(base_url(glb) + "/")
        assert refused.value.status_code == 502


# -- closing -----------------------------------------------------------------

@pytest.mark.parametrize("code,reason", [(1000, "done"), (1001, "leaving"), (4001, "bye")])
def test_client_close_code_and_reason_reach_the_backend_and_come_back(code, reason):
    closes = gevent.queue.Queue()

    backend = ScriptedBackend(recording_close(closes))
    with started(backend), pool(backend) as glb:
        disconnects, done = recorder(glb, "client_disconnect")
        ws = ws_connect(base_url(glb) + "/")
        ws.send_close(code, reason.encode())
        assert recv_close(ws) == (code, reason)
        assert closes.get(timeout=5) == (code, reason)
        assert done.wait(5)
        event = disconnects[0]
        assert (event.code, event.reason, event.closed_by) == (code, reason, "client")
        ws.shutdown()


@pytest.mark.parametrize("code,reason", [(1000, "done"), (1001, "restarting"), (4001, "kicked")])
def test_backend_close_code_and_reason_reach_the_client(code, reason):
    def serve(ws, environ):
        ws.receive()
        ws.close(code, reason)
    backend = ScriptedBackend(serve)
    with started(backend), pool(backend) as glb:
        disconnects, done = recorder(glb, "client_disconnect")
        ws = ws_connect(base_url(glb) + "/")
        ws.send("go")
        assert recv_close(ws) == (code, reason)
        ws.send_close(code, reason.encode())
        assert done.wait(5)
        event = disconnects[0]
        assert (event.code, event.reason, event.closed_by) == (code, reason, "backend")
        ws.shutdown()


def test_backend_killed_mid_session_gives_client_1014_with_reason():
    def serve(ws, environ):
        ws.receive()
        ws.abort()  # TCP closed, no close frame
    backend = ScriptedBackend(serve)
    with started(backend), pool(backend) as glb:
        disconnects, done = recorder(glb, "client_disconnect")
        ws = ws_connect(base_url(glb) + "/")
        ws.send("die")
        code, reason = recv_close(ws)
        assert code == CloseCode.BAD_GATEWAY and reason
        assert done.wait(5)
        assert (disconnects[0].closed_by, disconnects[0].code) == ("backend", CloseCode.BAD_GATEWAY)
        assert len(disconnects) == 1
        ws.shutdown()


def test_client_vanishing_gives_backend_1001():
    closes = gevent.queue.Queue()

    backend = ScriptedBackend(recording_close(closes))
    with started(backend), pool(backend) as glb:
        disconnects, done = recorder(glb, "client_disconnect")
        ws = ws_connect(base_url(glb) + "/")
        ws.send("x")
        ws.sock.close()  # no close frame
        assert closes.get(timeout=5) == (CloseCode.GOING_AWAY, "client went away")
        assert done.wait(5)
        assert disconnects[0].closed_by == "client"


def test_client_protocol_error_is_judged_by_the_backend_as_without_glb():
    closes = gevent.queue.Queue()

    backend = ScriptedBackend(recording_close(closes, with_reason=False))
    with started(backend), pool(backend) as glb:
        errors, _ = recorder(glb, "error")
        client = RawClient(glb.addresses[0], path="/")
        client.send_frame(OP_TEXT, b"unmasked", mask=False)
        assert client.read_close()[0] == CloseCode.PROTOCOL_ERROR
        assert closes.get(timeout=5) == CloseCode.PROTOCOL_ERROR
        assert any("broke the protocol" in event.error for event in errors)
        client.close()


def test_protocol_error_with_a_decoding_handler_is_answered_by_glb():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        glb.bus.add_handler("client_message", lambda event: None)
        client = RawClient(glb.addresses[0], path="/")
        client.send_frame(OP_TEXT, b"\xff\xfe")
        assert client.read_close()[0] == CloseCode.INVALID_DATA
        client.close()


def test_message_over_max_size_from_client_gets_1009():
    backend = ScriptedBackend()
    with started(backend), pool(backend, glb={"max_message_size": "1000"}) as glb:
        client = RawClient(glb.addresses[0], path="/")
        client.send_frame(OP_BINARY, b"a" * 600, fin=False)
        client.send_frame(OP_CONTINUATION, b"a" * 600)
        assert client.read_close()[0] == CloseCode.MESSAGE_TOO_BIG
        client.close()


def test_shutdown_closes_relayed_sessions_with_1001_on_both_legs():
    closes = gevent.queue.Queue()

    backend = ScriptedBackend(recording_close(closes, with_reason=False))
    with started(backend):
        with pool(backend) as glb:
            ws = ws_connect(base_url(glb) + "/")
            stopper = gevent.spawn(glb.stop, 5)
            assert recv_close(ws) == (1001, "going away")
            ws.send_close(1001)
            assert closes.get(timeout=5) == CloseCode.GOING_AWAY
            stopper.join(5)
            assert stopper.ready()


# -- fidelity ----------------------------------------------------------------

def test_fragments_pass_through_as_fragments():
    frames = gevent.queue.Queue()

    backend = ScriptedBackend(recording_frames(frames))
    with started(backend), pool(backend) as glb:
        client = RawClient(glb.addresses[0], path="/")
        client.send_frame(OP_TEXT, b"ab", fin=False)
        client.send_frame(OP_CONTINUATION, b"cd", fin=False)
        client.send_frame(OP_CONTINUATION, b"ef", fin=True)
        got = [frames.get(timeout=5) for _ in range(3)]
        assert got == [(OP_TEXT, False, b"ab"), (OP_CONTINUATION, False, b"cd"),
                       (OP_CONTINUATION, True, b"ef")]
        client.close()


def test_pings_and_pongs_pass_through():
    def serve(ws, environ):
        ws.auto_pong = True
        ws.receive()
    backend = ScriptedBackend(serve)
    with started(backend), pool(backend) as glb:
        ws = ws_connect(base_url(glb) + "/")
        ws.ping(b"are you there")
        opcode, data = ws.recv_data(control_frame=True)
        assert (opcode, data) == (websocket.ABNF.OPCODE_PONG, b"are you there")
        ws.close()


def rss_kib():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])


@pytest.mark.timeout(120)
def test_50_mib_fragmented_message_relayed_without_glb_buffering_it():
    total = gevent.queue.Queue()

    def serve(ws, environ):
        received = 0
        while True:
            frame = ws.receive_frame()
            if frame is None or frame.opcode not in (OP_BINARY, OP_CONTINUATION):
                return
            received += len(frame.payload)
            if frame.fin:
                total.put(received)
                ws.send(str(received))
    backend = ScriptedBackend(serve, max_message_size=64 << 20)
    with started(backend), pool(backend, glb={"max_message_size": str(64 << 20)}) as glb:
        ws = ws_connect(base_url(glb) + "/")
        chunk = bytes(range(256)) * 4096  # 1 MiB
        baseline = rss_kib()
        peak = [baseline]
        sampler = gevent.spawn(lambda: [peak.append(rss_kib()) or gevent.sleep(0.01) for _ in range(100000)])
        ws.send_frame(websocket.ABNF.create_frame(chunk, websocket.ABNF.OPCODE_BINARY, fin=0))
        for _ in range(48):
            ws.send_frame(websocket.ABNF.create_frame(chunk, websocket.ABNF.OPCODE_CONT, fin=0))
        ws.send_frame(websocket.ABNF.create_frame(chunk, websocket.ABNF.OPCODE_CONT, fin=1))
        assert total.get(timeout=60) == 50 << 20
        assert ws.recv() == str(50 << 20)
        sampler.kill()
        grown_mib = (max(peak) - baseline) / 1024
        print(f"peak RSS growth while relaying 50 MiB: {grown_mib:.1f} MiB")
        assert grown_mib < 16  # client, glb and backend together: one 1 MiB frame at a time each
        ws.close()


@pytest.mark.parametrize("decoded", [False, True])
def test_a_client_that_stops_reading_does_not_stall_another(decoded):
    def flood(ws, environ):
        if environ.get("PATH_INFO") == "/flood":
            payload = b"x" * 65536
            try:
                for _ in range(2000):  # 128 MiB at most: more than any socket buffer holds
                    ws.send(payload)
            except Exception:
                return
            ws.receive()
            return
        while True:
            message = ws.receive()
            if message is None:
                return
            ws.send(message)
    backend = ScriptedBackend(flood)
    with started(backend), pool(backend, glb={"send_timeout": "1"}) as glb:
        if decoded:  # both directions decoded: the same engine, frames re-encoded
            glb.bus.add_handler("raw_message", lambda event: None, origin="test")
        disconnects, _ = recorder(glb, "client_disconnect")
        stalled = ws_connect(base_url(glb) + "/flood")  # never reads
        lively = ws_connect(base_url(glb) + "/echo")
        for index in range(200):
            lively.send(f"m{index}")
            assert lively.recv() == f"m{index}"
        deadline = gevent.Timeout(10)
        with deadline:
            while not any(event.connection.path == "/flood" for event in disconnects):
                gevent.sleep(0.05)
        slow = [event for event in disconnects if event.connection.path == "/flood"][0]
        assert (slow.code, slow.closed_by) == (CloseCode.POLICY_VIOLATION, "glb")
        assert "slow reader" in slow.reason
        lively.close()
        stalled.sock.close()


# -- hot-path events ---------------------------------------------------------

def test_client_message_handler_uppercases_and_drops():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        def upper(event):
            if event.text == "drop me":
                event.handled = True
            else:
                event.text = event.text.upper()
        glb.bus.add_handler("client_message", upper, origin="test")
        ws = ws_connect(base_url(glb) + "/")
        ws.send("drop me")
        ws.send("hello")
        assert ws.recv() == "HELLO"
        ws.send_binary(b"bin")  # binary is not client_message's
        assert ws.recv() == b"bin"
        ws.close()


@pytest.mark.parametrize("handler", [None, "client_message"])
def test_an_idle_session_raw_or_decoded_parks_no_greenlet(handler):
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        if handler:
            glb.bus.add_handler(handler, lambda event: None, origin="test")
        connects, connected = recorder(glb, "client_connect")
        ws = ws_connect(base_url(glb) + "/")
        assert connected.wait(5)
        ws.send("hello")
        assert ws.recv() == "hello"
        with gevent.Timeout(5):  # the greenlet that accepted it returns; io watchers carry the session
            while len(glb.sessions):
                gevent.sleep(0.01)
        ws.send("still relayed")
        assert ws.recv() == "still relayed"
        ws.close()


def test_client_binary_handler_changes_bytes():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        glb.bus.add_handler("client_binary", lambda event: setattr(event, "data", event.data[::-1]))
        ws = ws_connect(base_url(glb) + "/")
        ws.send_binary(b"abc")
        assert ws.recv() == b"cba"
        ws.close()


def test_raw_message_fires_for_both_directions_before_client_message():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        order = []
        glb.bus.add_handler("raw_message", lambda e: order.append(("raw", e.source, e.text)))
        glb.bus.add_handler("client_message", lambda e: order.append(("client", e.text)))
        ws = ws_connect(base_url(glb) + "/")
        ws.send("hi")
        assert ws.recv() == "hi"
        ws.close()
        assert order == [("raw", "client", "hi"), ("client", "hi"), ("raw", "backend", "hi")]


def test_client_fragmented_fires_per_fragment_and_can_drop():
    frames = gevent.queue.Queue()

    backend = ScriptedBackend(recording_frames(frames))
    with started(backend), pool(backend) as glb:
        seen = []

        def on_fragment(event):
            seen.append((event.data, event.continuation, event.final))
        glb.bus.add_handler("client_fragmented", on_fragment)
        client = RawClient(glb.addresses[0], path="/")
        client.send_frame(OP_BINARY, b"ab", fin=False)
        client.send_frame(OP_CONTINUATION, b"cd", fin=True)
        assert [frames.get(timeout=5) for _ in range(2)] == [(OP_BINARY, False, b"ab"),
                                                              (OP_CONTINUATION, True, b"cd")]
        assert seen == [(b"ab", False, False), (b"cd", True, True)]
        client.close()


def test_client_connect_and_disconnect_fire_once_with_the_backend():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        connects, _ = recorder(glb, "client_connect")
        disconnects, _ = recorder(glb, "client_disconnect")
        _, gone = recorder(glb, "disconnect")  # fired last, once the session has ended everywhere
        ws = ws_connect(base_url(glb) + "/")
        ws.send("x")
        ws.recv()
        ws.close()
        assert gone.wait(5)
        assert not glb.client_sessions and not glb.connections  # nothing left that could fire again
        assert len(connects) == 1 and len(disconnects) == 1
        assert connects[0].backend is disconnects[0].backend
        assert connects[0].backend.guid == "b0"


def test_client_connect_handler_may_close_the_session():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        glb.bus.add_handler("client_connect", lambda e: e.session.close(4003, "not today"))
        ws = ws_connect(base_url(glb) + "/")
        assert recv_close(ws) == (4003, "not today")
        ws.shutdown()


# -- keep-alive and idle ------------------------------------------------------

def test_idle_session_is_closed():
    backend = ScriptedBackend()
    with started(backend), pool(backend, glb={"idle_timeout": "0.3", "ping_interval": "0"}) as glb:
        disconnects, done = recorder(glb, "client_disconnect")
        ws = ws_connect(base_url(glb) + "/")
        assert recv_close(ws) == (CloseCode.GOING_AWAY, "idle timeout")
        ws.send_close(CloseCode.GOING_AWAY)
        assert done.wait(5)
        assert disconnects[0].closed_by == "glb"
        ws.shutdown()


def test_keep_alive_pings_reach_a_quiet_client_and_a_silent_one_is_closed():
    backend = ScriptedBackend()
    with started(backend), pool(backend, glb={"ping_interval": "0.2", "ping_timeout": "0.3"}) as glb:
        connects, connected = recorder(glb, "client_connect")
        answering = ws_connect(base_url(glb) + "/")  # websocket-client answers pings while reading
        assert connected.wait(5)
        leg = connects[0].session.client
        reader = gevent.spawn(answering.recv)
        silent = RawClient(glb.addresses[0], path="/")  # reads frames, never answers a ping
        frame = silent.read_frame()
        if frame == (0xA, b"glb"):  # the backend's answer to glb's ping on that leg, relayed as it is
            frame = silent.read_frame()
        assert frame == (0x9, b"glb")
        code, reason = silent.read_close()
        assert code == CloseCode.INTERNAL_ERROR and "ping" in reason
        with gevent.Timeout(5):  # pinged too, and its pong reached glb
            while leg.ping_sent is None or not leg.answered_since(leg.ping_sent):
                gevent.sleep(0.01)
        answering.send("still here")  # so its session lives on
        assert reader.get(timeout=5) == "still here"
        answering.close()
        silent.close()


def test_sessions_are_counted_on_their_backend():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        disconnects, done = recorder(glb, "client_disconnect")
        ws = ws_connect(base_url(glb) + "/")
        ws.send("x")
        ws.recv()
        assert glb.registry.get("b0").relayed == 1
        ws.close()
        assert done.wait(5)
        assert glb.registry.get("b0").relayed == 0


def test_raw_socket_garbage_after_handshake_does_not_disturb_others():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        good = ws_connect(base_url(glb) + "/")
        bad = RawClient(glb.addresses[0], path="/")
        bad.sock.sendall(struct.pack("!BB", 0x8F, 0x80) + b"\0\0\0\0")  # reserved opcode 0xF
        assert bad.read_close()[0] == CloseCode.PROTOCOL_ERROR
        good.send("fine")
        assert good.recv() == "fine"
        good.close()
        bad.close()


# -- failures while pairing ----------------------------------------------------

def wait_until(condition, seconds=5):
    """Poll ``condition`` until it holds; fail the test after ``seconds``."""
    with gevent.Timeout(seconds, AssertionError("condition not met in time")):
        while not condition():
            gevent.sleep(0.01)


def test_a_bad_handshake_header_from_a_handler_refuses_the_upgrade_and_frees_the_backend():
    closes = gevent.queue.Queue()
    backend = ScriptedBackend(recording_close(closes))
    with started(backend), pool(backend) as glb:
        glb.registry.get("b0").max_clients = 1

        def bad_header(event):
            event.response_headers["X-Snowman"] = "\u2603"  # not Latin-1: cannot go in a 101
        glb.bus.add_handler("handshake", bad_header, origin="test")
        errors, _ = recorder(glb, "error")
        for _ in range(3):  # with a leaked slot the second attempt would find the backend full
            with pytest.raises(websocket.WebSocketBadStatusException) as refused:
                ws_connect(base_url(glb) + "/")
            assert refused.value.status_code == 500
            assert closes.get(timeout=5) == (CloseCode.GOING_AWAY, "client went away")
        assert glb.registry.get("b0").relayed == 0
        assert any("X-Snowman" in event.error for event in errors)


def test_a_header_name_or_value_with_cr_lf_from_a_handler_is_refused():
    backend = ScriptedBackend()
    with started(backend), pool(backend) as glb:
        def split_header(event):
            event.response_headers["X-Ok"] = "1\r\nX-Injected: yes"
        glb.bus.add_handler("handshake", split_header, origin="test")
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(base_url(glb) + "/")
        assert refused.value.status_code == 500
        wait_until(lambda: glb.registry.get("b0").relayed == 0)


class RawBackend:
    """A TCP server that answers every connection with fixed bytes, then reads until EOF."""

    def __init__(self, answer):
        self.answer = answer
        self.closed = gevent.event.Event()  # set when glb closes a connection
        self.server = gevent.server.StreamServer(("127.0.0.1", 0), self.serve)

    def serve(self, sock, address):
        sock.recv(65536)
        sock.sendall(self.answer)
        while sock.recv(65536):
            pass
        self.closed.set()

    def static_section(self):
        return {"url": f"ws://127.0.0.1:{self.server.address[1]}"}

    def start(self):
        self.server.start()

    def stop(self, timeout=1):
        self.server.stop(timeout=timeout)


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 4\xb23 Weird\r\nContent-Length: 0\r\n\r\n",  # superscript two: isdigit() but not int()
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 1\xb2\r\n\r\nx",
    b"HTTP/1.1 40 Short\r\n\r\n",
    b"HTTP/1.1 +403 Signed\r\n\r\n",
])
def test_a_malformed_backend_answer_is_a_failed_backend_and_the_next_one_is_tried(answer):
    bad, good = RawBackend(answer), ScriptedBackend()
    with started(bad, good), running_glb(**{"glb": {"balancing": "round_robin"},
                                            "backend:a": bad.static_section(),
                                            "backend:b": good.static_section()}) as glb:
        errors, _ = recorder(glb, "error")
        ws = ws_connect(base_url(glb) + "/")  # round robin starts with "a", the bad one
        ws.send("x")
        assert ws.recv() == "x"
        ws.close()
        assert bad.closed.wait(5)  # glb let go of the bad backend's socket
        assert any("unreachable" in event.error or "malformed" in event.error for event in errors)


def test_a_malformed_backend_answer_alone_gives_502():
    bad = RawBackend(b"HTTP/1.1 4\xb23 Weird\r\n\r\n")
    with started(bad), running_glb(**{"backend:a": bad.static_section()}) as glb:
        with pytest.raises(websocket.WebSocketBadStatusException) as refused:
            ws_connect(base_url(glb) + "/")
        assert refused.value.status_code == 502


def test_a_session_streaming_to_a_client_that_does_not_read_ends_as_a_slow_reader_not_idle():
    def flood(ws, environ):
        try:
            for _ in range(4000):  # 256 MiB at most: more than any socket buffer holds
                ws.send(b"x" * 65536)
        except Exception:
            return
    backend = ScriptedBackend(flood)
    settings = {"idle_timeout": "0.2", "send_timeout": "1.5", "ping_interval": "0"}
    with started(backend), pool(backend, glb=settings) as glb:
        disconnects, done = recorder(glb, "client_disconnect")
        stalled = ws_connect(base_url(glb) + "/")  # never reads
        assert done.wait(10)
        event = disconnects[0]
        assert (event.code, event.closed_by) == (CloseCode.POLICY_VIOLATION, "glb"), event.reason
        assert "slow reader" in event.reason
        stalled.sock.close()
