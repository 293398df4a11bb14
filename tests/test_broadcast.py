"""Broadcast across backends: envelopes relayed by glb, glb's own API, the agent and the demo.

Everything runs on 127.0.0.1 with real sockets; the first test uses real processes
(``python -m glb`` and two ``python -m glb.demo_backend``). No test sleeps to guess at
timing: each waits for an event, a received message, or a condition with a deadline.
"""

import os
import socket
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.event
import pytest
import requests
import websocket

from glb import broadcast, relay
from glb import control_records as records
from glb.agent import Agent, encode_envelope, select_clients
from glb.control_records import ClientRecord, RecordError
from glb.demo_backend import DemoBackend
from glb.errors import CloseCode
from glb.frames import OP_BINARY, OP_CONTINUATION, OP_PING, encode_frame
from tests.backends import ScriptedBackend, started
from tests.support import base_url, free_port, Recorder, running_glb, ws_connect
from tests.control_peer import closed_with, open_channel, received, register

ROOT = Path(__file__).resolve().parent.parent


def wait_until(condition, timeout=10, what="condition"):
    """Poll ``condition`` until true (for state in another process, which sends no event)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout} s")
        gevent.sleep(0.02)


def demo_client(backend, path="/"):
    """A client connected straight to a demo backend, known to it once this returns (whoami answered)."""
    ws = ws_connect(f"ws://127.0.0.1:{backend.port}{path}")
    ws.send("whoami")
    assert ws.recv() == backend.guid
    return ws


def close_all(*clients):
    for ws in clients:
        ws.close()


def demo_pair(glb):
    """Two demo backends registered with ``glb`` (in this process, real sockets)."""
    seen = Recorder(glb, "server_ready")
    pair = (DemoBackend(lb_urls=[base_url(glb)], guid="A"), DemoBackend(lb_urls=[base_url(glb)], guid="B"))
    return seen, pair


# -- the headline, with real processes ----------------------------------------------------

@pytest.mark.timeout(40)
def test_broadcast_from_a_client_on_backend_a_reaches_clients_of_a_and_b_real_processes(tmp_path):
    glb_port, ports = free_port(), (free_port(), free_port())
    config = tmp_path / "lb.ini"
    config.write_text(f"[glb]\nlisten = 127.0.0.1:{glb_port}\nbalancing = round_robin\nlog_level = info\n"
                      "[handlers]\nmodules =\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    processes, logs = [], []

    def spawn(name, *args):
        log = open(tmp_path / f"{name}.log", "w+b")
        logs.append(log)
        processes.append(subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env,
                                          stdout=log, stderr=subprocess.STDOUT))

    def offered_ports():
        url = f"http://127.0.0.1:{glb_port}/sgc@lb@client@get@binding"
        try:
            answers = [requests.get(url, timeout=2) for _ in range(4)]
        except requests.ConnectionError:
            return set()
        return {a.json()["port"] for a in answers if a.status_code == 200}

    try:
        spawn("glb", "glb", str(config))
        for port, guid in zip(ports, ("proc-a", "proc-b")):
            spawn(guid, "glb.demo_backend", "--port", str(port), "--lb", f"ws://127.0.0.1:{glb_port}",
                  "--guid", guid)
        wait_until(lambda: offered_ports() == set(ports), timeout=20, what="both backends ready in glb")

        on_a = ws_connect(f"ws://127.0.0.1:{ports[0]}/")
        on_b = ws_connect(f"ws://127.0.0.1:{ports[1]}/")
        through_glb = ws_connect(f"ws://127.0.0.1:{glb_port}/room")
        for ws, expected in ((on_a, {"proc-a"}), (on_b, {"proc-b"}), (through_glb, {"proc-a", "proc-b"})):
            ws.send("whoami")  # answered: the backend knows this client
            assert ws.recv() in expected

        on_a.send("broadcast:hi")
        assert on_a.recv() == "hi"  # the sender's own backend, through glb and back
        assert on_b.recv() == "hi"
        assert through_glb.recv() == "hi"  # a client relayed by glb, on whichever backend
        for ws in (on_a, on_b, through_glb):
            ws.close()
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
    output = b"".join(log.seek(0) or log.read() for log in logs).decode(errors="replace")
    for log in logs:
        log.close()
    assert "Traceback" not in output, output
    assert all(p.returncode == 0 for p in processes), output


# -- the relay on glb ---------------------------------------------------------------------------

def test_a_message_handler_that_marks_handled_stops_the_relay():
    with running_glb() as glb:
        seen, (a, b) = demo_pair(glb)
        handled = []

        def keep_secret(event):
            if records.parse_text_envelope(event.text).payload == "secret":
                event.handled = True
                handled.append(event)

        glb.bus.add_handler("message", keep_secret, origin="test")
        with started(a, b):
            seen.wait("server_ready", count=2)
            on_a, on_b = demo_client(a), demo_client(b)
            on_a.send("broadcast:secret")
            on_a.send("broadcast:public")
            # Per-sender order is kept, so "secret" would have arrived first had it been relayed.
            assert on_a.recv() == "public" and on_b.recv() == "public"
            assert len(handled) == 1 and handled[0].connection.kind == "control"
            close_all(on_a, on_b)


def test_a_binary_handler_that_marks_handled_stops_the_relay():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "binary")
        glb.bus.add_handler("binary", lambda e: setattr(e, "handled", e.data.endswith(b"secret")),
                            origin="test")
        a = register(glb, "a", 9001, seen)
        b = register(glb, "b", 9002, seen)
        a.send(records.encode_binary_envelope("", b"secret"))
        a.send(records.encode_binary_envelope("", b"public"))
        assert received(b) == received(a) == records.encode_binary_envelope("", b"public")
        assert len(seen.wait("binary", count=2)) == 2
        a.close()
        b.close()


@pytest.mark.parametrize("bad,error_part", [
    ("12x", "3 ASCII digits"),
    ("999{}", "longer than the message"),
    ('010{"guid":1}xx', "must be a string"),
    (b"12345", "10 ASCII digits"),
    (b"0000000004\xff\xfe\xfd\xfcpayload", "not valid UTF-8"),
])
def test_a_malformed_envelope_fires_error_and_the_channel_stays_up(bad, error_part):
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "error", "message", "binary", "server_disconnect")
        sender = register(glb, "raw", 9001, seen)
        demo = DemoBackend(lb_urls=[base_url(glb)], guid="demo")
        with started(demo):
            seen.wait("server_ready", count=2)
            client = demo_client(demo)
            sender.send(bad)
            error = seen.wait("error")[0]
            assert error_part in error.error and error.connection.kind == "control"
            assert seen.of("message") == seen.of("binary") == []  # parsed before any event: dropped
            sender.send(records.encode_text_envelope("after"))  # the same channel still relays
            assert client.recv() == "after"
            assert received(sender) == records.encode_text_envelope("after")
            assert seen.of("server_disconnect") == [] and not sender.closed
            client.close()
        sender.close()


def test_envelopes_from_one_backend_reach_every_backend_in_the_order_sent():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        channels = [register(glb, name, 9001 + i, seen) for i, name in enumerate("abc")]
        sent = [records.encode_text_envelope(f"m{i}") for i in range(300)]
        sent[150] = records.encode_binary_envelope("", b"binary in the middle")
        sender = gevent.spawn(lambda: [channels[0].send(e) for e in sent])
        for ws in channels:
            assert [received(ws) for _ in sent] == sent
        sender.get(timeout=5)
        for ws in channels:
            ws.close()


def test_draining_backends_get_envelopes_and_not_yet_ready_ones_do_not():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        a = register(glb, "a", 9001, seen)
        draining = register(glb, "d", 9002, seen)
        glb.registry.drain("d")
        pending = open_channel(glb)
        pending.send(records.encode_server_data("p"))
        wait_until(lambda: "p" in glb.control_channels, timeout=5, what="server data applied")
        first, second = records.encode_text_envelope("first"), records.encode_text_envelope("second")
        a.send(first)
        assert received(a) == first and received(draining) == first
        pending.send(records.READY)
        seen.wait("server_ready", count=3)
        a.send(second)
        assert received(pending) == second  # "first" never reached it
        for ws in (a, draining, pending):
            ws.close()


def test_a_backend_that_does_not_read_is_closed_1008_without_stalling_the_others(monkeypatch):
    monkeypatch.setattr(broadcast, "CLOSE_WAIT", 0.2)  # its write is stuck: no close frame gets through
    with running_glb(backends={"max_outbox_bytes": 4 << 20}) as glb:
        seen = Recorder(glb, "server_ready", "error", "server_disconnect")
        sender = register(glb, "sender", 9001, seen)
        other = register(glb, "other", 9002, seen)
        stuck = register(glb, "stuck", 9003, seen)  # never reads: its socket buffers fill, then its Outbox
        big = [records.encode_text_envelope(f"{i:04d}" + "x" * (1 << 20)) for i in range(24)]
        got = {"sender": [], "other": []}
        progress = gevent.event.Event()

        def read(name, ws):
            for _ in big:
                got[name].append(received(ws, timeout=10)[:25])
                progress.set()

        readers = [gevent.spawn(read, "sender", sender), gevent.spawn(read, "other", other)]
        for i, envelope in enumerate(big):
            # A well-behaved sender: at most 2 envelopes ahead of the backends that read.
            while min(map(len, got.values())) < i - 1:
                progress.clear()
                assert progress.wait(10), "the reading backends stalled"
            sender.send(envelope)
        gone = seen.wait("server_disconnect", timeout=10)[0]
        assert gone.backend.guid == "stuck" and gone.code == CloseCode.POLICY_VIOLATION
        assert any(broadcast.SLOW_CONSUMER in e.error for e in seen.of("error"))
        gevent.joinall(readers, timeout=15, raise_error=True)
        expected = [e[:25] for e in big]
        assert got["sender"] == expected and got["other"] == expected  # all of them, in order
        assert "stuck" not in glb.control_channels and glb.registry.get("stuck") is None
        with gevent.Timeout(10):  # reading at last, it finds the end of the channel, not the rest
            count = 0
            while stuck.receive() is not None:
                count += 1
        assert count < len(big) and stuck.close_code in (CloseCode.POLICY_VIOLATION, CloseCode.ABNORMAL)
        sender.close()
        other.close()


# -- glb's own API ------------------------------------------------------------------------------

def test_write_backend_client_reaches_only_that_client():
    with running_glb() as glb:
        seen, (a, b) = demo_pair(glb)
        with started(a, b):
            seen.wait("server_ready", count=2)
            a1, a2, b1 = demo_client(a), demo_client(a), demo_client(b)
            assert glb.write_backend_client("A-1", "just you") == 2  # an envelope to both ready backends
            assert glb.broadcast("marker") == 2
            assert a1.recv() == "just you" and a1.recv() == "marker"
            assert a2.recv() == "marker" and b1.recv() == "marker"  # "just you" would have come first

            assert glb.write_backend_client("B-1", b"\x00bytes") == 2  # a binary envelope with that target
            glb.broadcast(b"\x01marker")
            assert b1.recv() == b"\x00bytes" and b1.recv() == b"\x01marker"
            assert a1.recv() == b"\x01marker" and a2.recv() == b"\x01marker"
            close_all(a1, a2, b1)


def test_broadcast_filters_reach_the_backends_clients_through_the_agent():
    with running_glb() as glb:
        seen, (a, b) = demo_pair(glb)
        with started(a, b):
            seen.wait("server_ready", count=2)
            news_a, plain_a = demo_client(a, "/?channel=news"), demo_client(a)
            news_b, plain_b = demo_client(b, "/?channel=news"), demo_client(b)
            assert glb.broadcast("headline", channel="news") == 2
            assert glb.broadcast("to all but one", exclude=["B-2", "nobody"]) == 2
            glb.broadcast("marker")
            assert [news_a.recv(), news_a.recv(), news_a.recv()] == ["headline", "to all but one", "marker"]
            assert [news_b.recv(), news_b.recv(), news_b.recv()] == ["headline", "to all but one", "marker"]
            assert [plain_a.recv(), plain_a.recv()] == ["to all but one", "marker"]
            assert plain_b.recv() == "marker"
            with pytest.raises(RecordError, match="text only"):
                glb.broadcast(b"bytes", channel="news")
            close_all(news_a, plain_a, news_b, plain_b)


def test_write_data_to_glbs_own_connections():
    backend = ScriptedBackend()
    with started(backend), running_glb(**{"backend:b0": backend.static_section()}) as glb:
        seen = Recorder(glb, "server_ready", "client_connect", "connect", "disconnect")
        relayed = ws_connect(base_url(glb) + "/chat")
        session = seen.wait("client_connect")[0].connection
        echo = ws_connect(base_url(glb) + "/glb/echo")
        control = register(glb, "c", 9001, seen)
        own = next(e.connection for e in seen.of("connect") if e.connection.path == "/glb/echo")
        channel = glb.control_channels["c"].conn

        assert glb.write_data(session.id, "from glb") == 1
        assert relayed.recv() == "from glb"
        assert glb.write_data(session.id, b"\x00\xff") == 1
        assert relayed.recv() == b"\x00\xff"
        relayed.send("still relayed")  # the stream is intact both ways
        assert relayed.recv() == "still relayed"
        assert glb.write_data(own.id, "to the echo client") == 1
        assert echo.recv() == "to the echo client"
        assert glb.write_data(channel.id, "to a control channel") == 1
        assert received(control) == "to a control channel"

        relayed.close()
        seen.wait("disconnect", match=lambda e: e.connection is session)
        assert glb.write_data(session.id, "gone") == 0  # no longer open, and never a backend's client
        echo.close()
        control.close()


@pytest.mark.parametrize("cut", ["mid-frame", "between fragments"])
def test_write_data_to_a_relayed_client_waits_for_the_end_of_the_backends_message(monkeypatch, cut):
    monkeypatch.setattr(relay, "SEND_BETWEEN_TIMEOUT", 0.2)
    release = gevent.event.Event()
    payload = b"0123456789" * 1000
    if cut == "mid-frame":  # one frame, written in two pieces
        whole = encode_frame(OP_BINARY, payload, mask=False)
        pieces = [whole[:3000], whole[3000:]]
    else:  # a message in two fragments
        pieces = [encode_frame(OP_BINARY, payload[:3000], fin=False, mask=False),
                  encode_frame(OP_CONTINUATION, payload[3000:], mask=False)]

    def send_in_two(ws, environ):
        ws.send_raw(pieces[0])
        release.wait(10)
        ws.send_raw(pieces[1])
        ws.receive()

    backend = ScriptedBackend(send_in_two)
    with started(backend), running_glb(**{"backend:b0": backend.static_section()}) as glb:
        seen = Recorder(glb, "client_connect")
        client = ws_connect(base_url(glb) + "/")
        session = seen.wait("client_connect")[0].connection
        wait_until(lambda: len(client.sock.recv(65536, socket.MSG_PEEK)) == len(pieces[0]), timeout=5,
                   what="the first piece relayed to the client")
        assert glb.write_data(session.id, "not now") == 0  # it would land inside the message
        release.set()
        assert client.recv() == payload  # whole: nothing was written into it
        assert glb.write_data(session.id, "now") == 1
        assert client.recv() == "now"
        client.close()


@pytest.mark.parametrize("mode", ["raw", "decoded"])
def test_a_message_of_glbs_own_waiting_for_a_boundary_goes_right_after_the_backends_message(mode):
    release = gevent.event.Event()
    payload = b"0123456789" * 1000
    pieces = [encode_frame(OP_BINARY, payload[:3000], fin=False, mask=False),
              encode_frame(OP_CONTINUATION, payload[3000:], mask=False)]

    def send_in_two(ws, environ):
        ws.send_raw(pieces[0])
        release.wait(10)
        ws.send_raw(pieces[1])
        ws.receive()

    backend = ScriptedBackend(send_in_two)
    with started(backend), running_glb(**{"backend:b0": backend.static_section()}) as glb:
        if mode == "decoded":  # a raw_message handler makes glb decode the backend's frames
            glb.bus.add_handler("raw_message", lambda event: None, origin="test")
        seen = Recorder(glb, "client_connect")
        client = ws_connect(base_url(glb) + "/")
        session = seen.wait("client_connect")[0].connection
        wait_until(lambda: len(client.sock.recv(65536, socket.MSG_PEEK)) >= 3000, timeout=5,
                   what="the first fragment relayed to the client")
        waiting = gevent.spawn(session.session.send_to_client, "after", 10)
        gevent.idle()
        assert not waiting.ready()  # inside the backend's message: it waits
        release.set()
        assert client.recv() == payload  # whole: nothing was written into it
        assert client.recv() == "after"
        assert waiting.get(timeout=5) is True
        client.close()


def test_ping_reaches_every_connection_glb_holds():
    backend = ScriptedBackend()
    with started(backend), running_glb(**{"backend:b0": backend.static_section()}) as glb:
        seen = Recorder(glb, "server_ready", "client_connect", "connect")
        relayed = ws_connect(base_url(glb) + "/")
        seen.wait("client_connect")
        echo = ws_connect(base_url(glb) + "/glb/echo")
        control = register(glb, "c", 9001, seen)
        seen.wait("connect", count=3)
        assert glb.ping() == 3
        for ws in (relayed, echo):
            opcode, data = ws.recv_data(control_frame=True)
            assert (opcode, data) == (websocket.ABNF.OPCODE_PING, broadcast.PING_PAYLOAD)
        with gevent.Timeout(5):
            frame = control.receive_frame()
        assert (frame.opcode, frame.payload) == (OP_PING, broadcast.PING_PAYLOAD)
        for ws in (relayed, echo, control):
            ws.close()


# -- the agent and the demo backend, without glb -------------------------------------------------

CLIENTS = {
    "c1": ClientRecord(True, "c1", channel="news"),
    "c2": ClientRecord(True, "c2", channel="news", protocol="v2"),
    "c3": ClientRecord(True, "c3"),
}


@pytest.mark.parametrize("envelope,expected", [
    (records.TextEnvelope(payload="x"), ["c1", "c2", "c3"]),
    (records.TextEnvelope(guid="c2"), ["c2"]),
    (records.TextEnvelope(guid="elsewhere"), []),
    (records.TextEnvelope(channel="news"), ["c1", "c2"]),
    (records.TextEnvelope(protocol="v2"), ["c2"]),
    (records.TextEnvelope(include="c3, c1"), ["c1", "c3"]),
    (records.TextEnvelope(exclude="c1,c3"), ["c2"]),
    (records.TextEnvelope(channel="news", exclude="c2"), ["c1"]),
    (records.TextEnvelope(guid="c3", channel="news"), []),
    (records.BinaryEnvelope("", b"x"), ["c1", "c2", "c3"]),
    (records.BinaryEnvelope("c3", b"x"), ["c3"]),
    (records.BinaryEnvelope("gone", b"x"), []),
])
def test_select_clients(envelope, expected):
    assert select_clients(envelope, CLIENTS) == expected


def test_encode_envelope_and_an_agent_with_no_glb_connected():
    assert encode_envelope("hi", channel="n") == records.encode_text_envelope("hi", channel="n")
    assert encode_envelope(b"\x00", guid="c9") == records.encode_binary_envelope("c9", b"\x00")
    with pytest.raises(RecordError, match="text only"):
        encode_envelope(b"\x00", channel="n")
    agent = Agent(f"ws://127.0.0.1:{free_port()}")  # not started: no glb connected
    assert agent.broadcast("dropped") is False
    agent.client_connected("c1", channel="news")
    assert agent.recipients(records.TextEnvelope(channel="news")) == ["c1"]


def test_a_demo_backend_without_glb_broadcasts_to_its_own_clients():
    demo = DemoBackend(guid="solo")
    with started(demo):
        one, two = demo_client(demo), demo_client(demo)
        one.send("broadcast:local")
        assert one.recv() == "local" and two.recv() == "local"
        close_all(one, two)


def test_a_backend_client_id_that_looks_like_a_glb_id_never_diverts_glbs_messages():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "connect")
        echo = ws_connect(base_url(glb) + "/glb/echo")
        own = seen.wait("connect", match=lambda e: e.connection.path == "/glb/echo")[0].connection
        control = register(glb, "c", 9001, seen, clients=[own.id])  # reports a client named like glb's
        assert glb.write_backend_client(own.id, "to the backend's client") == 1
        assert received(control) == records.encode_text_envelope("to the backend's client", guid=own.id)
        assert glb.write_data(own.id, "to glb's echo client") == 1
        assert echo.recv() == "to glb's echo client"
        echo.send("marker")  # nothing else reached the echo client in between
        assert echo.recv() == "marker"
        echo.close()
        control.close()


def test_the_outbox_of_a_stuck_channel_is_bounded_in_bytes_not_frames(monkeypatch):
    monkeypatch.setattr(broadcast, "CLOSE_WAIT", 0.2)
    with running_glb() as glb:  # the default bound: 32 MiB
        seen = Recorder(glb, "server_ready", "server_disconnect")
        stuck = register(glb, "stuck", 9003, seen)  # never reads
        outbox = glb.control_channels["stuck"].outbox
        payload = "x" * (1 << 20)
        taken = [glb.broadcast(payload) for _ in range(64)]  # 64 MiB, queued before the writer runs
        assert taken[:31] == [1] * 31 and taken[-1] == 0  # 31 fit (each a little over 1 MiB); not 64
        assert outbox.queued_bytes <= 32 << 20
        gone = seen.wait("server_disconnect", timeout=10)[0]
        assert gone.backend.guid == "stuck" and gone.code == CloseCode.POLICY_VIOLATION
        stuck.abort()


# -- several glbs, none holding every backend ---------------------------------------------------

def drop_channel(glb, backend, link_index):
    """``backend``'s channel to ``glb`` ends while glb stays up, and its agent stays away from it."""
    link = backend.agent.links[link_index]
    link.backoff.base = link.backoff.cap = 60  # not back within the test
    glb.control_channels[backend.guid].conn.websocket.close(CloseCode.GOING_AWAY, "dropped")
    wait_until(lambda: link.registered_at is None and backend.guid not in glb.control_channels,
               timeout=5, what=f"{backend.guid} off {link.url}")


