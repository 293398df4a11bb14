"""The WebSocket I/O layer and connect(), on real sockets (socketpairs and port-0 listeners).

Wire checks read raw bytes on the peer's side with a decoder written here,
independent of glb.frames.
"""
import base64
import gc
import hashlib
import socket
import struct
import time

import gevent
import pytest
from gevent.event import Event

from glb.errors import CloseCode, ConnectionClosed, HandshakeFailed
from glb.frames import OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT
from glb.websocket import WebSocket, connect
from tests.support import hand_frame, slow_mask

KEY = b"\x37\xfa\x21\x3d"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- raw peer helpers -----------------------------------------------------------


def raw_frame(opcode, payload=b"", fin=True, rsv=0, masked=True, length=None):
    """A frame as a raw peer would write it (masked like a client unless told)."""
    return hand_frame(opcode, payload, fin, rsv, KEY if masked else None, length)


def recv_exactly(sock, count):
    data = b""
    while len(data) < count:
        more = sock.recv(count - len(data))
        if not more:
            raise EOFError(f"EOF after {len(data)} of {count} bytes")
        data += more
    return data


def read_raw_frame(sock):
    """``(fin, opcode, masked, payload)`` of the next frame on a raw socket."""
    first, second = recv_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", recv_exactly(sock, 8))
    masked = bool(second & 0x80)
    key = recv_exactly(sock, 4) if masked else None
    payload = recv_exactly(sock, length)
    return bool(first & 0x80), first & 0x0F, masked, slow_mask(payload, key) if masked else payload


def read_raw_close(sock):
    """The (code, reason) of the next frame, which must be a close frame."""
    fin, opcode, _, payload = read_raw_frame(sock)
    assert (fin, opcode) == (True, OP_CLOSE), (opcode, payload)
    if not payload:
        return None, ""
    return struct.unpack("!H", payload[:2])[0], payload[2:].decode()


def assert_eof(sock):
    assert sock.recv(1) == b""


def peer_answering_close(raw):
    """A well-behaved raw peer: reads our close frame, then ends its side; its result is (code, reason).

    After a protocol error we wait for the peer's EOF (so no RST can eat the
    close frame); this is the peer that sends it.
    """
    def answer():
        close = read_raw_close(raw)
        raw.shutdown(socket.SHUT_WR)
        assert_eof(raw)
        return close

    return gevent.spawn(answer)


@pytest.fixture
def server_and_raw():
    """A server-side WebSocket and the raw client socket facing it."""
    ours, theirs = socket.socketpair()
    ws = WebSocket(ours, server_side=True, max_message_size=1000, close_timeout=5)
    yield ws, theirs
    ws.abort()
    theirs.close()


@pytest.fixture
def pair():
    """A client-side and a server-side WebSocket wired together."""
    a, b = socket.socketpair()
    client = WebSocket(a, server_side=False)
    server = WebSocket(b, server_side=True)
    yield client, server
    client.abort()
    server.abort()


# -- 1. close writes its code and reason --------------------------------------------


def test_close_sends_4001_bye_on_the_wire_and_waits_for_the_reply(server_and_raw):
    ws, raw = server_and_raw
    replier = gevent.spawn(lambda: (read_raw_frame(raw), raw.sendall(raw_frame(OP_CLOSE, b"\x0f\xa1bye"))))
    ws.close(4001, "bye")
    fin, opcode, masked, payload = replier.get(timeout=5)[0]
    assert (fin, opcode, masked, payload) == (True, OP_CLOSE, False, b"\x0f\xa1bye")
    assert (ws.closed_by, ws.close_code, ws.close_reason) == ("local", 4001, "bye")
    assert_eof(raw)  # the socket is closed once the handshake is done


def test_close_4001_bye_round_trip_client_to_server(pair):
    client, server = pair
    receiving = gevent.spawn(server.receive)
    client.close(4001, "bye")
    assert receiving.get(timeout=5) is None
    assert (server.closed_by, server.close_code, server.close_reason) == ("peer", 4001, "bye")
    assert (client.closed_by, client.close_code, client.close_reason) == ("local", 4001, "bye")


