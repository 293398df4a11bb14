"""Control-channel records and broadcast envelopes: parsing and encoding, no sockets.

A backend's control channel carries two kinds of text frame (see docs/protocol.md):

* a **record** — a JSON object whose ``method`` is exactly one of the
  ``sgc@lb@...`` names below, or the bare text ``sgc@lb@server@ready``;
* a **broadcast envelope** — three ASCII digits, a JSON header, a payload.

They are told apart by shape, never by substring: a record starts with ``{``,
an envelope with digits, so an envelope whose payload quotes a method name is
still an envelope. :func:`parse_record` returns ``None`` for anything that is
not a record, and raises :class:`RecordError` for a record with bad fields.

The record classes validate themselves when built, so an invalid record cannot
exist, whether it came off the wire or from an encoder.
"""
import ipaddress
import json
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from glb.errors import GlbError

SERVER_DATA = "sgc@lb@server@data"
BINDING = "sgc@lb@server@binding"
CLIENT_CONNECTION = "sgc@lb@client@connection"
READY = "sgc@lb@server@ready"
DRAIN = "glb@server@drain"      # glb extension: the backend drains itself
UNDRAIN = "glb@server@undrain"  # glb extension: ... and takes new clients again
ROUTE = "glb@broadcast@to"      # glb extension: the next envelope goes only to these backends
READY_SET = "glb@lb@ready"      # glb extension, glb -> subscribed backend: the backends glb relays to
MAX_SPREAD = 86400

MAX_ID_LENGTH = 256
# Caps the hash ring at 160 * MAX_WEIGHT points per backend (see balancing.py).
MAX_WEIGHT = 100

ENVELOPE_FIELDS = ("guid", "channel", "protocol", "include", "exclude")
_TEXT_HEADER_DIGITS = 3
_BINARY_HEADER_DIGITS = 10
_ASCII_DIGITS = frozenset("0123456789")
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)\Z")


class RecordError(GlbError):
    """A control record or envelope with bad fields; ``reason`` says which and why."""

    def __init__(self, reason, method=None):
        super().__init__(reason)
        self.reason, self.method = reason, method


# -- field checks ---------------------------------------------------------------------------

def _fail(method, field, why):
    raise RecordError(f"{method}: {field} {why}", method)


def _check_id(method, field, value):
    if not isinstance(value, str) or not value.strip():
        _fail(method, field, f"must be a non-empty string, got {value!r}")
    if len(value) > MAX_ID_LENGTH:
        _fail(method, field, f"longer than {MAX_ID_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        _fail(method, field, "contains control characters")


def _check_str(method, field, value):
    if not isinstance(value, str):
        _fail(method, field, f"must be a string, got {value!r}")


def _check_bool(method, field, value):
    if not isinstance(value, bool):
        _fail(method, field, f"must be true or false, got {value!r}")


def _check_int(method, field, value, low, high):
    # bool is an int subclass: true/false is not a number here.
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        _fail(method, field, f"must be an integer in {low}..{high}, got {value!r}")


def _normalise_host(method, host):
    """The host as a bare name or address (IPv6 brackets dropped), or RecordError."""
    if not isinstance(host, str) or not host:
        _fail(method, "host", f"must be a non-empty string, got {host!r}")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(bare)
        return bare
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL.match(label) for label in name.split(".")):
        _fail(method, "host", f"is not a valid host name or address: {host!r}")
    return host


def _check_http_url(method, url):
    if not isinstance(url, str) or any(c.isspace() for c in url):
        _fail(method, "http", f"must be an http(s) URL, got {url!r}")
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a bad port
    except ValueError:
        _fail(method, "http", f"must be an http(s) URL, got {url!r}")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.fragment:
        _fail(method, "http", f"must be an http(s) URL, got {url!r}")


# -- records --------------------------------------------------------------------------------