@pytest.mark.timeout(40)
def test_a_broadcast_reaches_every_backend_exactly_once_when_no_glb_holds_them_all():
    """A is registered with both glbs, B only with glb2, C only with glb1 (each lost its channel to
    the other glb, which stayed up): every client of A, B and C gets each of A's broadcasts once."""
    with running_glb() as glb1, running_glb() as glb2:
        urls = [base_url(glb1), base_url(glb2)]
        a, b, c = backends = [DemoBackend(lb_urls=urls, guid=guid) for guid in "ABC"]
        try:
            for backend in backends:
                backend.start()
            wait_until(lambda: all(backend.agent.registered for backend in backends), what="all registered")
            drop_channel(glb1, b, 0)
            drop_channel(glb2, c, 1)
            glb1_link, glb2_link = a.agent.links
            wait_until(lambda: glb1_link.ready_backends == {"A", "C"} and glb2_link.ready_backends == {"A", "B"},
                       timeout=5, what="A told what each glb holds")
            clients = {backend.guid: [demo_client(backend), demo_client(backend)] for backend in backends}
            sent = [f"m{i}" for i in range(20)]
            for payload in sent:
                clients["A"][0].send("broadcast:" + payload)
            clients["A"][0].send("whoami")  # answered once A has handed every broadcast to its agent
            assert clients["A"][0].recv() == "A"
            # A marker through each glb, unrouted: behind it on every path nothing more can come.
            for link in a.agent.links:
                link.put(encode_envelope("end"))
            paths = {"A": 2, "B": 1, "C": 1}  # how many glbs hold each backend
            for guid, sockets in clients.items():
                for ws in sockets:
                    got, ends = [], 0
                    while ends < paths[guid]:
                        message = ws.recv()
                        ends += message == "end"
                        if message != "end":
                            got.append(message)
                    assert got == sent, guid
            close_all(*(ws for sockets in clients.values() for ws in sockets))
        finally:
            for backend in backends:
                backend.stop()