def test_close_4001_bye_round_trip_server_to_client(pair):
    client, server = pair
    receiving = gevent.spawn(client.receive)
    server.close(4001, "bye")
    assert receiving.get(timeout=5) is None
    assert (client.closed_by, client.close_code, client.close_reason) == ("peer", 4001, "bye")
    assert (server.closed_by, server.close_code, server.close_reason) == ("local", 4001, "bye")


def test_peer_close_is_echoed_with_its_code_and_reason(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_CLOSE, b"\x0f\xa1bye"))
    assert ws.receive() is None
    assert read_raw_close(raw) == (4001, "bye")
    assert_eof(raw)
    assert ws.receive() is None and ws.receive_frame() is None


def test_empty_peer_close_is_echoed_empty_and_reads_as_1005(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_CLOSE))
    assert ws.receive() is None
    assert read_raw_close(raw) == (None, "")
    assert (ws.closed_by, ws.close_code) == ("peer", CloseCode.NO_STATUS)


@pytest.mark.parametrize("code", [1012, 1013, 1014, 3000, 4999])
def test_registry_and_application_close_codes_are_accepted(server_and_raw, code):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_CLOSE, struct.pack("!H", code)))
    assert ws.receive() is None
    assert (ws.closed_by, ws.close_code) == ("peer", code)
    assert read_raw_close(raw) == (code, "")


def test_second_close_is_a_no_op(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_CLOSE, b"\x03\xe8"))  # the peer's reply, already waiting
    ws.close(4001, "bye")
    ws.close(1000, "again")
    assert read_raw_close(raw) == (4001, "bye")
    assert_eof(raw)  # and no second close frame before the EOF


# -- 2 and 4: protocol errors answered on the wire ------------------------------------

WIRE_ERRORS = {
    "unmasked frame from a client": (raw_frame(OP_TEXT, b"hi", masked=False), 1002),
    "rsv1 without extension": (raw_frame(OP_TEXT, b"hi", rsv=4), 1002),
    "reserved opcode 3": (raw_frame(3, b"hi"), 1002),
    "reserved opcode 0xb": (raw_frame(0xB), 1002),
    "fragmented ping": (raw_frame(OP_PING, b"hi", fin=False), 1002),
    "ping of 126 bytes": (raw_frame(OP_PING, b"x" * 126), 1002),
    "continuation without a start": (raw_frame(OP_CONTINUATION, b"hi"), 1002),
    "new message inside a fragmented one": (raw_frame(OP_TEXT, b"a", fin=False) + raw_frame(OP_BINARY, b"b"), 1002),
    "1-byte close": (raw_frame(OP_CLOSE, b"\x03"), 1002),
    "close code 0": (raw_frame(OP_CLOSE, b"\x00\x00"), 1002),
    "close code 999": (raw_frame(OP_CLOSE, struct.pack("!H", 999)), 1002),
    "close code 1004": (raw_frame(OP_CLOSE, struct.pack("!H", 1004)), 1002),
    "close code 1005": (raw_frame(OP_CLOSE, struct.pack("!H", 1005)), 1002),
    "close code 1006": (raw_frame(OP_CLOSE, struct.pack("!H", 1006)), 1002),
    "close code 1015": (raw_frame(OP_CLOSE, struct.pack("!H", 1015)), 1002),
    "close code 1016": (raw_frame(OP_CLOSE, struct.pack("!H", 1016)), 1002),
    "close code 2999": (raw_frame(OP_CLOSE, struct.pack("!H", 2999)), 1002),
    "close code 5000": (raw_frame(OP_CLOSE, struct.pack("!H", 5000)), 1002),
    "close reason not utf-8": (raw_frame(OP_CLOSE, b"\x03\xe8\xff\xfe"), 1007),
    "text not utf-8": (raw_frame(OP_TEXT, b"caf\xe9"), 1007),
    "frame over max_message_size": (raw_frame(OP_BINARY, b"x" * 1001), 1009),
    "message over max_message_size": (raw_frame(OP_BINARY, b"x" * 600, fin=False)
                                      + raw_frame(OP_CONTINUATION, b"x" * 600), 1009),
}


