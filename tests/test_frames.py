"""The socket-free framing layer: encoding, parsing, validation, FrameScanner."""
import codecs
import struct

import pytest

from glb.errors import CloseCode, MessageTooBig, ProtocolError
from glb.frames import (
    OP_BINARY,
    OP_CLOSE,
    OP_CONTINUATION,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Control,
    FrameReader,
    FrameScanner,
    Violation,
    apply_mask,
    encode_close_payload,
    encode_frame,
    parse_close_payload,
    parse_frame_header,
)
from tests.support import hand_frame, slow_mask

KEY = b"\x01\x82\x13\xf4"


def frame(opcode, payload=b"", fin=True, rsv=0, key=KEY, length=None):
    """A masked frame built by hand, independently of encode_frame, to test the reader with."""
    return hand_frame(opcode, payload, fin, rsv, key, length)


# -- masking and encoding ------------------------------------------------------


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 9, 125, 126, 1000, 65537])
def test_apply_mask_matches_reference_and_inverts(length):
    data = bytes((i * 7 + 3) % 256 for i in range(length))
    masked = apply_mask(data, KEY)
    assert masked == slow_mask(data, KEY)
    assert apply_mask(masked, KEY) == data


def test_apply_mask_keeps_leading_and_trailing_zero_bytes():
    data = b"\x00" * 9
    assert apply_mask(data, b"\x00\x00\x00\x00") == data
    assert apply_mask(KEY, KEY) == b"\x00" * 4


@pytest.mark.parametrize("length, header_length", [(0, 2), (125, 2), (126, 4), (65535, 4), (65536, 10)])
def test_encode_frame_length_forms(length, header_length):
    payload = b"x" * length
    data = encode_frame(OP_BINARY, payload)
    header = parse_frame_header(data)
    assert header == (True, 0, OP_BINARY, False, length, None, header_length)
    assert data[header_length:] == payload


def test_encode_frame_masked_round_trips_with_a_fresh_key():
    first = encode_frame(OP_TEXT, b"hello", mask=True)
    second = encode_frame(OP_TEXT, b"hello", mask=True)
    header = parse_frame_header(first)
    assert header.masked and header.header_length == 6
    assert apply_mask(first[6:], header.mask_key) == b"hello"
    key = parse_frame_header(second).mask_key
    assert key != header.mask_key  # each frame takes the next 4 bytes of the pool
    assert apply_mask(second[6:], key) == b"hello"


def test_encode_frame_fin_and_rsv_bits():
    assert encode_frame(OP_TEXT, b"", fin=False)[0] == 0x01
    assert encode_frame(OP_TEXT, b"", rsv=4)[0] == 0xC1


def test_parse_frame_header_needs_every_header_byte():
    data = frame(OP_BINARY, b"x" * 70000)
    for cut in range(14):
        assert parse_frame_header(data[:cut]) is None
    assert parse_frame_header(data[:14]).length == 70000
    assert parse_frame_header(b"??" + data[:14], offset=2).length == 70000


def test_parse_frame_header_refuses_a_64_bit_length_with_the_top_bit_set():
    with pytest.raises(ProtocolError):
        parse_frame_header(b"\x82\x7f" + b"\x80" + b"\x00" * 7)


# -- close payloads --------------------------------------------------------------


@pytest.mark.parametrize("code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011,
                                  1012, 1013, 1014, 3000, 4001, 4999])
def test_close_payload_round_trip_for_valid_codes(code):
    assert parse_close_payload(encode_close_payload(code, "bye")) == (code, "bye")


def test_close_payload_4001_bye_on_the_wire():
    assert encode_close_payload(4001, "bye") == b"\x0f\xa1bye"
    assert encode_close_payload(4001, b"bye") == b"\x0f\xa1bye"


def test_empty_close_payload_means_no_status():
    assert parse_close_payload(b"") == (CloseCode.NO_STATUS, "")
    assert encode_close_payload(CloseCode.NO_STATUS) == b""


@pytest.mark.parametrize("code", [0, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535])
def test_invalid_close_codes_are_protocol_errors(code):
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(struct.pack("!H", code))
    assert info.value.code == CloseCode.PROTOCOL_ERROR
    if code != CloseCode.NO_STATUS:  # whose wire form is the empty payload
        with pytest.raises(ValueError):
            encode_close_payload(code)


def test_one_byte_close_payload_is_a_protocol_error():
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(b"\x03")
    assert info.value.code == CloseCode.PROTOCOL_ERROR