class _Link:
    def __init__(self, registered_at, ready_backends):
        self.registered_at, self.ready_backends, self.outbox = registered_at, ready_backends, object()


@pytest.mark.parametrize("links, plan", [
    ([(1, {"a", "c"}), (2, {"a", "b"})], [(0, None), (1, ("b",))]),     # equals: the older first
    ([(1, {"a"}), (2, {"a", "b"})], [(1, None)]),                         # the one holding most
    ([(2, {"a", "b"}), (1, None)], [(1, None)]),                          # one has not said: the older
    ([(1, {"a"}), (2, {"b", "c"}), (3, {"b", "c", "d"}), (4, {"b", "e"})],
     [(2, None), (0, ("a",)), (3, ("e",))]),                              # each backend once
    ([(None, None), (None, None)], [(0, None)]),                          # connected, not registered
])
def test_broadcast_plan_covers_each_known_backend_once(links, plan):
    agent = Agent(["ws://127.0.0.1:1", "ws://127.0.0.1:2", "ws://127.0.0.1:3", "ws://127.0.0.1:4"][:len(links)])
    agent.links = [_Link(*link) for link in links]
    assert [(agent.links.index(link), backends) for link, backends in agent.broadcast_plan()] == plan


def test_a_subscribed_backend_is_told_what_glb_relays_to_and_an_sgc_backend_is_not():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        sgc = register(glb, "sgc", 9001, seen)
        agent = register(glb, "agent", 9002, seen, subscribe=[records.READY_SET])
        ready = records.parse_ready_set(received(agent))
        assert ready.ready is not None and set(ready.ready) <= {"sgc", "agent"}
        known = set(ready.ready)
        while known != {"sgc", "agent"}:
            change = records.parse_ready_set(received(agent))
            known = (known - set(change.left)) | set(change.joined)
        late = register(glb, "late", 9003, seen)
        sgc.close()
        while known != {"agent", "late"}:
            change = records.parse_ready_set(received(agent))
            assert change.ready is None
            known = (known - set(change.left)) | set(change.joined)
        envelope = records.encode_text_envelope("only envelopes")
        late.send(envelope)
        assert received(late) == envelope  # nothing else came first
        assert received(agent) == envelope
        for ws in (agent, late):
            ws.close()