@pytest.mark.parametrize("name", WIRE_ERRORS)
def test_protocol_error_closes_with_its_code_on_the_wire(server_and_raw, name):
    ws, raw = server_and_raw
    data, code = WIRE_ERRORS[name]
    peer = peer_answering_close(raw)
    raw.sendall(data)
    assert ws.receive() is None
    assert (ws.closed_by, ws.close_code) == ("error", code)
    wire_code, wire_reason = peer.get(timeout=5)
    assert wire_code == code and wire_reason  # never an empty close frame


def test_oversized_frame_is_refused_from_its_header_before_the_payload(server_and_raw):
    ws, raw = server_and_raw
    peer = peer_answering_close(raw)
    raw.sendall(raw_frame(OP_BINARY, length=1 << 40)[:14])  # claims a terabyte, sends none of it
    assert ws.receive() is None
    assert peer.get(timeout=5)[0] == CloseCode.MESSAGE_TOO_BIG


def test_invalid_utf8_in_a_first_fragment_fails_without_waiting_for_the_rest(server_and_raw):
    ws, raw = server_and_raw
    peer = peer_answering_close(raw)
    raw.sendall(raw_frame(OP_TEXT, "κόσμε".encode() + b"\xf4\x90\x80\x80", fin=False))
    assert ws.receive() is None
    assert peer.get(timeout=5)[0] == CloseCode.INVALID_DATA


def test_client_side_refuses_masked_frames_and_masks_its_close():
    ours, raw = socket.socketpair()
    ws = WebSocket(ours, server_side=False, close_timeout=5)

    def peer():
        frame = read_raw_frame(raw)
        raw.shutdown(socket.SHUT_WR)
        assert_eof(raw)
        return frame

    answering = gevent.spawn(peer)
    raw.sendall(raw_frame(OP_TEXT, b"hi", masked=True))
    assert ws.receive() is None
    fin, opcode, masked, payload = answering.get(timeout=5)
    assert (opcode, masked, payload[:2]) == (OP_CLOSE, True, b"\x03\xea")
    raw.close()


def test_client_side_accepts_unmasked_frames_and_sends_masked():
    ours, raw = socket.socketpair()
    ws = WebSocket(ours, server_side=False)
    raw.sendall(raw_frame(OP_TEXT, b"hi", masked=False))
    assert ws.receive() == "hi"
    ws.send(b"yo")
    assert read_raw_frame(raw) == (True, OP_BINARY, True, b"yo")
    ws.abort()
    raw.close()


def test_eof_without_close_frame_is_1006(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_TEXT, b"last"))
    raw.shutdown(socket.SHUT_WR)
    assert ws.receive() == "last"
    assert ws.receive() is None
    assert (ws.closed_by, ws.close_code) == ("error", CloseCode.ABNORMAL)
    with pytest.raises(ConnectionClosed) as info:
        ws.send("too late")
    assert info.value.code == CloseCode.ABNORMAL


def test_eof_inside_a_frame_is_1006(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_TEXT, b"cut short")[:8])
    raw.shutdown(socket.SHUT_WR)
    assert ws.receive() is None
    assert (ws.closed_by, ws.close_code) == ("error", CloseCode.ABNORMAL)


# -- 3. message types ------------------------------------------------------------------


def test_send_bytes_is_binary_str_is_text_and_bytes_as_text_are_verbatim(server_and_raw):
    ws, raw = server_and_raw
    ws.send(b"\x00\xff")
    ws.send("café")
    ws.send("café".encode(), binary=False)
    ws.send("str as binary", binary=True)
    assert read_raw_frame(raw) == (True, OP_BINARY, False, b"\x00\xff")
    assert read_raw_frame(raw) == (True, OP_TEXT, False, "café".encode())
    assert read_raw_frame(raw) == (True, OP_TEXT, False, "café".encode())  # never "b'caf\\xc3\\xa9'"
    assert read_raw_frame(raw) == (True, OP_BINARY, False, b"str as binary")


def test_send_invalid_utf8_as_text_is_refused_before_writing(server_and_raw):
    ws, raw = server_and_raw
    with pytest.raises(ValueError):
        ws.send(b"\xff", binary=False)
    ws.send(b"next")
    assert read_raw_frame(raw)[3] == b"next"


