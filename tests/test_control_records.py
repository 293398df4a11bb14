"""Control records and broadcast envelopes: parsing, validation, encoding. No sockets."""
import json

import pytest

from glb.control_records import (
    BINDING, CLIENT_CONNECTION, READY, SERVER_DATA, BinaryEnvelope, Binding, ClientRecord, Ready,
    RecordError, ServerData, TextEnvelope, binding_json, encode_binary_envelope, encode_binding,
    encode_client, encode_record, encode_server_data, encode_text_envelope, parse_binary_envelope,
    parse_record, parse_text_envelope,
)
from glb.errors import GlbError


def frame(**fields):
    return json.dumps(fields)


# -- recognising records ----------------------------------------------------------------------

def test_server_data_minimal_as_sgc_sends_it():
    record = parse_record('{"method":"sgc@lb@server@data","guid":"{A1B2}"}')
    assert record == ServerData("{A1B2}", weight=1, max_clients=0, http=None, tags=())


def test_server_data_with_glb_extensions():
    record = parse_record(frame(method=SERVER_DATA, guid="b1", weight=3, max_clients=50,
                                http="https://b1.internal:8443/app", tags=["eu", "blue"]))
    assert record == ServerData("b1", 3, 50, "https://b1.internal:8443/app", ("eu", "blue"))


def test_binding():
    text = '{"method":"sgc@lb@server@binding","host":"10.0.0.5","port":8000,"ssl":false}'
    record = parse_record(text)
    assert record == Binding("10.0.0.5", 8000, False)


@pytest.mark.parametrize("host, stored", [
    ("backend-1.example.com", "backend-1.example.com"),
    ("web_1", "web_1"),
    ("::1", "::1"),
    ("[2001:db8::5]", "2001:db8::5"),
    ("localhost", "localhost"),
])
def test_binding_hosts(host, stored):
    assert parse_record(frame(method=BINDING, host=host, port=1, ssl=True)).host == stored


def test_binding_ssl_defaults_to_false():
    assert parse_record(frame(method=BINDING, host="h", port=80)) == Binding("h", 80, False)


def test_client_record():
    record = parse_record(frame(method=CLIENT_CONNECTION, active=True, guid="c1", ip="1.2.3.4",
                                channel="news", protocol="chat"))
    assert record == ClientRecord(True, "c1", "1.2.3.4", "news", "chat")


def test_client_record_optional_fields_default_empty():
    assert parse_record(frame(method=CLIENT_CONNECTION, active=False, guid="c1")) == \
        ClientRecord(False, "c1", "", "", "")


def test_ready_is_the_exact_bare_text():
    assert parse_record("sgc@lb@server@ready") == Ready()
    assert parse_record("sgc@lb@server@ready ") is None
    assert parse_record("xsgc@lb@server@ready") is None


@pytest.mark.parametrize("text", [
    "hello",
    "",
    "{not json",
    "[1, 2]",
    '{"method": "sgc@lb@something@else", "guid": "x"}',
    '{"method": "SGC@LB@SERVER@DATA", "guid": "x"}',
    '{"method": "sgc@lb@server@data2", "guid": "x"}',
    '{"method": ["sgc@lb@server@data"], "guid": "x"}',
    '{"guid": "x"}',
    '"sgc@lb@server@ready"',
    "[" * 100000,
])
def test_non_records_return_none(text):
    assert parse_record(text) is None


def test_method_name_inside_a_broadcast_is_not_a_record():
    payload = json.dumps({"method": SERVER_DATA, "guid": "evil"})
    envelope = encode_text_envelope(payload)
    assert parse_record(envelope) is None
    assert parse_text_envelope(envelope).payload == payload
    # a method name as a substring of any other text is not a record either
    assert parse_record(f'say {{"method":"{READY}"}}') is None
    assert parse_record(f"{READY}\n") is None


# -- malformed records ------------------------------------------------------------------------