def test_close_reason_not_utf8_is_1007():
    with pytest.raises(ProtocolError) as info:
        parse_close_payload(b"\x03\xe8\xff")
    assert info.value.code == CloseCode.INVALID_DATA


def test_long_close_reason_is_cut_at_a_character():
    payload = encode_close_payload(1000, "é" * 100)
    assert len(payload) <= 125
    assert parse_close_payload(payload) == (1000, "é" * 61)


# -- FrameReader -------------------------------------------------------------------


def read_all(data, expect_masked=True, max_message_size=1 << 20):
    reader = FrameReader(max_message_size, expect_masked)
    reader.feed(data)
    frames = []
    while (item := reader.next_frame()) is not None:
        frames.append(item)
    return frames


def test_reader_decodes_text_split_inside_a_character():
    text = "κόσμε"
    data = text.encode()
    frames = read_all(frame(OP_TEXT, data[:3], fin=False) + frame(OP_CONTINUATION, data[3:]))
    assert "".join(f.text for f in frames) == text
    assert frames[0].text == "κ"  # the cut character waits for the next fragment
    assert [f.payload for f in frames] == [data[:3], data[3:]]


def test_reader_returns_control_frames_between_fragments():
    frames = read_all(frame(OP_BINARY, b"ab", fin=False) + frame(OP_PING, b"p")
                      + frame(OP_CONTINUATION, b"cd"))
    assert [(f.opcode, f.fin, f.payload, f.text) for f in frames] == [
        (OP_BINARY, False, b"ab", None), (OP_PING, True, b"p", None), (OP_CONTINUATION, True, b"cd", None)]


def test_reader_byte_by_byte_gives_the_same_frames():
    stream = frame(OP_TEXT, "héllo".encode(), fin=False) + frame(OP_CONTINUATION, b"!") + frame(OP_BINARY, b"\0" * 300)
    reader = FrameReader(1 << 20, True)
    frames = []
    for i in range(len(stream)):
        reader.feed(stream[i:i + 1])
        while (item := reader.next_frame()) is not None:
            frames.append(item)
    assert frames == read_all(stream)
    assert reader.at_boundary


PROTOCOL_ERRORS = {
    "unmasked frame from a client": (frame(OP_TEXT, b"hi", key=None), 1002),
    "rsv1 without extension": (frame(OP_TEXT, b"hi", rsv=4), 1002),
    "rsv3 without extension": (frame(OP_BINARY, b"hi", rsv=1), 1002),
    "reserved data opcode": (frame(3, b"hi"), 1002),
    "reserved control opcode": (frame(0xB, b"hi"), 1002),
    "fragmented ping": (frame(OP_PING, b"hi", fin=False), 1002),
    "ping over 125 bytes": (frame(OP_PING, b"x" * 126), 1002),
    "continuation without a start": (frame(OP_CONTINUATION, b"hi"), 1002),
    "text inside a fragmented message": (frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002),
    "close with 1 byte": (frame(OP_CLOSE, b"\x03"), 1002),
    "close code 1005": (frame(OP_CLOSE, b"\x03\xed"), 1002),
    "close reason not utf-8": (frame(OP_CLOSE, b"\x03\xe8\xc3\x28"), 1007),
    "text not utf-8": (frame(OP_TEXT, b"\xce\xba\xff"), 1007),
    "frame over the limit": (frame(OP_BINARY, length=2000), 1009),
    "message over the limit": (frame(OP_BINARY, b"x" * 600, fin=False) + frame(OP_CONTINUATION, b"x" * 600), 1009),
}


@pytest.mark.parametrize("name", PROTOCOL_ERRORS)
def test_reader_protocol_errors(name):
    data, code = PROTOCOL_ERRORS[name]
    with pytest.raises(ProtocolError) as info:
        read_all(data, max_message_size=1000)
    assert info.value.code == code


def test_reader_refuses_masked_frames_as_a_client():
    with pytest.raises(ProtocolError) as info:
        read_all(frame(OP_TEXT, b"hi"), expect_masked=False)
    assert info.value.code == 1002
    assert read_all(frame(OP_TEXT, b"hi", key=None), expect_masked=False)[0].text == "hi"


def test_reader_refuses_an_oversized_frame_from_its_header_alone():
    reader = FrameReader(1000, True)
    reader.feed(frame(OP_BINARY, length=1 << 40)[:14])  # no payload at all
    with pytest.raises(MessageTooBig):
        reader.next_frame()