def test_receive_gives_str_for_text_and_bytes_for_binary(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_TEXT, "héllo".encode()) + raw_frame(OP_BINARY, b"\x01\x02"))
    assert ws.receive() == "héllo"
    assert ws.receive() == b"\x01\x02"


def test_ping_and_pong_payloads_bytes_or_str(server_and_raw):
    ws, raw = server_and_raw
    ws.ping(b"\x01bin")
    ws.ping("txt")
    ws.pong(b"p")
    assert read_raw_frame(raw) == (True, OP_PING, False, b"\x01bin")
    assert read_raw_frame(raw) == (True, OP_PING, False, b"txt")
    assert read_raw_frame(raw) == (True, OP_PONG, False, b"p")
    with pytest.raises(ValueError):
        ws.ping(b"x" * 126)


def test_close_reason_given_as_bytes(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_CLOSE, b"\x03\xe8"))
    ws.close(1001, "adiós".encode())
    assert read_raw_close(raw) == (1001, "adiós")
    assert ws.close_reason == "adiós"


def test_ping_is_answered_with_a_pong_between_fragments(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_TEXT, b"ab", fin=False) + raw_frame(OP_PING, b"\x00\x01")
                + raw_frame(OP_CONTINUATION, "çd".encode()))
    assert ws.receive() == "abçd"
    assert read_raw_frame(raw) == (True, OP_PONG, False, b"\x00\x01")


def test_auto_pong_off_leaves_pings_to_the_caller():
    ours, raw = socket.socketpair()
    ws = WebSocket(ours, server_side=True, auto_pong=False)
    raw.sendall(raw_frame(OP_PING, b"1") + raw_frame(OP_TEXT, b"t"))
    assert ws.receive_frame().opcode == OP_PING
    assert ws.receive() == "t"
    ws.send("marker")
    assert read_raw_frame(raw) == (True, OP_TEXT, False, b"marker")  # no pong went first
    ws.abort()
    raw.close()


def test_receive_frame_surfaces_fragments_and_control_frames(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_TEXT, b"a\xce", fin=False) + raw_frame(OP_PONG, b"p")
                + raw_frame(OP_CONTINUATION, b"\xbab") + raw_frame(OP_CLOSE, b"\x03\xe8"))
    frames = [ws.receive_frame() for _ in range(5)]
    assert [(f.opcode, f.fin, f.payload, f.text) for f in frames[:4]] == [
        (OP_TEXT, False, b"a\xce", "a"),
        (OP_PONG, True, b"p", None),
        (OP_CONTINUATION, True, b"\xbab", "κb"),
        (OP_CLOSE, True, b"\x03\xe8", None),
    ]
    assert frames[4] is None
    assert ws.closed_by == "peer"
    assert read_raw_close(raw) == (1000, "")  # echoed before the close frame was returned


def test_initial_bytes_are_read_before_the_socket():
    ours, raw = socket.socketpair()
    second = raw_frame(OP_TEXT, b"second")
    ws = WebSocket(ours, server_side=True, initial=raw_frame(OP_TEXT, b"first") + second[:5])
    raw.sendall(second[5:] + raw_frame(OP_TEXT, b"third"))
    assert ws.receive() == "first"
    assert ws.receive() == "second"  # a frame cut between initial and the socket
    assert ws.receive() == "third"
    ws.abort()
    raw.close()


def test_take_unread_hands_over_initial_bytes():
    ours, raw = socket.socketpair()
    data = raw_frame(OP_TEXT, b"x") + raw_frame(OP_BINARY, b"y")
    ws = WebSocket(ours, server_side=True, initial=data)
    assert ws.take_unread() == data
    ws.abort()
    raw.close()


# -- 5 and 6: big messages ------------------------------------------------------------------