@pytest.mark.parametrize("fields, words", [
    ({"method": SERVER_DATA}, "guid is missing"),
    ({"method": SERVER_DATA, "guid": ""}, "guid must be a non-empty string"),
    ({"method": SERVER_DATA, "guid": "  "}, "guid must be a non-empty string"),
    ({"method": SERVER_DATA, "guid": 7}, "guid must be a non-empty string"),
    ({"method": SERVER_DATA, "guid": "a\nb"}, "guid contains control characters"),
    ({"method": SERVER_DATA, "guid": "x" * 300}, "guid longer than"),
    ({"method": SERVER_DATA, "guid": "g", "weight": 0}, "weight must be an integer in 1..100"),
    ({"method": SERVER_DATA, "guid": "g", "weight": 101}, "weight must be an integer"),
    ({"method": SERVER_DATA, "guid": "g", "weight": 1.5}, "weight must be an integer"),
    ({"method": SERVER_DATA, "guid": "g", "weight": "2"}, "weight must be an integer"),
    ({"method": SERVER_DATA, "guid": "g", "weight": True}, "weight must be an integer"),
    ({"method": SERVER_DATA, "guid": "g", "max_clients": -1}, "max_clients must be an integer"),
    ({"method": SERVER_DATA, "guid": "g", "http": "ftp://x"}, "http must be an http(s) URL"),
    ({"method": SERVER_DATA, "guid": "g", "http": "http://"}, "http must be an http(s) URL"),
    ({"method": SERVER_DATA, "guid": "g", "http": "http://a b"}, "http must be an http(s) URL"),
    ({"method": SERVER_DATA, "guid": "g", "http": "http://h:99999"}, "http must be an http(s) URL"),
    ({"method": SERVER_DATA, "guid": "g", "http": 5}, "http must be an http(s) URL"),
    ({"method": SERVER_DATA, "guid": "g", "tags": "eu"}, "tags must be a list of strings"),
    ({"method": SERVER_DATA, "guid": "g", "tags": [1]}, "tags must be a list of strings"),
    ({"method": BINDING, "port": 80}, "host is missing"),
    ({"method": BINDING, "host": "h"}, "port is missing"),
    ({"method": BINDING, "host": "", "port": 80}, "host must be a non-empty string"),
    ({"method": BINDING, "host": 1, "port": 80}, "host must be a non-empty string"),
    ({"method": BINDING, "host": "my host", "port": 80}, "host is not a valid host name"),
    ({"method": BINDING, "host": "-bad.example", "port": 80}, "host is not a valid host name"),
    ({"method": BINDING, "host": "a..b", "port": 80}, "host is not a valid host name"),
    ({"method": BINDING, "host": "h/x", "port": 80}, "host is not a valid host name"),
    ({"method": BINDING, "host": "h", "port": 0}, "port must be an integer in 1..65535"),
    ({"method": BINDING, "host": "h", "port": 65536}, "port must be an integer in 1..65535"),
    ({"method": BINDING, "host": "h", "port": "80"}, "port must be an integer"),
    ({"method": BINDING, "host": "h", "port": 80, "ssl": "false"}, "ssl must be true or false"),
    ({"method": BINDING, "host": "h", "port": 80, "ssl": 1}, "ssl must be true or false"),
    ({"method": CLIENT_CONNECTION, "guid": "c"}, "active is missing"),
    ({"method": CLIENT_CONNECTION, "active": "yes", "guid": "c"}, "active must be true or false"),
    ({"method": CLIENT_CONNECTION, "active": True}, "guid is missing"),
    ({"method": CLIENT_CONNECTION, "active": True, "guid": ""}, "guid must be a non-empty"),
    ({"method": CLIENT_CONNECTION, "active": True, "guid": "c", "ip": 4}, "ip must be a string"),
    ({"method": CLIENT_CONNECTION, "active": True, "guid": "c", "channel": []}, "channel must be"),
])
def test_malformed_records_raise_with_a_clear_reason(fields, words):
    with pytest.raises(RecordError) as info:
        parse_record(json.dumps(fields))
    assert words in info.value.reason
    assert info.value.reason.startswith(fields["method"])  # names the record kind
    assert info.value.method == fields["method"]
    assert isinstance(info.value, GlbError)


# -- encoders (agent side) -------------------------------------------------------------------

def test_encoders_round_trip():
    assert parse_record(encode_server_data("g")) == ServerData("g")
    assert json.loads(encode_server_data("g")) == {"method": SERVER_DATA, "guid": "g"}
    full = ServerData("g", 2, 10, "http://h:1", ("t",))
    assert parse_record(encode_server_data("g", 2, 10, "http://h:1", ["t"])) == full
    assert parse_record(encode_binding("::1", 443, True)) == Binding("::1", 443, True)
    assert parse_record(encode_client(True, "c", "1.1.1.1", "ch", "p")) == \
        ClientRecord(True, "c", "1.1.1.1", "ch", "p")
    assert encode_record(Ready()) == READY
    assert parse_record(encode_record(Ready())) == Ready()


def test_encoders_refuse_invalid_values():
    with pytest.raises(RecordError):
        encode_binding("h", 0)
    with pytest.raises(RecordError):
        encode_server_data("")
    with pytest.raises(RecordError):
        encode_client("true", "c")


def test_binding_json_for_the_binding_endpoint():
    assert binding_json(Binding("10.0.0.5", 8000, False)) == \
        {"method": BINDING, "host": "10.0.0.5", "port": 8000, "ssl": False}
    assert json.loads(encode_binding("10.0.0.5", 8000)) == binding_json(Binding("10.0.0.5", 8000))


def test_binding_netloc_brackets_ipv6():
    assert Binding("::1", 80).netloc == "[::1]:80"
    assert Binding("h", 80).netloc == "h:80"


# -- envelopes ----------------------------------------------------------------------------

