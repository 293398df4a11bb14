"""RFC 6455 framing without sockets: bytes in, frames or notes out.

Three consumers share the rules written here once:

* ``encode_frame`` / ``encode_close_payload`` build what glb sends;
* ``FrameReader`` turns received bytes into whole, unmasked, validated frames
  for ``glb.websocket.WebSocket``;
* ``FrameScanner`` watches a byte stream that a relay forwards unchanged and
  reports only what the relay must act on, without copying data payloads.

Every way a peer can break the protocol raises ``ProtocolError`` carrying the
close code to answer with: 1002 for framing, 1007 for invalid UTF-8,
1009 (``MessageTooBig``) for the size limit.
"""
import codecs
import os
import struct
from collections import namedtuple

from glb.errors import CloseCode, MessageTooBig, ProtocolError, is_sendable_close_code

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

DATA_OPCODES = frozenset({OP_CONTINUATION, OP_TEXT, OP_BINARY})
CONTROL_OPCODES = frozenset({OP_CLOSE, OP_PING, OP_PONG})
MAX_CONTROL_PAYLOAD = 125
MAX_CLOSE_REASON = MAX_CONTROL_PAYLOAD - 2

FrameHeader = namedtuple(
    "FrameHeader", "fin rsv opcode masked length mask_key header_length"
)
FrameHeader.__doc__ = """One parsed frame header.

``rsv`` is the three RSV bits as an integer (RSV1 = 4, RSV2 = 2, RSV3 = 1);
``mask_key`` is 4 bytes or None; ``header_length`` is where the payload starts.
"""

Frame = namedtuple("Frame", "opcode fin payload text")
Frame.__doc__ = """One received frame, payload unmasked.

``opcode`` is the frame's own (OP_CONTINUATION for later fragments).
``text`` is the str decoded so far for frames of a text message (a character
cut between fragments is carried to the next one), None for everything else.
"""

Control = namedtuple("Control", "opcode payload code reason end")
Control.__doc__ = """A control frame FrameScanner saw complete.

``payload`` is unmasked; ``code``/``reason`` are set for OP_CLOSE only;
``end`` is the offset in the fed chunk just past the frame.
"""

Violation = namedtuple("Violation", "error offset")
Violation.__doc__ = """A protocol violation FrameScanner found.

``error`` is a ProtocolError (or MessageTooBig). ``offset`` is where the
offending frame's header starts in the fed chunk: forward ``chunk[:offset]``
and no more. It is negative when the frame began in an earlier chunk (those
bytes are already forwarded, so the other leg is mid-frame and cannot be sent
a frame any more).
"""

_HEADER_SHORT = struct.Struct("!BB")
_HEADER_16 = struct.Struct("!BBH")
_HEADER_64 = struct.Struct("!BBQ")
_CLOSE_CODE = struct.Struct("!H")
_new_utf8_decoder = codecs.getincrementaldecoder("utf-8")