def test_one_mib_text_round_trip_through_a_server_side_echo(pair):
    client, server = pair
    text = "é" * (512 * 1024)  # 1 MiB of UTF-8

    def echo():
        message = server.receive()
        server.send(message)

    echoing = gevent.spawn(echo)
    started = time.perf_counter()
    client.send(text)
    assert client.receive() == text
    elapsed = time.perf_counter() - started
    echoing.get(timeout=5)
    print(f"1 MiB text round trip: {elapsed * 1000:.1f} ms")


def test_large_fragmented_message_within_the_limit_is_reassembled(pair):
    client, server = pair
    parts = [b"a" * 70000, b"b" * 70000, b"c" * 10]
    sender = gevent.spawn(lambda: (client.send_frame(OP_BINARY, parts[0], fin=False),
                                   client.send_frame(OP_CONTINUATION, parts[1], fin=False),
                                   client.send_frame(OP_CONTINUATION, parts[2])))
    assert server.receive() == b"".join(parts)
    sender.get(timeout=5)


# -- 8. nothing written implicitly ---------------------------------------------------------


def test_garbage_collected_unclosed_websocket_writes_nothing():
    ours, raw = socket.socketpair()
    ws = WebSocket(ours, server_side=True)
    ws.send("hello")
    del ws
    gc.collect()
    ours.sendall(b"MARK")  # the socket lives on; the next bytes on the wire must be exactly these
    assert read_raw_frame(raw) == (True, OP_TEXT, False, b"hello")
    assert recv_exactly(raw, 4) == b"MARK"
    ours.close()
    assert_eof(raw)


# -- 9. concurrent writers ---------------------------------------------------------------------


def test_concurrent_writers_never_interleave_frames(pair):
    client, server = pair
    count = 1000
    size = 4096  # big enough that sendall blocks and the writers take turns

    def write(tag):
        for i in range(count):
            client.send(f"{tag}:{i}:".encode() + bytes([tag]) * size)

    def read():
        next_index = {1: 0, 2: 0, 3: 0}
        for _ in range(3 * count):
            tag, index, body = server.receive().split(b":", 2)
            tag = int(tag)
            assert int(index) == next_index[tag] and body == bytes([tag]) * size
            next_index[tag] += 1
        return next_index

    reader = gevent.spawn(read)
    writers = [gevent.spawn(write, tag) for tag in (1, 2, 3)]
    gevent.joinall(writers, raise_error=True, timeout=10)  # a writer's error surfaces here at once
    assert all(writer.successful() for writer in writers)
    assert reader.get(timeout=10) == {1: count, 2: count, 3: count}


def test_send_timeout_drops_a_connection_whose_peer_does_not_read():
    ours, raw = socket.socketpair()
    ws = WebSocket(ours, server_side=True, send_timeout=0.2)
    with pytest.raises(ConnectionClosed) as info:
        for _ in range(1000):
            ws.send(b"x" * 65536)  # the peer never reads: the buffers fill and sendall blocks
    assert info.value.code == CloseCode.ABNORMAL
    assert ws.closed_by == "error" and "slow reader" in ws.close_reason
    raw.close()


# -- close() with and without another reader ----------------------------------------------------


def test_close_while_another_greenlet_receives_lets_that_reader_finish(server_and_raw):
    ws, raw = server_and_raw
    reader_waiting = Event()

    def read():
        reader_waiting.set()
        return ws.receive()

    reader = gevent.spawn(read)
    reader_waiting.wait()
    gevent.idle()  # let the reader block in recv

    def peer():
        assert read_raw_close(raw) == (4001, "bye")
        raw.sendall(raw_frame(OP_TEXT, b"in flight") + raw_frame(OP_CLOSE, b"\x0f\xa1bye"))

    replying = gevent.spawn(peer)
    ws.close(4001, "bye")  # must not start a second reader (ConcurrentObjectUseError)
    assert reader.get(timeout=5) == "in flight"
    assert ws.receive() is None
    replying.get(timeout=5)
    assert (ws.closed_by, ws.close_code) == ("local", 4001)
    assert_eof(raw)


def test_close_without_a_reply_gives_up_after_wait(server_and_raw):
    ws, raw = server_and_raw
    ws.close(1001, "going", wait=0.1)  # the raw peer never answers
    assert read_raw_close(raw) == (1001, "going")
    assert_eof(raw)
    assert ws.closed_by == "local"