@dataclass(frozen=True)
class ServerData:
    """First record of a registration: who the backend is (glb extensions optional).

    ``http``: None = forward HTTP to the first binding's address; "" = take no HTTP.
    ``subscribe``: the glb-to-backend extension records the backend understands (READY_SET);
    glb sends none of them to a backend that did not list them, and ignores names it does not know.
    """

    guid: str
    weight: int = 1
    max_clients: int = 0
    http: str | None = None
    tags: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    def __post_init__(self):
        _check_id(SERVER_DATA, "guid", self.guid)
        _check_int(SERVER_DATA, "weight", self.weight, 1, MAX_WEIGHT)
        _check_int(SERVER_DATA, "max_clients", self.max_clients, 0, 2**31 - 1)
        if self.http:
            _check_http_url(SERVER_DATA, self.http)
        tags = self.tags
        if not isinstance(tags, (list, tuple)) or not all(isinstance(t, str) for t in tags):
            _fail(SERVER_DATA, "tags", f"must be a list of strings, got {self.tags!r}")
        object.__setattr__(self, "tags", tuple(self.tags))
        object.__setattr__(self, "subscribe", _id_list(SERVER_DATA, "subscribe", self.subscribe))


@dataclass(frozen=True)
class Binding:
    """A public address where the backend accepts WebSocket clients."""

    host: str
    port: int
    ssl: bool = False

    def __post_init__(self):
        object.__setattr__(self, "host", _normalise_host(BINDING, self.host))
        _check_int(BINDING, "port", self.port, 1, 65535)
        _check_bool(BINDING, "ssl", self.ssl)

    @property
    def netloc(self):
        """``host:port`` with an IPv6 host in brackets, as a URL needs it."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True)
class ClientRecord:
    """A client connected to the backend directly (``active`` false: it left)."""

    active: bool
    guid: str
    ip: str = ""
    channel: str = ""
    protocol: str = ""

    def __post_init__(self):
        _check_bool(CLIENT_CONNECTION, "active", self.active)
        _check_id(CLIENT_CONNECTION, "guid", self.guid)
        for field in ("ip", "channel", "protocol"):
            _check_str(CLIENT_CONNECTION, field, getattr(self, field))


@dataclass(frozen=True)
class Ready:
    """The backend has finished registering."""


@dataclass(frozen=True)
class Drain:
    """glb extension: no new clients for this backend; ``spread`` (seconds) closes its
    sessions with 1012 at random moments within that window, None keeps them."""

    spread: float | None = None

    def __post_init__(self):
        spread = self.spread
        if spread is not None and (isinstance(spread, bool) or not isinstance(spread, (int, float))
                                   or not 0 <= spread <= MAX_SPREAD):
            _fail(DRAIN, "spread", f"must be a number of seconds 0..{MAX_SPREAD}, got {spread!r}")


@dataclass(frozen=True)
class Undrain:
    """glb extension: a backend that drained itself takes new clients again."""


@dataclass(frozen=True)
class BroadcastRoute:
    """glb extension: the envelope that comes next on this channel goes only to these backends
    (those of them this glb relays to); any other frame in between voids it."""

    backends: tuple

    def __post_init__(self):
        object.__setattr__(self, "backends", _id_list(ROUTE, "backends", self.backends))


@dataclass(frozen=True)
class ReadySet:
    """glb extension, glb -> a backend that subscribed: the guids glb relays envelopes to.

    ``ready`` (a tuple) replaces what the backend knew; None means a change: ``joined`` and
    ``left`` since the previous one, in the order glb sent them.
    """

    ready: tuple[str, ...] | None = None
    joined: tuple[str, ...] = ()
    left: tuple[str, ...] = ()

    def __post_init__(self):
        if self.ready is not None:
            object.__setattr__(self, "ready", _id_list(READY_SET, "ready", self.ready))
        for field in ("joined", "left"):
            object.__setattr__(self, field, _id_list(READY_SET, field, getattr(self, field)))


def _id_list(method, field, value):
    """``value`` (a list of ids) as a tuple, or RecordError."""
    if not isinstance(value, (list, tuple)):
        _fail(method, field, f"must be a list of ids, got {value!r}")
    for item in value:
        _check_id(method, field, item)
    return tuple(value)


_MISSING = object()


def _build(cls, method, obj, required, optional):
    args = {}
    for field in required:
        if field not in obj:
            _fail(method, field, "is missing")
        args[field] = obj[field]
    for field in optional:
        value = obj.get(field, _MISSING)
        if value is not _MISSING and value is not None:
            args[field] = value
    return cls(**args)


_PARSERS = {
    SERVER_DATA: lambda obj: _build(
        ServerData, SERVER_DATA, obj, ("guid",), ("weight", "max_clients", "http", "tags", "subscribe")),
    BINDING: lambda obj: _build(Binding, BINDING, obj, ("host", "port"), ("ssl",)),
    CLIENT_CONNECTION: lambda obj: _build(
        ClientRecord, CLIENT_CONNECTION, obj, ("active", "guid"), ("ip", "channel", "protocol")),
    DRAIN: lambda obj: _build(Drain, DRAIN, obj, (), ("spread",)),
    UNDRAIN: lambda obj: Undrain(),
    ROUTE: lambda obj: _build(BroadcastRoute, ROUTE, obj, ("backends",), ()),
}


def _json_object(text):
    """The JSON object a text frame holds, or None when it holds none (an envelope, garbage)."""
    if not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def parse_record(text):
    """The record in a control text frame, or ``None`` when the frame is not a record.

    Raises RecordError for a JSON object whose ``method`` is known but whose fields are bad.
    """
    if text == READY:
        return Ready()
    obj = _json_object(text)
    if obj is None:
        return None
    method = obj.get("method")
    parser = _PARSERS.get(method) if isinstance(method, str) else None
    return parser(obj) if parser else None


def _dumps(obj):
    return json.dumps(obj, separators=(",", ":"))


def binding_json(binding):
    """The binding as the JSON object a binding request answers with."""
    return {"method": BINDING, "host": binding.host, "port": binding.port, "ssl": binding.ssl}


def encode_record(record):
    """The text frame for a record (extension fields only when not default, for sgc peers)."""
    if isinstance(record, Ready):
        return READY
    if isinstance(record, Binding):
        return _dumps(binding_json(record))
    if isinstance(record, ClientRecord):
        return _dumps({"method": CLIENT_CONNECTION, "active": record.active, "guid": record.guid,
                       "ip": record.ip, "channel": record.channel, "protocol": record.protocol})
    if isinstance(record, Drain):
        return _dumps({"method": DRAIN} if record.spread is None else {"method": DRAIN, "spread": record.spread})
    if isinstance(record, Undrain):
        return _dumps({"method": UNDRAIN})
    if isinstance(record, BroadcastRoute):
        return _dumps({"method": ROUTE, "backends": list(record.backends)})
    if isinstance(record, ReadySet):
        if record.ready is not None:
            return _dumps({"method": READY_SET, "ready": list(record.ready)})
        return _dumps({"method": READY_SET, "joined": list(record.joined), "left": list(record.left)})
    if isinstance(record, ServerData):
        obj: dict[str, object] = {"method": SERVER_DATA, "guid": record.guid}
        if record.weight != 1:
            obj["weight"] = record.weight
        if record.max_clients:
            obj["max_clients"] = record.max_clients
        if record.http is not None:
            obj["http"] = record.http
        if record.tags:
            obj["tags"] = list(record.tags)
        if record.subscribe:
            obj["subscribe"] = list(record.subscribe)
        return _dumps(obj)
    raise TypeError(f"not a control record: {record!r}")


def parse_ready_set(text):
    """The ReadySet in a text frame from glb, or None when the frame is not one (an envelope).

    Raises RecordError for a ``glb@lb@ready`` record with bad fields.
    """
    obj = _json_object(text)
    if obj is None or obj.get("method") != READY_SET:
        return None
    return _build(ReadySet, READY_SET, obj, (), ("ready", "joined", "left"))


def encode_server_data(guid, weight=1, max_clients=0, http=None, tags=(), subscribe=()):
    return encode_record(ServerData(guid, weight, max_clients, http, tags, subscribe))


def encode_binding(host, port, ssl=False):
    return encode_record(Binding(host, port, ssl))


def encode_client(active, guid, ip="", channel="", protocol=""):
    return encode_record(ClientRecord(active, guid, ip, channel, protocol))


# -- broadcast envelopes ---------------------------------------------------------------------

def _split_ids(value):
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class TextEnvelope:
    """A text broadcast: header fields (all strings, "" = unset) and the payload."""

    guid: str = ""
    channel: str = ""
    protocol: str = ""
    include: str = ""
    exclude: str = ""
    payload: str = ""

    @property
    def include_ids(self):
        return _split_ids(self.include)

    @property
    def exclude_ids(self):
        return _split_ids(self.exclude)


@dataclass(frozen=True)
class BinaryEnvelope:
    """A binary broadcast: the target connection id ("" = everyone) and the payload."""

    target: str = ""
    payload: bytes = b""


def _length_prefix(head, digits, what):
    if len(head) != digits or not all(c in _ASCII_DIGITS for c in head):
        raise RecordError(f"{what}: must start with {digits} ASCII digits giving the header length")
    return int(head)


def parse_text_envelope(text):
    """The text envelope in a control frame; RecordError if it is not a well-formed one."""
    if not isinstance(text, str):
        raise RecordError("text envelope: not a string")
    size = _length_prefix(text[:_TEXT_HEADER_DIGITS], _TEXT_HEADER_DIGITS, "text envelope")
    end = _TEXT_HEADER_DIGITS + size
    if len(text) < end:
        raise RecordError(f"text envelope: header length {size} is longer than the message")
    try:
        header = json.loads(text[_TEXT_HEADER_DIGITS:end])
    except (ValueError, RecursionError):
        raise RecordError("text envelope: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise RecordError("text envelope: header is not a JSON object")
    fields = {}
    for name in ENVELOPE_FIELDS:
        value = header.get(name, "")
        if not isinstance(value, str):
            raise RecordError(f"text envelope: header field {name} must be a string, got {value!r}")
        fields[name] = value
    return TextEnvelope(payload=text[end:], **fields)


def _ids_field(value):
    return value if isinstance(value, str) else ",".join(value)


def encode_text_envelope(payload, guid="", channel="", protocol="", include="", exclude=""):
    """A text envelope; ``include``/``exclude`` are a comma-separated string or a list of ids."""
    values = (guid, channel, protocol, _ids_field(include), _ids_field(exclude))
    for name, value in zip(ENVELOPE_FIELDS, values):
        if not isinstance(value, str):
            raise RecordError(f"text envelope: header field {name} must be a string, got {value!r}")
    if not isinstance(payload, str):
        raise RecordError("text envelope: payload must be a string")
    # ASCII-only header: its length is the same in characters, UTF-8 bytes and UTF-16 units.
    header = json.dumps(dict(zip(ENVELOPE_FIELDS, values)), separators=(",", ":"))
    if len(header) >= 10 ** _TEXT_HEADER_DIGITS:
        raise RecordError(f"text envelope: header is {len(header)} characters, at most 999 fit")
    return f"{len(header):03d}{header}{payload}"


def parse_binary_envelope(data):
    """The binary envelope in a control frame; RecordError if it is not a well-formed one."""
    data = bytes(data)
    head = data[:_BINARY_HEADER_DIGITS].decode("latin-1")
    size = _length_prefix(head, _BINARY_HEADER_DIGITS, "binary envelope")
    end = _BINARY_HEADER_DIGITS + size
    if len(data) < end:
        raise RecordError(f"binary envelope: header length {size} is longer than the message")
    try:
        target = data[_BINARY_HEADER_DIGITS:end].decode("utf-8")
    except UnicodeDecodeError:
        raise RecordError("binary envelope: header is not valid UTF-8") from None
    return BinaryEnvelope(target, data[end:])


def encode_binary_envelope(target, payload):
    """A binary envelope for connection ``target`` ("" = everyone)."""
    if not isinstance(target, str):
        raise RecordError(f"binary envelope: target must be a string, got {target!r}")
    header = target.encode("utf-8")
    if len(header) >= 10 ** _BINARY_HEADER_DIGITS:
        raise RecordError("binary envelope: target too long")
    return b"%010d" % len(header) + header + bytes(payload)