def apply_mask(data: bytes | memoryview, key: bytes) -> bytes:
    """XOR ``data`` with the 4-byte ``key`` repeated, as one big-integer operation."""
    length = len(data)
    if not length:
        return b""
    repeated = (key * (length // 4 + 1))[:length]
    masked = int.from_bytes(data, "little") ^ int.from_bytes(repeated, "little")
    return masked.to_bytes(length, "little")


_mask_pool = bytearray()


def _mask_key():
    """4 unpredictable bytes, taken from os.urandom 4 KiB at a time (one syscall per 1024 frames)."""
    if not _mask_pool:
        _mask_pool.extend(os.urandom(4096))
    key = bytes(_mask_pool[-4:])
    del _mask_pool[-4:]
    return key


def encode_frame(opcode: int, payload: bytes | memoryview, fin: bool = True, mask: bool = False,
                 rsv: int = 0) -> bytes:
    """One frame on the wire; ``mask=True`` for frames a client sends."""
    length = len(payload)
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if mask else 0
    if length < 126:
        header = _HEADER_SHORT.pack(first, mask_bit | length)
    elif length < 0x10000:
        header = _HEADER_16.pack(first, mask_bit | 126, length)
    else:
        header = _HEADER_64.pack(first, mask_bit | 127, length)
    if mask:
        key = _mask_key()
        return b"".join((header, key, apply_mask(payload, key)))
    return b"".join((header, payload))


def frame_size(payload_length: int, masked: bool) -> int:
    """Bytes a frame with this payload takes on the wire, header (and mask key) included."""
    if payload_length < 126:
        header = 2
    elif payload_length < 0x10000:
        header = 4
    else:
        header = 10
    return header + (4 if masked else 0) + payload_length


def encode_close_payload(code: int, reason: str | bytes = "") -> bytes:
    """A close frame's payload; a reason too long for a control frame is cut at a character.

    ``CloseCode.NO_STATUS`` gives the empty payload (its only wire form).
    Codes that may not be sent raise ValueError: that is our mistake, not the peer's.
    """
    if isinstance(reason, (bytes, bytearray)):
        reason = bytes(reason).decode("utf-8")
    if code == CloseCode.NO_STATUS:
        if reason:
            raise ValueError("a close without a status code cannot carry a reason")
        return b""
    if not is_sendable_close_code(code):
        raise ValueError(f"close code {code} may not be sent")
    data = reason.encode("utf-8")
    if len(data) > MAX_CLOSE_REASON:
        data = data[:MAX_CLOSE_REASON].decode("utf-8", "ignore").encode("utf-8")
    return _CLOSE_CODE.pack(code) + data


def parse_close_payload(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` from a received close payload; empty means ``(NO_STATUS, "")``."""
    if not payload:
        return CloseCode.NO_STATUS, ""
    if len(payload) == 1:
        raise ProtocolError("close frame with a 1-byte payload")
    code = (payload[0] << 8) | payload[1]
    if not is_sendable_close_code(code):
        raise ProtocolError(f"invalid close code {code}")
    try:
        reason = bytes(payload[2:]).decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("close reason is not valid UTF-8", CloseCode.INVALID_DATA) from None
    return code, reason


def parse_frame_header(buf: bytes | bytearray | memoryview, offset: int = 0) -> FrameHeader | None:
    """The header starting at ``buf[offset]``, or None until enough bytes are there.

    Only structure is read here; ``check_header`` judges it.
    """
    available = len(buf) - offset
    if available < 2:
        return None
    first = buf[offset]
    second = buf[offset + 1]
    length = second & 0x7F
    size = 2
    if length == 126:
        if available < 4:
            return None
        length = (buf[offset + 2] << 8) | buf[offset + 3]
        size = 4
    elif length == 127:
        if available < 10:
            return None
        length = int.from_bytes(buf[offset + 2:offset + 10], "big")
        if length >> 63:
            raise ProtocolError("frame length has its most significant bit set")
        size = 10
    masked = second >= 0x80
    mask_key = None
    if masked:
        if available < size + 4:
            return None
        mask_key = bytes(buf[offset + size:offset + size + 4])
        size += 4
    return FrameHeader(first >= 0x80, (first >> 4) & 7, first & 0x0F, masked, length, mask_key, size)


def check_header(header: FrameHeader, expect_masked: bool) -> None:
    """Raise ProtocolError for a header that is wrong on its own, whatever came before."""
    if header.rsv:
        raise ProtocolError("reserved bits set without a negotiated extension")
    if header.masked != expect_masked:
        raise ProtocolError("unmasked frame from a client" if expect_masked else "masked frame from a server")
    opcode = header.opcode
    if opcode in CONTROL_OPCODES:
        if not header.fin:
            raise ProtocolError("fragmented control frame")
        if header.length > MAX_CONTROL_PAYLOAD:
            raise ProtocolError("control frame payload over 125 bytes")
        if opcode == OP_CLOSE and header.length == 1:
            raise ProtocolError("close frame with a 1-byte payload")
    elif opcode not in DATA_OPCODES:
        raise ProtocolError(f"reserved opcode {opcode:#x}")


class _MessageSequence:
    """Fragment ordering and the size limit, the part of validation that needs history."""

    # two per relayed session, thousands of sessions: no per-instance __dict__
    __slots__ = ("max_message_size", "in_message", "_message_size", "messages")

    def __init__(self, max_message_size):
        self.max_message_size = max_message_size
        self.in_message = False  # inside a fragmented data message
        self._message_size = 0
        self.messages = 0  # data messages whose final frame header was seen (for metrics)

    def _track_data_frame(self, opcode, fin, length):
        limit = self.max_message_size
        if length > limit:
            raise MessageTooBig(f"frame of {length} bytes is over the {limit}-byte limit")
        if opcode == OP_CONTINUATION:
            if not self.in_message:
                raise ProtocolError("continuation frame with no message to continue")
            size = self._message_size + length
            if size > limit:
                raise MessageTooBig(f"message of {size}+ bytes is over the {limit}-byte limit")
        else:
            if self.in_message:
                raise ProtocolError("new data frame inside a fragmented message")
            size = length
        self._message_size = size
        self.in_message = not fin
        if fin:
            self.messages += 1


class FrameReader(_MessageSequence):
    """Received bytes in, whole validated frames out (the receiving half of a WebSocket).

    The header is judged (including the size limit) as soon as it is complete,
    so an oversized frame is refused before its payload is buffered; the I/O
    layer calls ``next_frame()`` after every ``feed()``.
    """

    __slots__ = ("expect_masked", "_buffer", "_header", "_decoder")

    def __init__(self, max_message_size, expect_masked):
        super().__init__(max_message_size)
        self.expect_masked = expect_masked
        self._buffer = bytearray()
        self._header = None  # judged header whose payload is still arriving
        self._decoder: codecs.IncrementalDecoder | None = None  # while a text message is in progress

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> Frame | None:
        """The next complete frame, or None until more bytes are fed; raises ProtocolError."""
        buffer = self._buffer
        header = self._header
        if header is None:
            header = parse_frame_header(buffer)
            if header is None:
                return None
            check_header(header, self.expect_masked)
            if header.opcode < OP_CLOSE:
                self._track_data_frame(header.opcode, header.fin, header.length)
            self._header = header
        start = header.header_length
        end = start + header.length
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:
            if header.masked:
                payload = apply_mask(view[start:end], header.mask_key)
            else:
                payload = bytes(view[start:end])
        del buffer[:end]
        self._header = None
        return self._frame(header, payload)

    def _frame(self, header, payload):
        opcode = header.opcode
        text = None
        if opcode == OP_TEXT:
            self._decoder = _new_utf8_decoder()
        decoder = self._decoder
        if decoder is not None and opcode in (OP_TEXT, OP_CONTINUATION):
            try:
                text = decoder.decode(payload, header.fin)
            except UnicodeDecodeError:
                raise ProtocolError("invalid UTF-8 in a text message", CloseCode.INVALID_DATA) from None
            if header.fin:
                self._decoder = None
        elif opcode == OP_CLOSE:
            parse_close_payload(payload)
        return Frame(opcode, header.fin, payload, text)

    @property
    def at_boundary(self):
        """True when no frame is partly received."""
        return self._header is None and not self._buffer

    def take_unread(self) -> bytes:
        """Hand over buffered bytes that no frame has consumed, to a caller switching to raw relaying."""
        if self._header is not None or self.in_message:
            raise ValueError("cannot hand over the stream in the middle of a frame or message")
        data = bytes(self._buffer)
        self._buffer.clear()
        return data


_NO_PAYLOAD = bytearray()  # FrameScanner._control_payload while no control frame is collected (never written to)


class FrameScanner(_MessageSequence):
    """Follows frame boundaries in a relayed byte stream without copying payloads.

    ``feed(chunk)`` returns None in the common case, else a list of
    ``Control`` (a close, ping or pong completed) and at most one final
    ``Violation``; after a violation the scanner is spent (``error`` is set and
    feeding again raises RuntimeError). Only what headers reveal is checked,
    plus close payloads; text payloads are not UTF-8 validated.
    """

    __slots__ = ("expect_masked", "_mask_bit", "_skip", "_head", "_control", "_control_payload",
                 "_pending_start", "_position", "close_seen", "error", "_small", "_small_header")

    def __init__(self, max_message_size, expect_masked):
        super().__init__(max_message_size)
        self.expect_masked = expect_masked
        self._mask_bit = 0x80 if expect_masked else 0
        self._skip = 0  # bytes of the current data frame still to pass by
        self._head = b""  # start of a header cut by a chunk boundary
        self._control = None  # header of the control frame being collected
        self._control_payload: bytearray = _NO_PAYLOAD  # its payload so far, while one is collected
        self._pending_start = 0  # stream position of a frame begun in an earlier chunk
        self._position = 0  # stream position of the next chunk's first byte
        self.close_seen = False
        self.error = None
        self._small = min(MAX_CONTROL_PAYLOAD, max_message_size)  # see feed(); 125: a 7-bit length
        self._small_header = 6 if expect_masked else 2  # header of a frame under 126 bytes

    def _update_small(self):
        self._small = -1 if self.in_message or self.close_seen else min(MAX_CONTROL_PAYLOAD, self.max_message_size)

    @property
    def at_boundary(self):
        """True when the bytes fed so far end exactly between two frames."""
        return not (self._skip or self._head or self._control is not None)

    def feed(self, chunk: bytes | memoryview) -> list[Control | Violation] | None:
        if self.error is not None:
            raise RuntimeError("FrameScanner fed after a violation")
        size = len(chunk)
        pos = self._skip
        if pos >= size:  # the whole chunk is payload (or empty)
            self._skip = pos - size
            self._position += size
            return None
        if self._head or self._control is not None:
            return self._scan(chunk, pos)
        # Whole small text/binary messages, by far the common case, cost one test each: ``_small``
        # is the largest payload such a frame may have here (-1 inside a fragmented message or after
        # a close), and XOR with the expected mask bit makes a wrongly masked frame's length too big.
        small = self._small
        mask_bit = self._mask_bit
        last = size - 1
        while pos < last:
            first = chunk[pos]
            length = chunk[pos + 1] ^ mask_bit
            if length > small or (first != 0x81 and first != 0x82):
                break
            pos += length + self._small_header
            self.messages += 1
        if pos >= size:
            self._skip = pos - size
            self._position += size
            return None
        return self._scan(chunk, pos)

    def _scan(self, chunk, pos):
        """``feed`` from ``pos`` on, for anything but whole small messages (headers cut by chunk ends,
        control frames, fragments, large frames, violations)."""
        size = len(chunk)
        self._skip = 0
        notes = None
        start = pos
        whole = 0  # small whole messages passed by the fast path, added to ``messages`` once
        try:
            if self._control is not None or self._head:
                start = self._pending_start - self._position
                pos, note = self._resume(chunk)
                if note is not None:
                    notes = [note]
            mask_bit = self._mask_bit
            while pos < size:
                start = pos
                if size - pos < 2:
                    self._save_head(chunk, pos)
                    break
                first = chunk[pos]
                length = chunk[pos + 1] ^ mask_bit
                if length <= self._small and (first == 0x82 or first == 0x81):
                    # A whole small text/binary message, as in ``feed``.
                    pos += length + self._small_header
                    whole += 1
                    continue
                header = parse_frame_header(chunk, pos)
                if header is None:
                    self._save_head(chunk, pos)
                    break
                pos, note = self._begin(header, chunk, pos)
                if note is not None:
                    if notes is None:
                        notes = [note]
                    else:
                        notes.append(note)
            if pos > size:
                self._skip = pos - size
        except ProtocolError as exc:
            self.error = exc
            if notes is None:
                notes = []
            notes.append(Violation(exc, start))
        if whole:
            self.messages += whole
        self._position += size
        return notes

    @property
    def bytes_seen(self):
        """Every byte fed so far, frame headers included (what the relay forwarded)."""
        return self._position

    def _save_head(self, chunk, pos):
        self._head = bytes(chunk[pos:])
        self._pending_start = self._position + pos

    def _resume(self, chunk):
        """Finish the header or control payload begun in an earlier chunk: ``(pos, note)``."""
        if self._control is not None:
            header = self._control
            payload = self._control_payload
            take = min(header.length - len(payload), len(chunk))
            payload += chunk[:take]
            if len(payload) < header.length:
                return take, None
            self._control = None
            self._control_payload = _NO_PAYLOAD
            return take, self._control_note(header, payload, take)
        head = self._head
        joined = head + bytes(chunk[:14])
        header = parse_frame_header(joined)
        if header is None:
            self._head = joined
            return len(chunk), None
        self._head = b""
        return self._begin(header, chunk, -len(head))

    def _begin(self, header, chunk, start):
        """Judge a header found at ``start`` (negative: began earlier); ``(pos after it, note)``."""
        if self.close_seen:
            raise ProtocolError("frame after a close frame")
        check_header(header, self.expect_masked)
        payload_start = start + header.header_length
        end = payload_start + header.length
        if header.opcode < OP_CLOSE:
            self._track_data_frame(header.opcode, header.fin, header.length)
            self._update_small()
            return end, None
        if end <= len(chunk):
            return end, self._control_note(header, chunk[payload_start:end], end)
        self._control = header
        self._control_payload = bytearray(chunk[payload_start:])
        self._pending_start = self._position + start
        return len(chunk), None

    def _control_note(self, header, payload, end):
        payload = apply_mask(payload, header.mask_key) if header.masked else bytes(payload)
        if header.opcode == OP_CLOSE:
            code, reason = parse_close_payload(payload)
            self.close_seen = True
            self._update_small()
            return Control(OP_CLOSE, payload, code, reason, end)
        return Control(header.opcode, payload, None, None, end)