def test_close_with_a_blocked_reader_and_no_reply_closes_the_socket(server_and_raw):
    ws, raw = server_and_raw
    reader = gevent.spawn(ws.receive)
    gevent.idle()
    ws.close(1000, wait=0.1)
    assert reader.get(timeout=5) is None
    assert read_raw_close(raw) == (1000, "")
    assert_eof(raw)


def test_close_discards_data_while_waiting_for_the_reply(server_and_raw):
    ws, raw = server_and_raw
    raw.sendall(raw_frame(OP_TEXT, b"ignored") + raw_frame(OP_BINARY, b"too") + raw_frame(OP_CLOSE, b"\x03\xe8"))
    ws.close()
    assert read_raw_close(raw) == (1000, "")
    assert_eof(raw)
    assert ws.receive() is None


def test_send_after_close_raises_connection_closed(server_and_raw):
    ws, raw = server_and_raw
    ws.close(4001, "bye", wait=0.05)
    with pytest.raises(ConnectionClosed) as info:
        ws.send("late")
    assert (info.value.code, info.value.reason) == (4001, "bye")


def test_abort_sends_nothing(server_and_raw):
    ws, raw = server_and_raw
    ws.abort()
    assert_eof(raw)
    assert (ws.closed_by, ws.close_code) == ("local", CloseCode.ABNORMAL)


def test_send_raw_with_close_counts_as_our_close(server_and_raw):
    ws, raw = server_and_raw
    ws.send_raw(b"\x88\x05\x0f\xa1bye", close=(4001, "bye"))
    assert read_raw_close(raw) == (4001, "bye")
    assert (ws.closed_by, ws.close_code) == ("local", 4001)
    ws.close()  # no second close frame
    raw.sendall(raw_frame(OP_CLOSE, b"\x0f\xa1bye"))
    assert ws.receive() is None
    assert_eof(raw)


# -- connect() against a tiny raw server -----------------------------------------------------------


class RawServer:
    """A listening socket on port 0 whose single connection is handled by ``answer(conn, request)``."""

    def __init__(self, answer):
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.request = None
        self.conn = None
        self.greenlet = gevent.spawn(self._serve, answer)

    def _serve(self, answer):
        self.conn, _ = self.listener.accept()
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.conn.recv(4096)
        self.request = data.decode("latin-1")
        answer(self.conn, self.request)

    def header(self, name):
        return [line.split(":", 1)[1].strip() for line in self.request.split("\r\n")[1:]
                if line.lower().startswith(name.lower() + ":")]

    def close(self):
        self.greenlet.kill()
        self.listener.close()
        if self.conn is not None:
            self.conn.close()


def accept_value(request):
    key = next(line.split(":", 1)[1].strip() for line in request.split("\r\n")
               if line.lower().startswith("sec-websocket-key:"))
    return base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()