def test_a_route_sends_the_next_envelope_to_the_listed_backends_only():
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        a, b, c = (register(glb, guid, 9001 + i, seen) for i, guid in enumerate("abc"))
        routed, everyone = records.encode_text_envelope("routed"), records.encode_text_envelope("everyone")
        a.send(records.encode_record(records.BroadcastRoute(("b", "gone"))))
        a.send(routed)
        a.send(records.encode_record(records.BroadcastRoute(("b",))))
        a.send(records.encode_client(True, "c1"))  # not an envelope: the route is void
        a.send(everyone)
        assert [received(ws) for ws in (a, b, c)] == [everyone, routed, everyone]
        assert received(b) == everyone
        a.send('{"method":"glb@broadcast@to","backends":"b"}')
        assert closed_with(a)[0] == CloseCode.POLICY_VIOLATION
        for ws in (b, c):
            ws.close()


class _Channel:
    """What ReadySetPublisher reads of a control channel: its backend's state and its Outbox."""

    def __init__(self, guid):
        self.registration = type("Registration", (), {})()
        self.registration.backend = type("Backend", (), {"guid": guid, "state": "ready"})()
        self.outbox = self
        self.frames = []

    def put(self, frame):
        self.frames.append(frame)
        return True

    def send(self, message):
        return self.put(broadcast.encode_message_frame(message))

    def told(self):
        """The glb@lb@ready records received, decoded."""
        return [records.parse_ready_set(frame[2 + (frame[1] == 126) * 2:].decode()) for frame in self.frames]


def test_a_churning_pool_is_told_in_one_coalesced_change_per_interval():
    from glb.ready_set import ReadySetPublisher
    balancer = type("Balancer", (), {})()
    balancer.control_channels = {guid: _Channel(guid) for guid in ("a", "b")}
    publisher = ReadySetPublisher(balancer, interval=60)  # nothing more than the first push within the test
    subscriber = balancer.control_channels["a"]
    publisher.subscribe(subscriber)
    for i in range(500):  # 500 backends join and leave, "b" leaves, "c" joins: no yield in between
        balancer.control_channels[f"x{i}"] = _Channel(f"x{i}")
        publisher.changed()
        del balancer.control_channels[f"x{i}"]
        publisher.changed()
    del balancer.control_channels["b"]
    balancer.control_channels["c"] = _Channel("c")
    publisher.changed()
    with gevent.Timeout(5):
        while publisher._pending is not None:
            gevent.sleep(0.01)
    assert subscriber.told() == [records.ReadySet(ready=("a", "b")), records.ReadySet(joined=("c",), left=("b",))]
    publisher.changed()
    assert publisher._pending is not None  # the next push waits for the interval: stop() ends it
    publisher.stop()
    assert publisher._pending is None