def test_reader_fails_fast_on_invalid_utf8_in_a_first_fragment():
    # Autobahn 6.4.1: the rest of the message never needs to arrive.
    data = "κόσμε".encode() + b"\xf4\x90\x80\x80"
    with pytest.raises(ProtocolError) as info:
        read_all(frame(OP_TEXT, data, fin=False))
    assert info.value.code == 1007


def test_reader_fails_on_a_truncated_character_at_message_end():
    with pytest.raises(ProtocolError) as info:
        read_all(frame(OP_TEXT, b"ab\xce", fin=False) + frame(OP_CONTINUATION, b""))
    assert info.value.code == 1007


def test_reader_accepts_text_split_across_many_fragments():
    text = "ab😀cdé" * 3
    data = text.encode()
    stream = frame(OP_TEXT, data[:1], fin=False)
    stream += b"".join(frame(OP_CONTINUATION, data[i:i + 1], fin=False) for i in range(1, len(data)))
    stream += frame(OP_CONTINUATION, b"")
    assert "".join(f.text for f in read_all(stream)) == text


# -- FrameScanner ---------------------------------------------------------------------


def scan(chunks, expect_masked=True, max_message_size=1000):
    """Feed chunks until a violation; return the notes with offsets made absolute, and at_boundary after each chunk."""
    scanner = FrameScanner(max_message_size, expect_masked)
    notes = []
    boundaries = []
    position = 0
    for chunk in chunks:
        if scanner.error is not None:
            break
        for note in scanner.feed(chunk) or ():
            if isinstance(note, Control):
                notes.append(note._replace(end=position + note.end))
            else:
                notes.append(("violation", note.error.code, position + note.offset))
        boundaries.append(scanner.at_boundary)
        position += len(chunk)
    return scanner, notes, boundaries


def splits(stream):
    """The stream cut in two at every byte, then fed one byte at a time."""
    for cut in range(len(stream) + 1):
        yield [stream[:cut], stream[cut:]]
    yield [stream[i:i + 1] for i in range(len(stream))]


STREAM_PARTS = [
    frame(OP_TEXT, b"hello"),
    frame(OP_BINARY, b"b" * 200, fin=False),
    frame(OP_PING, b"are you there"),
    frame(OP_CONTINUATION, b"c" * 300),
    frame(OP_PONG, b""),
    frame(OP_TEXT, b"x" * 126),
    frame(OP_CLOSE, encode_close_payload(4001, "bye")),
]
STREAM = b"".join(STREAM_PARTS)
ENDS = [sum(len(p) for p in STREAM_PARTS[:i + 1]) for i in range(len(STREAM_PARTS))]


def test_scanner_whole_stream_in_one_chunk():
    scanner, notes, boundaries = scan([STREAM])
    assert notes == [
        Control(OP_PING, b"are you there", None, None, ENDS[2]),
        Control(OP_PONG, b"", None, None, ENDS[4]),
        Control(OP_CLOSE, b"\x0f\xa1bye", 4001, "bye", ENDS[6]),
    ]
    assert boundaries == [True]
    assert scanner.close_seen and not scanner.in_message


def test_scanner_same_notes_at_every_split():
    _, expected, _ = scan([STREAM])
    for chunks in splits(STREAM):
        _, notes, _ = scan(chunks)
        assert notes == expected, [len(c) for c in chunks]


def test_scanner_at_boundary_exactly_between_frames():
    chunks = [STREAM[i:i + 1] for i in range(len(STREAM))]
    _, _, boundaries = scan(chunks)
    true_at = {i + 1 for i, at in enumerate(boundaries) if at}
    assert true_at == set(ENDS)


def test_scanner_tracks_in_message():
    scanner = FrameScanner(1000, True)
    scanner.feed(frame(OP_TEXT, b"a", fin=False))
    assert scanner.in_message and scanner.at_boundary
    scanner.feed(frame(OP_CONTINUATION, b"b"))
    assert not scanner.in_message


def test_scanner_unmasked_stream_as_a_client():
    stream = frame(OP_BINARY, b"x" * 70000, key=None) + frame(OP_PING, b"p", key=None)
    for chunks in ([stream], [stream[:5], stream[5:70005], stream[70005:]]):
        _, notes, boundaries = scan(chunks, expect_masked=False, max_message_size=1 << 20)
        assert notes == [Control(OP_PING, b"p", None, None, len(stream))]
        assert boundaries[-1]