def switching(request, extra=""):
    return (f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Accept: {accept_value(request)}\r\n{extra}\r\n").encode()


@pytest.fixture
def raw_server():
    servers = []

    def start(answer):
        servers.append(RawServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_connect_handshake_passes_headers_and_keeps_early_frames(raw_server):
    def answer(conn, request):
        # The 101 and the first frame in one write: the frame must land in `initial`.
        conn.sendall(switching(request, "Sec-WebSocket-Protocol: chat\r\n") + raw_frame(OP_TEXT, b"early", masked=False))
        assert read_raw_frame(conn) == (True, OP_TEXT, True, b"hi")
        conn.sendall(raw_frame(OP_CLOSE, b"\x0f\xa1bye", masked=False))
        read_raw_frame(conn)
        conn.close()

    server = raw_server(answer)
    headers = [("Cookie", "a=1"), ("Origin", "http://example.test"), ("User-Agent", "glb-test"),
               ("X-Forwarded-For", "10.0.0.1"), ("Sec-WebSocket-Protocol", "chat, superchat"),
               ("Sec-WebSocket-Extensions", "permessage-deflate"), ("Sec-WebSocket-Key", "client's own key")]
    ws, status_line, response_headers = connect(f"ws://127.0.0.1:{server.port}/path/x?a=1&b=2", headers=headers,
                                                subprotocols=["ignored"])
    assert status_line == "HTTP/1.1 101 Switching Protocols"
    assert ("Sec-WebSocket-Protocol", "chat") in response_headers
    request_line = server.request.split("\r\n")[0]
    assert request_line == "GET /path/x?a=1&b=2 HTTP/1.1"
    assert server.header("Host") == [f"127.0.0.1:{server.port}"]
    for name, value in headers[:-1]:
        assert server.header(name) == [value]
    assert len(server.header("Sec-WebSocket-Key")) == 1 and server.header("Sec-WebSocket-Key") != ["client's own key"]
    assert server.header("Sec-WebSocket-Version") == ["13"]
    assert ws.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    assert ws.receive() == "early"
    ws.send("hi")
    assert ws.receive() is None
    assert (ws.closed_by, ws.close_code, ws.close_reason) == ("peer", 4001, "bye")
    server.greenlet.get(timeout=5)


def test_connect_keeps_a_host_header_given_by_the_caller(raw_server):
    server = raw_server(lambda conn, request: conn.sendall(switching(request)))
    ws, _, _ = connect(f"ws://127.0.0.1:{server.port}", headers=[("Host", "public.example")])
    assert server.header("Host") == ["public.example"]
    assert server.request.startswith("GET / HTTP/1.1\r\n")
    ws.abort()


def test_connect_refused_upgrade_carries_status_headers_and_body(raw_server):
    body = b"no backend for you"

    def answer(conn, request):
        conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n" % len(body) + body)

    server = raw_server(answer)
    with pytest.raises(HandshakeFailed) as info:
        connect(f"ws://127.0.0.1:{server.port}/")
    assert info.value.status == 403
    assert ("Content-Type", "text/plain") in info.value.headers
    assert info.value.body == body
    assert "403" in info.value.reason


def test_connect_refused_with_a_chunked_body(raw_server):
    def answer(conn, request):
        conn.sendall(b"HTTP/1.1 500 Oops\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")

    server = raw_server(answer)
    with pytest.raises(HandshakeFailed) as info:
        connect(f"ws://127.0.0.1:{server.port}/")
    assert (info.value.status, info.value.body) == (500, b"hello world")


def test_connect_checks_sec_websocket_accept(raw_server):
    def answer(conn, request):
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Accept: d3Jvbmc=\r\n\r\n")

    server = raw_server(answer)
    with pytest.raises(HandshakeFailed) as info:
        connect(f"ws://127.0.0.1:{server.port}/")
    assert info.value.status == 101 and "Accept" in info.value.reason


def test_connect_refuses_a_subprotocol_that_was_not_offered(raw_server):
    server = raw_server(lambda conn, request: conn.sendall(switching(request, "Sec-WebSocket-Protocol: evil\r\n")))
    with pytest.raises(HandshakeFailed) as info:
        connect(f"ws://127.0.0.1:{server.port}/", subprotocols=["chat"])
    assert "evil" in info.value.reason


def test_connect_refuses_response_heads_over_64_kib(raw_server):
    def answer(conn, request):
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\n" + b"X-Filler: " + b"y" * 70000 + b"\r\n\r\n")

    server = raw_server(answer)
    with pytest.raises(HandshakeFailed) as info:
        connect(f"ws://127.0.0.1:{server.port}/")
    assert "64" in info.value.reason or "65536" in info.value.reason


def test_connect_refused_connection_has_no_status():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    with pytest.raises(HandshakeFailed) as info:
        connect(f"ws://127.0.0.1:{port}/")
    assert info.value.status is None and "cannot connect" in info.value.reason


def test_connect_times_out_when_the_server_never_answers(raw_server):
    answered = Event()
    server = raw_server(lambda conn, request: answered.wait())
    with pytest.raises(HandshakeFailed) as info:
        connect(f"ws://127.0.0.1:{server.port}/", timeout=0.2)
    assert info.value.status is None and "timed out" in info.value.reason
    answered.set()


def test_connect_rejects_non_websocket_urls():
    with pytest.raises(ValueError):
        connect("http://127.0.0.1/")
