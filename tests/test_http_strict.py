"""glb's own HTTP/1.1 front: strict heads, deadlines, keep-alive, framing both ways, one header type.

The smuggling cases are data: raw request bytes and the status glb must answer.
Each is sent to a real glb in front of a raw backend that records every byte it
receives; after the refusal a good request goes through, and the backend must
have seen that one request and nothing else. Raw sockets throughout: a client
library would refuse to send most of these.
"""
import contextlib
import re
import socket
import struct

import gevent
import gevent.event
import pytest
from gevent.server import StreamServer

from glb.agent import Agent
from glb.http_parse import ChunkedBody, HeadError, HeadReader, parse_request_head
from tests.support import hand_frame, running_glb, send_byte_by_byte, upgrade_request

pytestmark = pytest.mark.timeout(30)

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RawBackend:
    """A backend that records every byte it receives and answers each complete request with ``answer``."""

    def __init__(self, answer=OK):
        self.answer = answer
        self.received = bytearray()
        self.accepted = 0
        self.server = StreamServer(("127.0.0.1", 0), self.handle)

    def handle(self, sock, address):
        self.accepted += 1
        buffer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                return
            self.received += data
            buffer += data
            while b"\r\n\r\n" in buffer:
                head, rest = buffer.split(b"\r\n\r\n", 1)
                length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
                if length:
                    if len(rest) < int(length.group(1)):
                        break
                    rest = rest[int(length.group(1)):]
                elif re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
                    end = rest.find(b"0\r\n")
                    end = rest.find(b"\r\n\r\n", end) if end >= 0 else -1
                    if end < 0:
                        break
                    rest = rest[end + 4:]
                buffer = rest
                sock.sendall(self.answer(head) if callable(self.answer) else self.answer)

    @property
    def port(self):
        return self.server.server_port

    def __enter__(self):
        self.server.start()
        return self

    def __exit__(self, *exc):
        self.server.stop(timeout=0)


def backend_section(port, http=True):
    values = {"url": f"ws://127.0.0.1:{port}"}
    if http:
        values["http"] = f"http://127.0.0.1:{port}"
    return values


def read_until(sock, marker, data=b""):
    """What a raw backend reads from ``sock`` until ``marker`` is in it; None if the peer closed first."""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    return data


@contextlib.contextmanager
def glb_in_front_of(handle):
    """A raw backend running ``handle(sock, address)`` for each connection, and a glb forwarding HTTP to it."""
    server = StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        with running_glb(**{"backend:one": backend_section(server.server_port)}) as glb:
            yield glb
    finally:
        server.stop(timeout=0)


def exchange(address, data, timeout=5):
    """Send ``data``; everything glb answers until it closes (the test fails if it never closes)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
    return reply


def read_response(sock, buffer=b""):
    """One response (head + Content-Length or chunked body) from ``sock``: (head, body, rest)."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        assert data, f"closed before a full head: {buffer!r}"
        buffer += data
    head, rest = buffer.split(b"\r\n\r\n", 1)
    if b" 1" == head[8:10] and head[9:12] != b"101":  # interim 1xx: no body
        return head, b"", rest
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    if length:
        n = int(length.group(1))
        while len(rest) < n:
            rest += sock.recv(65536)
        return head, rest[:n], rest[n:]
    if re.search(rb"(?i)\r\ntransfer-encoding: *chunked", head):
        while not re.search(rb"(^|\r\n)0\r\n(.*\r\n)?\r\n", rest, re.S):
            data = sock.recv(65536)
            assert data
            rest += data
        return head, rest, b""
    return head, b"", rest


def unchunk(data):
    """(body, trailer lines) of a chunked body, decoded by hand (chunk boundaries may differ from the source)."""
    body = b""
    while True:
        size, data = data.split(b"\r\n", 1)
        size = int(size, 16)
        if not size:
            return body, data[:-2]
        body, data = body + data[:size], data[size + 2:]