def test_text_envelope_round_trip():
    text = encode_text_envelope("héllo {json}", guid="c1", channel="news", protocol="p",
                                include=["a", "b"], exclude="x,y")
    assert parse_text_envelope(text) == \
        TextEnvelope("c1", "news", "p", "a,b", "x,y", "héllo {json}")
    assert parse_text_envelope(text).include_ids == ("a", "b")
    assert parse_text_envelope(text).exclude_ids == ("x", "y")


def test_text_envelope_as_sgc_writes_it():
    header = '{"guid":"","channel":"","protocol":"","include":"","exclude":""}'
    text = f"{len(header):03d}{header}payload"
    assert parse_text_envelope(text) == TextEnvelope(payload="payload")


def test_text_envelope_missing_fields_default_and_unknown_fields_ignored():
    header = '{"channel":"c","extra":5}'
    env = parse_text_envelope(f"{len(header):03d}{header}x")
    assert env == TextEnvelope(channel="c", payload="x")


def test_text_envelope_header_is_ascii_so_length_is_unambiguous():
    text = encode_text_envelope("", channel="ünïcode")
    assert int(text[:3]) == len(text) - 3
    assert text.isascii()
    assert parse_text_envelope(text).channel == "ünïcode"


@pytest.mark.parametrize("text, words", [
    ("", "3 ASCII digits"),
    ("12", "3 ASCII digits"),
    ("abc{}", "3 ASCII digits"),
    ("1٢3{}", "3 ASCII digits"),  # a non-ASCII digit
    ('{"guid":""}', "3 ASCII digits"),
    ("050{}", "longer than the message"),
    ("002{x", "not valid JSON"),
    ("000", "not valid JSON"),
    ("002[]", "not a JSON object"),
    ('010{"guid":1}xx', "guid must be a string"),
    ('014{"include":[]}x', "include must be a string"),
])
def test_malformed_text_envelopes(text, words):
    with pytest.raises(RecordError) as info:
        parse_text_envelope(text)
    assert words in info.value.reason


def test_text_envelope_header_too_long():
    with pytest.raises(RecordError, match="at most 999"):
        encode_text_envelope("x", include=["c" * 40] * 30)


def test_binary_envelope_round_trip():
    data = encode_binary_envelope("conn-1", b"\x00\x01payload")
    assert data[:10] == b"0000000006"
    assert parse_binary_envelope(data) == BinaryEnvelope("conn-1", b"\x00\x01payload")
    assert parse_binary_envelope(encode_binary_envelope("", b"")) == BinaryEnvelope("", b"")
    assert parse_binary_envelope(bytearray(b"0000000000abc")) == BinaryEnvelope("", b"abc")


@pytest.mark.parametrize("data, words", [
    (b"", "10 ASCII digits"),
    (b"000000001", "10 ASCII digits"),
    (b"00000000x1abc", "10 ASCII digits"),
    (b"0000000009abc", "longer than the message"),
    (b"0000000002\xff\xfe", "not valid UTF-8"),
])
def test_malformed_binary_envelopes(data, words):
    with pytest.raises(RecordError) as info:
        parse_binary_envelope(data)
    assert words in info.value.reason


def test_server_data_http_empty_means_no_http():
    record = parse_record(frame(method=SERVER_DATA, guid="g", http=""))
    assert record.http == ""
    assert json.loads(encode_record(record))["http"] == ""
    assert parse_record(frame(method=SERVER_DATA, guid="g", http=None)).http is None


def test_drain_records_round_trip_and_check_their_spread():
    from glb.control_records import DRAIN, Drain, Undrain, encode_record, parse_record
    assert parse_record(encode_record(Drain(10))) == Drain(10)
    assert parse_record(encode_record(Drain())) == Drain(None)
    assert parse_record(encode_record(Undrain())) == Undrain()
    for bad in ('"10"', "-1", "true", "1e9"):
        with pytest.raises(RecordError, match="spread"):
            parse_record(f'{{"method":"{DRAIN}","spread":{bad}}}')


def test_broadcast_records_round_trip_and_check_their_ids():
    from glb.control_records import READY_SET, ROUTE, BroadcastRoute, ReadySet, parse_ready_set
    route = BroadcastRoute(("a", "b"))
    assert parse_record(encode_record(route)) == route
    assert parse_ready_set(encode_record(ReadySet(ready=("a",)))) == ReadySet(ready=("a",))
    change = ReadySet(joined=("c",), left=("a",))
    assert parse_ready_set(encode_record(change)) == change
    assert parse_ready_set(encode_text_envelope('{"method":"glb@lb@ready"}')) is None  # an envelope
    assert parse_record(encode_server_data("b1", subscribe=[READY_SET])).subscribe == (READY_SET,)
    assert json.loads(encode_server_data("b1")) == {"method": SERVER_DATA, "guid": "b1"}  # sgc-shaped
    for bad in ('"a,b"', '[""]', "[1]"):
        with pytest.raises(RecordError, match="backends"):
            parse_record(f'{{"method":"{ROUTE}","backends":{bad}}}')
        with pytest.raises(RecordError, match="joined"):
            parse_ready_set(f'{{"method":"{READY_SET}","joined":{bad}}}')