SCANNER_VIOLATIONS = {
    "unmasked from a client": (frame(OP_TEXT, b"hi", key=None), 1002),
    "rsv bit": (frame(OP_TEXT, b"hi", rsv=2), 1002),
    "reserved opcode": (frame(7, b""), 1002),
    "fragmented control": (frame(OP_PONG, b"", fin=False), 1002),
    "control over 125": (frame(OP_PING, b"x" * 126), 1002),
    "orphan continuation": (frame(OP_CONTINUATION, b"x"), 1002),
    "close 1 byte": (frame(OP_CLOSE, b"\x03"), 1002),
    "close code 999": (frame(OP_CLOSE, b"\x03\xe7"), 1002),
    "close reason not utf-8": (frame(OP_CLOSE, b"\x03\xe8\xff"), 1007),
    "frame too big": (frame(OP_BINARY, length=5000), 1009),
    "frame after close": (frame(OP_CLOSE, b"") + frame(OP_TEXT, b"late"), 1002),
}


@pytest.mark.parametrize("name", SCANNER_VIOLATIONS)
def test_scanner_violation_offset_at_every_split(name):
    bad, code = SCANNER_VIOLATIONS[name]
    good = frame(OP_TEXT, b"fine") + frame(OP_BINARY, b"y" * 130)
    if name == "frame after close":
        offending = len(good) + len(frame(OP_CLOSE, b""))
    else:
        offending = len(good)
    stream = good + bad
    for chunks in splits(stream):
        scanner, notes, _ = scan(chunks)
        assert notes[-1] == ("violation", code, offending), [len(c) for c in chunks]
        assert scanner.error is not None
    with pytest.raises(RuntimeError):
        scanner.feed(b"more")


def test_scanner_message_too_big_across_fragments():
    stream = frame(OP_TEXT, b"a" * 600, fin=False) + frame(OP_CONTINUATION, b"b" * 600)
    _, notes, _ = scan([stream])
    assert notes == [("violation", 1009, len(frame(OP_TEXT, b"a" * 600, fin=False)))]


def test_scanner_new_message_inside_fragmented_one():
    first = frame(OP_TEXT, b"a", fin=False)
    _, notes, _ = scan([first, frame(OP_BINARY, b"b")])
    assert notes == [("violation", 1002, len(first))]


def test_scanner_violation_in_a_straddling_header_has_negative_offset():
    scanner = FrameScanner(1000, True)
    data = frame(OP_TEXT, b"ok") + frame(OP_TEXT, b"hi", rsv=4)
    assert scanner.feed(data[:9]) is None  # 8 bytes of good frame + 1 header byte
    (violation,) = scanner.feed(data[9:])
    assert isinstance(violation, Violation) and violation.offset == -1


def test_scanner_keeps_notes_before_a_violation_in_the_same_chunk():
    _, notes, _ = scan([frame(OP_PING, b"1") + frame(OP_PING, b"x", fin=False)])
    assert notes[0] == Control(OP_PING, b"1", None, None, len(frame(OP_PING, b"1")))
    assert notes[1][:2] == ("violation", 1002)


def test_scanner_skips_a_huge_payload_without_buffering_it():
    scanner = FrameScanner(1 << 30, True)
    header = frame(OP_BINARY, length=1 << 29)[:14]
    assert scanner.feed(header) is None
    chunk = memoryview(bytes(1 << 20))
    for _ in range(512):
        assert scanner.feed(chunk) is None
    assert scanner.at_boundary
    assert scanner.feed(frame(OP_PING, b"!")) == [Control(OP_PING, b"!", None, None, 7)]


def test_scanner_valid_fragmented_utf8_is_not_its_business():
    # The relay's scanner does not validate text; the endpoints do.
    _, notes, _ = scan([frame(OP_TEXT, b"\xff")])
    assert notes == []


def test_incremental_decoder_is_what_fails_fast():
    decoder = codecs.getincrementaldecoder("utf-8")()
    with pytest.raises(UnicodeDecodeError):
        decoder.decode(b"\xf4\x90", False)


def test_scanner_counts_messages_and_bytes_at_every_split():
    # STREAM holds three messages (two text, one fragmented binary) besides control frames;
    # a run of small whole messages takes the scanner's fast path.
    small = b"".join(frame(OP_TEXT, b"hi") for _ in range(5))
    stream = small + STREAM
    for chunks in [[stream]] + list(splits(stream))[::7]:
        scanner, _, _ = scan(chunks)
        assert (scanner.messages, scanner.bytes_seen) == (8, len(stream)), [len(c) for c in chunks]


def test_reader_counts_messages():
    reader = FrameReader(1 << 20, expect_masked=True)
    reader.feed(STREAM)
    while reader.next_frame() is not None:
        pass
    assert reader.messages == 3