SMUGGLING = [
    ("two different Content-Length",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 44\r\n\r\n"
     b"helloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ("two equal Content-Length",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello", "400"),
    ("space in a header name hides Content-Length",
     b"POST / HTTP/1.1\r\nHost: x\r\nX Bad: 1\r\nContent-Length: 39\r\n\r\n"
     b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ("space before the colon of Transfer-Encoding",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding : chunked\r\nContent-Length: 5\r\n\r\n"
     b"0\r\n\r\n", "400"),
    ("gzip, chunked with Content-Length",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
     "400"),
    ("xchunked with Content-Length",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\nContent-Length: 5\r\n\r\nhello", "400"),
    ("xchunked alone", b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\nhello", "400"),
    ("Content-Length: +5", b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello", "400"),
    ("Content-Length beside chunked",
     b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", "400"),
    ("two Transfer-Encoding, chunked first",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
     b"0\r\n\r\n", "400"),
    ("two Transfer-Encoding, chunked last",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"0\r\n\r\n", "400"),
    ("obs-fold", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n", "400"),
    ("control character in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x01b\r\n\r\n", "400"),
    ("NUL in a value", b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", "400"),
    ("bare LF line ends", b"GET / HTTP/1.1\nHost: x\n\n", "400"),
    ("bare CR in a value", b"GET / HTTP/1.1\r\nHost: x\rX-Y: 1\r\n\r\n", "400"),
    ("bad chunk size",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n", "400"),
    ("chunk size with a sign",
     b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n", "400"),
    ("HTTP/1.1 without Host", b"GET / HTTP/1.1\r\n\r\n", "400"),
    ("two Host headers", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", "400"),
    ("space in the target", b"GET /a b HTTP/1.1\r\nHost: x\r\n\r\n", "400"),
    ("HTTP/2.0 in a 1.x head", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", "505"),
    ("101 header fields", b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(
        b"X-H%d: v\r\n" % i for i in range(100)) + b"\r\n", "431"),
    ("head over max_head_size", b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "431"),
    ("request line over max_head_size", b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", "414"),
]


@pytest.mark.parametrize("raw,status", [case[1:] for case in SMUGGLING], ids=[case[0] for case in SMUGGLING])
def test_bad_request_heads_get_an_error_and_a_closed_connection_and_reach_no_backend(raw, status, caplog):
    with RawBackend() as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        errors = []
        glb.bus.add_handler("error", errors.append)
        reply = exchange(glb.addresses[0], raw)  # returns only once glb has closed the connection
        assert reply.startswith(b"HTTP/1.1 " + status.encode()), reply[:200]
        assert b"Connection: close" in reply.split(b"\r\n\r\n")[0]
        assert len(errors) == 1
        # A good request afterwards is the only thing the backend ever received.
        good = exchange(glb.addresses[0], b"GET /good HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert good.startswith(b"HTTP/1.1 200")
        assert bytes(backend.received).count(b"HTTP/1.1\r\n") == 1
        assert bytes(backend.received).startswith(b"GET /good HTTP/1.1\r\n")
    assert not [r for r in caplog.records if r.exc_info], "a refused request must not log a traceback"


def test_the_same_cases_after_a_good_request_on_the_same_connection():
    """glb keeps its head parser from one bodiless request to the next: it refuses just the same."""
    with RawBackend() as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        for name, raw, status in SMUGGLING:
            with socket.create_connection(glb.addresses[0], timeout=5) as sock:
                sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\n")
                head, body, rest = read_response(sock)
                assert head.startswith(b"HTTP/1.1 200") and body == b"ok", name
                sock.sendall(raw)
                reply = rest
                while chunk := sock.recv(65536):  # glb closes the connection after its answer
                    reply += chunk
            assert reply.startswith(b"HTTP/1.1 " + status.encode()), (name, reply[:200])
        assert bytes(backend.received) == b"".join(
            b"GET /first HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n"
            b"X-Forwarded-Host: x\r\n\r\n" for _ in SMUGGLING)


def test_the_head_parser_alone_refuses_the_same_cases():
    """The socket-free core: every case above fails in HeadReader/parse_request_head/ChunkedBody."""
    for name, raw, status in SMUGGLING:
        buffer = bytearray(raw)
        with pytest.raises(HeadError) as caught:
            reader = HeadReader(max_size=16384)
            end = reader.feed(buffer)
            assert end is not None, name
            head = parse_request_head(reader)
            del buffer[:end]
            body = ChunkedBody()
            assert head.framing.chunked, name
            body.take(buffer)
        assert caught.value.status.startswith(status), name


def test_a_slowloris_client_is_dropped_at_the_head_deadline():
    """Five clients send one byte every 0.2 s; each gets 408 and is closed long before its head is done."""
    head = b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: slow\r\nX-Padding: " + b"p" * 200 + b"\r\n\r\n"
    outcomes = []

    def slow_client(address):
        outcomes.append(send_byte_by_byte(address, head))

    with RawBackend() as backend, running_glb(**{"backend:one": backend_section(backend.port),
                                                 "glb": {"handshake_timeout": "1"}}) as glb:
        clients = [gevent.spawn(slow_client, glb.addresses[0]) for _ in range(5)]
        gevent.joinall(clients, timeout=25, raise_error=True)
        assert len(outcomes) == 5
        for sent, reply in outcomes:
            assert sent < len(head)
            assert reply.startswith(b"HTTP/1.1 408")
        assert backend.accepted == 0


def test_an_idle_keep_alive_connection_is_closed_after_keepalive_timeout():
    with RawBackend() as backend, running_glb(**{"backend:one": backend_section(backend.port),
                                                 "http": {"keepalive_timeout": "0.3"}}) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body, rest = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
            assert sock.recv(65536) == b""  # closed quietly, without waiting for the 5 s socket timeout


def test_keep_alive_pipelining_and_path_sent_as_received():
    with RawBackend() as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"GET /a%2Fb/c%20d?x=%2F&y HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                         b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
            rest = b""
            for _ in range(3):
                head, body, rest = read_response(sock, rest)
                assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
        received = bytes(backend.received)
        assert received.startswith(b"GET /a%2Fb/c%20d?x=%2F&y HTTP/1.1\r\n")
        assert b"POST /p HTTP/1.1\r\n" in received and b"\r\n\r\nabcGET /last HTTP/1.1\r\n" in received
        assert backend.accepted == 1  # one pooled backend connection for all three


def test_chunked_request_with_trailers_and_chunked_response_with_trailers():
    answer = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n"
              b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-Sum: 11\r\n\r\n")
    with RawBackend(answer) as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"POST /t HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Check: yes\r\n\r\n")
            head, body, _ = read_response(sock)
        assert b"transfer-encoding: chunked" in head.lower()
        assert unchunk(body) == (b"hello world", b"X-Sum: 11\r\n")
        received = bytes(backend.received)
        assert b"Transfer-Encoding: chunked\r\n" in received
        assert unchunk(received.split(b"\r\n\r\n", 1)[1]) == (b"abcde", b"X-Check: yes\r\n")


def test_expect_100_continue_and_http_1_0():
    with RawBackend(lambda head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
                    ) as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"PUT /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
            head, _, rest = read_response(sock)
            assert head == b"HTTP/1.1 100 Continue"
            sock.sendall(b"data")
            head, body, _ = read_response(sock, rest)
            assert head.startswith(b"HTTP/1.1 200") and body == b"2\r\nok\r\n0\r\n\r\n"
        assert b"expect" not in bytes(backend.received).lower()
        assert bytes(backend.received).endswith(b"Content-Length: 4\r\n\r\ndata")
        # An HTTP/1.0 client gets the chunked body unframed and the end of it as a closed connection.
        reply = exchange(glb.addresses[0], b"GET /old HTTP/1.0\r\n\r\n")
        head, body = reply.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head and body == b"ok"


def test_204_and_304_keep_the_connection_and_carry_no_body():
    def answer(head):
        if head.startswith(b"GET /204"):
            return b"HTTP/1.1 204 No Content\r\n\r\n"
        return b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"

    with RawBackend(answer) as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"GET /204 HTTP/1.1\r\nHost: x\r\n\r\nGET /304 HTTP/1.1\r\nHost: x\r\n\r\n")
            first, body, rest = read_response(sock)
            second, body2, rest = read_response(sock, rest)
        assert first.startswith(b"HTTP/1.1 204") and body == b""
        assert second.startswith(b"HTTP/1.1 304") and b'ETag: "e"' in second and rest == b""


def test_malformed_backend_response_is_502_with_an_error_event():
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok"
    with RawBackend(answer) as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        errors = []
        glb.bus.add_handler("error", errors.append)
        reply = exchange(glb.addresses[0], b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 502")
        assert len(errors) == 1 and "malformed response" in errors[0].error


def test_a_websocket_upgrade_after_plain_requests_on_the_same_connection():
    with RawBackend() as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"GET /plain HTTP/1.1\r\nHost: x\r\n\r\nGET /again HTTP/1.1\r\nHost: x\r\n\r\n")
            _, body, rest = read_response(sock)
            _, body2, rest = read_response(sock, rest)
            assert body == body2 == b"ok"
            sock.sendall(upgrade_request("/glb/echo") + hand_frame(0x1, b"hi there", key=b"\x01\x02\x03\x04"))
            data = rest
            while b"\r\n\r\n" not in data:
                data += sock.recv(65536)
            head, frames = data.split(b"\r\n\r\n", 1)
            assert head.startswith(b"HTTP/1.1 101")
            while len(frames) < 10:
                frames += sock.recv(65536)
            assert frames[:10] == b"\x81\x08hi there"


def test_handlers_see_one_header_type_on_request_and_response():
    seen = {}

    def on_request(event):
        event.request.headers.add("X-Multi", "two")
        seen["request"] = event.request.headers.getlist("x-multi")

    def on_response(event):
        event.response.headers["X-Seen"] = "1"
        event.response.headers.add("Set-Cookie", "c=3")
        seen["cookies"] = event.response.headers.getlist("set-cookie")
        seen["same type"] = type(event.response.headers) is type(event.request.headers)

    answer = b"HTTP/1.1 200 OK\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 2\r\n\r\nok"
    with RawBackend(answer) as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        glb.bus.add_handler("http_request", on_request)
        glb.bus.add_handler("http_response", on_response)
        reply = exchange(glb.addresses[0],
                         b"GET /h HTTP/1.1\r\nHost: x\r\nX-Multi: one\r\nConnection: close\r\n\r\n")
    head = reply.split(b"\r\n\r\n")[0]
    assert seen == {"request": ["one", "two"], "cookies": ["a=1", "b=2", "c=3"], "same type": True}
    assert b"\r\nX-Seen: 1" in head
    assert head.count(b"\r\nSet-Cookie: ") == 3
    assert b"X-Multi: one\r\nX-Multi: two\r\n" in bytes(backend.received)


def test_a_handler_header_with_a_newline_is_refused_not_written():
    def on_response(event):
        event.response.headers["X-Bad"] = "a\r\nInjected: 1"

    with RawBackend() as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        glb.bus.add_handler("http_response", on_response)
        reply = exchange(glb.addresses[0], b"GET /h HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 500") and b"Injected" not in reply


def test_backend_registered_without_http_is_never_picked_for_http():
    """A backend that registers with an empty ``http`` opts out: HTTP goes to the other, or 503."""
    with RawBackend() as takes, RawBackend() as opted_out, running_glb(
            glb={"balancing": "round_robin"}) as glb:
        ready = gevent.event.Event()
        registered = []

        def on_ready(event):
            registered.append(event.backend.guid)
            if len(registered) == 2:
                ready.set()

        glb.bus.add_handler("server_ready", on_ready)
        url = f"ws://{glb.addresses[0][0]}:{glb.addresses[0][1]}"
        agents = [Agent(url, guid="takes", bindings=[("127.0.0.1", takes.port)]),
                  Agent(url, guid="opted-out", bindings=[("127.0.0.1", opted_out.port)], http="")]
        try:
            for agent in agents:
                agent.start()
            assert ready.wait(10)
            for i in range(6):
                reply = exchange(glb.addresses[0], b"GET /%d HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % i)
                assert reply.startswith(b"HTTP/1.1 200")
            assert opted_out.accepted == 0 and bytes(takes.received).count(b"HTTP/1.1\r\n") == 6
            gone = gevent.event.Event()
            glb.bus.add_handler("server_disconnect", lambda event: gone.set())
            agents[0].stop(timeout=2)
            assert gone.wait(10)
            errors = []
            glb.bus.add_handler("error", errors.append)
            reply = exchange(glb.addresses[0], b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert reply.startswith(b"HTTP/1.1 503")
            assert len(errors) == 1 and "no backend" in errors[0].error
            assert opted_out.accepted == 0
        finally:
            for agent in agents:
                agent.stop(timeout=2)


def test_pooled_connections_of_a_backend_that_left_are_closed():
    with RawBackend() as backend, running_glb(**{"http": {"pool_idle_timeout": "0.2"}}) as glb:
        backend_obj = glb.registry.add_static("one", f"ws://127.0.0.1:{backend.port}",
                                              http=f"http://127.0.0.1:{backend.port}")
        reply = exchange(glb.addresses[0], b"GET /x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 200")
        assert glb.http_proxy.pools.idle_count() == 1
        glb.registry.remove(backend_obj.guid)
        deadline = gevent.Timeout(5)
        with deadline:
            while glb.http_proxy.pools.idle_count():
                gevent.sleep(0.05)


def test_an_idle_keep_alive_connection_is_closed_when_glb_stops():
    from glb.server import Balancer
    from tests.support import make_settings

    with RawBackend() as backend:
        glb = Balancer(make_settings(**{"backend:one": backend_section(backend.port)}), handler_modules=[])
        glb.start()
        try:
            sock = socket.create_connection(glb.addresses[0], timeout=5)
            sock.sendall(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body, _ = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" not in head
        finally:
            glb.stop(timeout=1)
        with sock:
            assert sock.recv(65536) == b""  # [http] keepalive_timeout is 60 s: the stop closed it


def test_a_failing_own_endpoint_answers_500_and_fires_exception():
    def broken(environ, start_response):
        raise RuntimeError("endpoint bug")

    with running_glb() as glb:
        glb.http_routes["/glb/broken"] = broken
        exceptions = []
        glb.bus.add_handler("exception", exceptions.append)
        reply = exchange(glb.addresses[0], b"GET /glb/broken HTTP/1.1\r\nHost: x\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 500") and len(exceptions) == 1
        ok = exchange(glb.addresses[0], b"GET /glb/status HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert ok.split(b" ", 2)[1] in (b"200", b"403")  # glb's other endpoints still answer


def test_interim_1xx_answers_reach_an_http_1_1_client_before_the_final_one():
    answer = (b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
              b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    with RawBackend(answer) as backend, running_glb(**{"backend:one": backend_section(backend.port)}) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
            interim, _, rest = read_response(sock)
            final, body, _ = read_response(sock, rest)
        assert interim.startswith(b"HTTP/1.1 103") and b"Link: </style.css>" in interim
        assert final.startswith(b"HTTP/1.1 200") and body == b"ok"


def test_a_pooled_connection_the_backend_closed_is_not_reused():
    """The backend closes each connection right after its answer (without saying so): no request fails."""
    def handle(sock, address):
        if read_until(sock, b"\r\n\r\n") is None:
            return
        sock.sendall(OK)

    with glb_in_front_of(handle) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            rest = b""
            for i in range(5):
                sock.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                head, body, rest = read_response(sock, rest)
                assert head.startswith(b"HTTP/1.1 200") and body == b"ok", i


def test_a_reload_that_changes_the_balancing_or_http_settings_reaches_plain_http(tmp_path):
    """HTTP picks with its own policy: rebuilt when a reload swaps Balancer.policy; a new [http] keeps serving."""
    from glb import config
    from glb.server import Balancer

    with RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\na") as a, \
            RawBackend(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nb") as b:
        backends = "".join(f"[backend:{name}]\nurl = ws://127.0.0.1:{port}\nhttp = http://127.0.0.1:{port}\n"
                           for name, port in (("a", a.port), ("b", b.port)))
        conf = tmp_path / "glb.ini"
        conf.write_text("[glb]\nlisten = 127.0.0.1:0\nbalancing = random\n[handlers]\nmodules =\n" + backends)
        glb = Balancer(config.load(conf))
        glb.start()
        try:
            with socket.create_connection(glb.addresses[0], timeout=5) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(sock)[0].startswith(b"HTTP/1.1 200")
                conf.write_text("[glb]\nlisten = 127.0.0.1:0\nbalancing = round_robin\n[handlers]\nmodules =\n"
                                + backends)
                assert glb.reload().settings == ["glb.balancing"]
                bodies, rest = [], b""
                for _ in range(6):
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                    _, body, rest = read_response(sock, rest)
                    bodies.append(body)
                assert bodies[0] != bodies[1] and bodies[0::2] == [bodies[0]] * 3 and bodies[1::2] == [bodies[1]] * 3
                conf.write_text("[glb]\nlisten = 127.0.0.1:0\nbalancing = round_robin\n[http]\nretries = 1\n"
                                "[handlers]\nmodules =\n" + backends)
                assert glb.reload().settings == ["http.retries"]  # a new HttpProxy from here on
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # the same keep-alive connection
                assert read_response(sock, rest)[0].startswith(b"HTTP/1.1 200")
                glb.stop(timeout=1)
                assert sock.recv(65536) == b""  # still known as idle to the new proxy: closed at stop
        finally:
            if not glb.stopping:
                glb.stop(timeout=1)


FORWARD_CASES = [
    b"GET /a?b=%2F HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nhost:  x  \r\nX-Forwarded-For: 10.0.0.1\r\nx-forwarded-for: 10.0.0.2\r\n"
    b"X-Forwarded-Proto: ftp\r\nX-Forwarded-Host: evil\r\nAccept: */*\r\n\r\n",
    b"HEAD /h HTTP/1.1\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\nTE: trailers\r\nHost: x\r\n"
    b"Proxy-Authorization: secret\r\nProxy-Foo: 1\r\nUpgrade: h2c\r\nExpect: 100-continue\r\nTrailer: X\r\n"
    b"Content-Length: 0\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n",
    b"DELETE /d HTTP/1.0\r\nConnection: close\r\nX-Empty:\r\n\r\n",
]


@pytest.mark.parametrize("raw", FORWARD_CASES)
@pytest.mark.parametrize("backend_host", [None, b"backend:8080"])
def test_the_head_forwarded_from_bytes_says_what_the_forwarded_pairs_say(raw, backend_host):
    """``forward_request_head`` (the common request's path) and the pairs path give a backend the same fields."""
    from glb.http_proxy import forward_request_head, forward_request_headers

    reader = HeadReader(max_size=16384)
    assert reader.feed(bytearray(raw)) == len(raw)
    head = parse_request_head(reader)
    assert head.verbatim
    host = backend_host if backend_host is not None or head.host else b"backend:8080"  # as HttpProxy gives it
    sent = forward_request_head(head, "127.0.0.1", "https", host)
    pairs = forward_request_headers(head.raw_headers, "127.0.0.1", "https", head.connection)
    if host is not None:
        pairs = [(n, v) for n, v in pairs if n.lower() != b"host"] + [(b"Host", host)]
    again = HeadReader(max_size=16384)  # what glb sends must itself be a strictly valid head
    assert again.feed(bytearray(sent)) == len(sent)
    forwarded = parse_request_head(again)
    assert forwarded.version == "1.1" and forwarded.target == head.target and forwarded.method == head.method

    def fields(items):
        return sorted((name.lower(), value) for name, value in items)
    assert fields(forwarded.raw_headers) == fields(pairs)


def test_an_idle_pooled_connection_the_backend_writes_to_or_closes_is_dropped_at_once():
    """A backend that answers, then says ``408`` and closes while idle: that never answers the next request."""
    def handle(sock, address):
        if read_until(sock, b"\r\n\r\n") is None:
            return
        sock.sendall(OK)
        gevent.sleep(0.05)  # idle for a moment, as a backend's keep-alive timeout would be
        sock.sendall(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

    with glb_in_front_of(handle) as glb:
        pools = glb.http_proxy.pools
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            rest = b""
            for i in range(3):
                sock.sendall(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i)
                head, body, rest = read_response(sock, rest)
                assert head.startswith(b"HTTP/1.1 200") and body == b"ok", (i, head)
                with gevent.Timeout(5):  # the pool lets the connection go when the 408 arrives
                    while pools.idle_count():
                        gevent.sleep(0.01)
        assert pools.opened == 3


def test_a_post_reaches_a_backend_that_closes_its_idle_connections_exactly_once():
    """Not safe to send twice: each POST is written once, on a connection checked first."""
    received = []

    def handle(sock, address):
        data = read_until(sock, b"\r\n\r\nbody")
        if data is None:
            return
        received.append(data.split(b" ", 2)[1])
        sock.sendall(OK)
        sock.shutdown(socket.SHUT_WR)  # closes its side at once, without saying so in the answer

    with glb_in_front_of(handle) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            rest = b""
            for i in range(5):
                sock.sendall(b"POST /%d HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody" % i)
                head, body, rest = read_response(sock, rest)
                assert head.startswith(b"HTTP/1.1 200") and body == b"ok", (i, head)
    assert received == [b"/%d" % i for i in range(5)]


@pytest.mark.parametrize("method, resent", [("GET", True), ("POST", False)])
def test_a_request_the_backend_reset_unanswered_is_sent_again_only_when_idempotent(method, resent):
    """The backend reads the second request on a reused connection, then resets it without answering."""
    received = []

    def handle(sock, address):
        data, served = b"", 0
        while True:
            while b"\r\n\r\n" not in data or (method == "POST" and not data.split(b"\r\n\r\n", 1)[1][:4]):
                chunk = sock.recv(65536)
                if not chunk:
                    return
                data += chunk
            head, data = data.split(b"\r\n\r\n", 1)
            data = data[4:] if method == "POST" else data
            path = head.split(b" ", 2)[1]
            received.append(path)
            if path == b"/reset" and served:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()  # RST: read, never answered
                return
            sock.sendall(OK)
            served += 1

    body = b"Content-Length: 4\r\n\r\nbody" if method == "POST" else b"\r\n"
    with glb_in_front_of(handle) as glb:
        with socket.create_connection(glb.addresses[0], timeout=5) as sock:
            sock.sendall(b"%s /first HTTP/1.1\r\nHost: x\r\n%s" % (method.encode(), body))
            head, answer, rest = read_response(sock)
            assert head.startswith(b"HTTP/1.1 200") and answer == b"ok"
            sock.sendall(b"%s /reset HTTP/1.1\r\nHost: x\r\n%s" % (method.encode(), body))
            head, answer, rest = read_response(sock, rest)
    if resent:  # on a new connection, which the backend answers
        assert head.startswith(b"HTTP/1.1 200") and received == [b"/first", b"/reset", b"/reset"]
    else:  # never twice: the backend may have acted on it
        assert head.startswith(b"HTTP/1.1 502") and received == [b"/first", b"/reset"]
