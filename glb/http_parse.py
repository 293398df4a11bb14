"""HTTP/1.1 message framing, strictly (RFC 9112), with no sockets: bytes in, heads and body pieces out.

Heads are parsed by ``httptools`` (llhttp, the C parser uvicorn uses) in its strict
mode, plus the rules it leaves to the caller. What a head may not do, answered
with ``HeadError`` (status 400 unless said otherwise) and never forwarded:

- two ``Content-Length`` headers (even equal), a length that is not plain digits
  (``+5``, ``0x5``, ``5, 5``), ``Content-Length`` beside ``Transfer-Encoding``;
- ``Transfer-Encoding`` other than exactly one ``chunked`` (``gzip, chunked``,
  ``xchunked``, two headers): only chunked framing is understood;
- a header name that is not a token (``X Bad``, ``Transfer-Encoding :``), a value
  with a control character, obs-fold, a bare CR or LF, a missing or repeated
  ``Host`` in HTTP/1.1, more than ``MAX_HEADERS`` headers (431), a version other
  than 1.0 / 1.1 (505), CONNECT (405).

Bodies are framed here too, not by llhttp, so the caller always knows where a
message ends and what follows it: ``LengthBody`` counts, ``ChunkedBody`` decodes
chunks (a bad chunk size is a ``HeadError``) and collects trailers. Response heads
go through the same checks (``parse_response_head``); the caller turns a failure
into 502.
"""

import re

import httptools

from glb.errors import Status

MAX_HEADERS = 100
MAX_CHUNK_LINE = 4096  # a chunk-size line with its extensions
NO_BODY_STATUSES = frozenset({204, 304})

_HEAD_END = b"\r\n\r\n"
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}\Z")


class HeadError(Exception):
    """The peer sent something that is not HTTP/1.1 as RFC 9112 holds it: answer ``status`` and close."""

    def __init__(self, reason, status=Status.BAD_REQUEST):
        super().__init__(reason)
        self.reason, self.status = reason, status


# --------------------------------------------------------------------------- heads


class _ChecksOnly:
    """httptools wants a protocol object; glb reads the head's bytes itself, so llhttp only checks them.

    Every callback httptools looks for is here as None: a missing one would cost
    it a raised and caught AttributeError per name on every new parser.
    """

    __slots__ = ()
    on_message_begin = on_url = on_status = on_header = on_headers_complete = on_body = None
    on_message_complete = on_chunk_header = on_chunk_complete = None


_CHECKS_ONLY = _ChecksOnly()


class HeadReader:
    """Finds one head in a growing buffer and feeds llhttp as bytes arrive, so garbage fails early.

    ``feed(buffer)`` returns the head's length (through the blank line) once it is
    complete, else None; ``buffer`` (bytes or the caller's bytearray) is not
    consumed here. ``head`` is then the head's bytes.
    """

    __slots__ = ("parser", "max_size", "fed", "head")

    def __init__(self, response=False, max_size=16384):
        self.parser = (httptools.HttpResponseParser if response else httptools.HttpRequestParser)(_CHECKS_ONLY)
        self.max_size = max_size
        self.fed = 0
        self.head = b""

    def restart(self):
        """Ready for the next head on the same connection (llhttp resets itself after a bodiless message)."""
        self.fed = 0
        self.head = b""

    def feed(self, buffer):
        end = buffer.find(_HEAD_END, max(0, self.fed - 3))
        stop = len(buffer) if end < 0 else end + 4
        if stop > self.max_size:
            if buffer.find(b"\r\n", 0, self.max_size) < 0:
                raise HeadError("request line longer than [http] max_head_size", Status.URI_TOO_LONG)
            raise HeadError("head larger than [http] max_head_size", Status.HEADERS_TOO_LARGE)
        if end >= 0:
            self.head = head = bytes(buffer[:stop])
            if head.count(b"\r\n") - 2 > MAX_HEADERS:
                raise HeadError(f"more than {MAX_HEADERS} header fields", Status.HEADERS_TOO_LARGE)
        if stop > self.fed:
            try:
                self.parser.feed_data(self.head[self.fed:] if end >= 0 and self.fed else
                                      self.head if end >= 0 else bytes(buffer[self.fed:stop]))
            except httptools.HttpParserUpgrade:
                pass  # llhttp stops at an upgrade's blank line: the head is complete all the same
            except httptools.HttpParserError as exc:
                raise HeadError(f"malformed head: {exc}") from None
            self.fed = stop
        return stop if end >= 0 else None


class Framing:
    """How a message's body is delimited: ``length`` (an int), ``chunked``, or neither."""

    __slots__ = ("length", "chunked")

    def __init__(self, length=None, chunked=False):
        self.length, self.chunked = length, chunked

    @property
    def has_body(self):
        return self.chunked or bool(self.length)


_NO_FRAMING = Framing()  # shared: a Framing is never changed once made
_NO_BODY = Framing(length=0)


# Headers that describe one connection, not the message (RFC 9110 §7.6.1), plus the
# proxy ones; a proxy never forwards them. Names listed in Connection join them.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
    "proxy-connection", "proxy-authenticate", "proxy-authorization",
})

# The header fields glb looks at, found by one pass over a head's lines (llhttp
# has checked them already, so every field line is ``\r\nname:OWS value OWS``),
# each with a code. Every other field is passed on as it came.
HOP = 1  # hop-by-hop (HOP_BY_HOP but the codes below)
LENGTH, CODING, HOST, CONNECTION, UPGRADE, EXPECT, PROXY, FORWARDED, FORWARDED_FOR = range(2, 11)
_FIELD_CODES = dict.fromkeys((name.encode() for name in HOP_BY_HOP), HOP)
_FIELD_CODES.update({b"content-length": LENGTH, b"transfer-encoding": CODING, b"host": HOST,
                     b"connection": CONNECTION, b"upgrade": UPGRADE, b"expect": EXPECT,
                     b"x-forwarded-proto": FORWARDED, b"x-forwarded-host": FORWARDED,
                     b"x-forwarded-for": FORWARDED_FOR})
_FIRST_BYTES = frozenset(b"CcTtHhUuEeKkPpXx")  # how those names start: a cheap first sift in ``_find``
RESPONSE_DROP = frozenset({HOP, CODING, CONNECTION, UPGRADE})  # codes a response loses on its way
_OWS = b" \t"


def decode_pairs(raw):
    """``(name, value)`` byte pairs as str pairs (Latin-1, as RFC 9110 allows for obs-text)."""
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw]


class _Found:
    """What the pass over a head's fields found: ``fields`` ``(code, start, end, value)`` and their sense.

    ``start:end`` spans a field's line without its CRLF (it starts with the CRLF
    before it); ``value`` has no surrounding whitespace. ``connection`` holds the
    lower-case tokens of every Connection field.
    """

    __slots__ = ("fields", "lengths", "codings", "hosts", "connection", "expect", "upgrade")


_NO_TOKENS = frozenset()
_CODE_OF = {}  # a field name as sent -> its code, so each spelling is lowered once


def _find(data, line_end):
    """One pass over the fields of the head ``data`` (its first line ends at ``line_end``)."""
    found = _Found()
    fields = found.fields = []
    lengths, codings, hosts = [], [], []
    connection, expect, upgrade = _NO_TOKENS, b"", b""
    code_of, first_bytes = _CODE_OF, _FIRST_BYTES
    end = line_end
    for line in data[line_end + 2:].split(b"\r\n")[:-2]:  # every field line (llhttp checked them)
        start, end = end, end + 2 + len(line)
        if line[0] not in first_bytes:
            continue
        name, _, value = line.partition(b":")
        code = code_of.get(name)
        if code is None:
            lower = name.lower()
            code = _FIELD_CODES.get(lower, PROXY if lower.startswith(b"proxy-") else 0)
            if len(code_of) < 1024:
                code_of[name] = code
        if not code:
            continue
        value = value.strip(_OWS)
        fields.append((code, start, end, value))
        if code == HOST:
            hosts.append(value)
        elif code == LENGTH:
            lengths.append(value)
        elif code == CODING:
            codings.append(value)
        elif code == CONNECTION:
            connection = set(connection)
            for token in value.split(b","):
                connection.add(token.strip(_OWS).lower())
        elif code == EXPECT:
            expect = value.lower()
        elif code == UPGRADE:
            upgrade = value.lower()
    found.lengths, found.codings, found.hosts = lengths, codings, hosts
    found.connection, found.expect, found.upgrade = connection, expect, upgrade
    return found


def _pairs(data, line_end):
    """Every field of the head ``data`` as ``(name, value)`` byte pairs, in order."""
    pairs = []
    if len(data) - 4 > line_end:
        for line in data[line_end + 2:len(data) - 4].split(b"\r\n"):
            name, _, value = line.partition(b":")
            pairs.append((name, value.strip(_OWS)))
    return pairs


def _framing(found):
    """The Framing the fields declare: one length or one ``chunked``, never both (HeadError otherwise)."""
    lengths, codings = found.lengths, found.codings
    if codings:
        if lengths:
            raise HeadError("Content-Length beside Transfer-Encoding")
        if len(codings) > 1 or codings[0].lower() != b"chunked":
            raise HeadError("Transfer-Encoding other than one 'chunked'")
        return Framing(chunked=True)
    if lengths:
        if len(lengths) > 1:
            raise HeadError("more than one Content-Length")
        if not lengths[0].isdigit() or len(lengths[0]) > 18:
            raise HeadError("Content-Length is not a number")
        return Framing(length=int(lengths[0]))
    return _NO_FRAMING


def _keep_alive(version, connection):
    """RFC 9112 §9.3: HTTP/1.1 persists unless ``close``; HTTP/1.0 only with ``keep-alive``."""
    if b"close" in connection:
        return False
    return version == "1.1" or b"keep-alive" in connection


_PLAIN_CONNECTION = frozenset({b"close", b"keep-alive"})


class _Head:
    """A head as received: ``data`` its bytes, ``fields`` those glb looks at (see ``_find``).

    ``raw_headers`` (byte pairs) and ``headers`` (str pairs) are made from ``data``
    on first use. ``verbatim``: the fields may be passed on as the bytes they came
    in (no name listed in Connection to remove, no target rewritten).
    """

    __slots__ = ()

    @property
    def raw_headers(self):
        if self._raw is None:
            self._raw = self._make_pairs()
        return self._raw

    @property
    def headers(self):
        if self._headers is None:
            self._headers = decode_pairs(self.raw_headers)
        return self._headers


class RequestHead(_Head):
    """One parsed request head: what the rest of glb reads."""

    __slots__ = ("method", "target", "path", "query", "version", "data", "line_end", "fields", "host", "_raw",
                 "_headers", "framing", "keep_alive", "expect_continue", "upgrade", "connection", "verbatim")

    def _make_pairs(self):
        return _pairs(self.data, self.line_end)

    def __repr__(self):
        return f"<RequestHead {self.method} {self.target} HTTP/{self.version}>"


def parse_request_head(reader):
    """The RequestHead from a HeadReader whose ``feed`` returned a length; raises HeadError."""
    parser = reader.parser
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        raise HeadError(f"HTTP/{version} is not supported", Status.VERSION_NOT_SUPPORTED)
    head = RequestHead()
    data = head.data = reader.head
    method = head.method = parser.get_method().decode("ascii")
    if method == "CONNECT":
        raise HeadError("CONNECT is not supported", Status.METHOD_NOT_ALLOWED)
    line_end = head.line_end = data.find(b"\r\n")
    found = _find(data, line_end)
    head.fields, hosts = found.fields, found.hosts
    head.host = hosts[0] if hosts else None
    head._raw = None
    head.verbatim = True
    target = data[len(method) + 1:data.rfind(b" ", 0, line_end)].decode("latin-1")
    if target[:1] != "/":
        if target == "*" and method == "OPTIONS":
            pass
        elif target.lower().startswith(("http://", "https://")):
            authority, _, rest = target.split("://", 1)[1].partition("/")
            target = "/" + rest
            head._raw = [pair for pair in _pairs(data, line_end) if pair[0].lower() != b"host"] + [
                (b"Host", authority.encode("latin-1"))]
            head.host = authority.encode("latin-1")
            hosts = [head.host]
            head.verbatim = False
        else:
            raise HeadError("request target is not a path")
    if len(hosts) != 1 and (version == "1.1" or hosts):
        raise HeadError("HTTP/1.1 request needs exactly one Host header" if version == "1.1"
                        else "more than one Host header")
    head.target = target
    head.path, _, head.query = target.partition("?")
    head.version = version
    head._headers = None
    head.framing = _framing(found)
    connection = head.connection = found.connection  # hop-by-hop names among them
    if connection and not connection <= _PLAIN_CONNECTION:
        head.verbatim = False
    head.keep_alive = _keep_alive(version, connection)
    head.expect_continue = found.expect == b"100-continue" and version == "1.1"
    head.upgrade = found.upgrade.decode("latin-1") if found.upgrade else ""
    return head


class ResponseHead(_Head):
    """One parsed response head from a backend; ``raw_headers`` without the hop-by-hop ones."""

    __slots__ = ("status", "reason", "version", "data", "line_end", "fields", "_raw", "_headers", "framing",
                 "keep_alive", "connection", "verbatim")

    def _make_pairs(self):
        pairs = _pairs(self.data, self.line_end)
        drop = HOP_BY_HOP_BYTES | self.connection
        return [pair for pair in pairs if pair[0].lower() not in drop]


HOP_BY_HOP_BYTES = frozenset(name.encode() for name in HOP_BY_HOP)


def parse_response_head(reader, request_method):
    """The ResponseHead from a HeadReader; ``framing`` follows RFC 9112 §6.3 for ``request_method``."""
    parser = reader.parser
    version = parser.get_http_version()
    if version not in ("1.1", "1.0"):
        raise HeadError(f"HTTP/{version} response")
    head = ResponseHead()
    data = head.data = reader.head
    status = head.status = parser.get_status_code()
    line_end = head.line_end = data.find(b"\r\n")
    head.reason = data[13:line_end].decode("latin-1")  # after "HTTP/1.1 200 "
    head.version = version
    found = _find(data, line_end)
    head.fields = found.fields
    head._raw = head._headers = None
    framing = _framing(found)
    connection = head.connection = found.connection
    head.verbatim = not connection or connection <= _PLAIN_CONNECTION
    head.keep_alive = _keep_alive(version, connection)
    if request_method == "HEAD" or status < 200 or status in NO_BODY_STATUSES:
        framing = _NO_BODY
    elif not framing.chunked and framing.length is None:
        head.keep_alive = False  # delimited by the backend closing the connection
    head.framing = framing
    return head


def response_head_bytes(head, first_line, extra=b""):
    """``head`` as a client gets it: ``first_line``, its fields but the hop-by-hop ones, ``extra`` lines."""
    if not head.verbatim:
        return encode_raw_head(first_line, head.raw_headers, extra)
    data = head.data
    parts = [first_line]
    at = head.line_end
    for code, start, end, _ in head.fields:
        if code in RESPONSE_DROP:
            parts.append(data[at:start])
            at = end
    parts += (data[at:len(data) - 4], b"\r\n", extra, b"\r\n")
    return b"".join(parts)


# --------------------------------------------------------------------------- bodies


class LengthBody:
    """A Content-Length body: ``take(buffer)`` removes and returns what belongs to it."""

    __slots__ = ("remaining",)

    def __init__(self, length):
        self.remaining = length

    @property
    def done(self):
        return self.remaining == 0

    def take(self, buffer):
        """(data, trailers): the body bytes at the start of ``buffer`` (removed from it)."""
        n = min(self.remaining, len(buffer))
        data = bytes(buffer[:n])
        del buffer[:n]
        self.remaining -= n
        return data, None


class UntilCloseBody:
    """A response body delimited by the backend closing the connection."""

    __slots__ = ("done",)

    def __init__(self):
        self.done = False

    def take(self, buffer):
        data = bytes(buffer)
        del buffer[:]
        return data, None

    def end(self):
        self.done = True


class ChunkedBody:
    """A chunked body, decoded: ``take(buffer)`` returns the chunk data found and, at the end, the trailers.

    Every chunk-size line must be 1-16 hex digits (extensions after ``;`` are
    dropped); anything else is a HeadError. Trailers are checked like header fields.
    """

    _SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)

    def __init__(self):
        self.state = self._SIZE
        self.remaining = 0
        self.trailers = []

    @property
    def done(self):
        return self.state == self._DONE

    def take(self, buffer):
        out = []
        trailers = None
        while True:
            if self.state == self._SIZE:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise HeadError("chunk-size line too long")
                    break
                size = bytes(buffer[:end]).split(b";", 1)[0].rstrip(b" \t")
                if not _HEX.match(size):
                    raise HeadError(f"bad chunk size {bytes(buffer[:min(end, 40)])!r}")
                del buffer[:end + 2]
                self.remaining = int(size, 16)
                self.state = self._DATA if self.remaining else self._TRAILERS
            elif self.state == self._DATA:
                if not buffer:
                    break
                n = min(self.remaining, len(buffer))
                out.append(bytes(buffer[:n]))
                del buffer[:n]
                self.remaining -= n
                if not self.remaining:
                    self.state = self._DATA_END
            elif self.state == self._DATA_END:
                if len(buffer) < 2:
                    break
                if buffer[:2] != b"\r\n":
                    raise HeadError("chunk data not followed by CRLF")
                del buffer[:2]
                self.state = self._SIZE
            elif self.state == self._TRAILERS:
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise HeadError("trailer line too long")
                    break
                line = bytes(buffer[:end])
                del buffer[:end + 2]
                if not line:
                    self.state = self._DONE
                    trailers = self.trailers
                    break
                name, sep, value = line.partition(b":")
                if not sep or not _TOKEN.match(name) or _FIELD_VALUE_BAD.search(value.strip(b" \t")):
                    raise HeadError(f"malformed trailer {line[:40]!r}")
                if len(self.trailers) >= MAX_HEADERS:
                    raise HeadError("too many trailers")
                self.trailers.append((name.decode("ascii"), value.strip(b" \t").decode("latin-1")))
            else:
                break
        return b"".join(out), trailers


def body_for(framing):
    """The body decoder for a Framing (None when there is no body)."""
    if framing.chunked:
        return ChunkedBody()
    if framing.length:
        return LengthBody(framing.length)
    return None


# --------------------------------------------------------------------------- writing


def encode_head(first_line, headers):
    """A head's bytes: the first line, ``Name: value`` lines, the blank line (latin-1)."""
    parts = [first_line]
    parts.extend(f"{name}: {value}" for name, value in headers)
    parts.append("\r\n")
    return "\r\n".join(parts).encode("latin-1")


def encode_raw_head(first_line, raw_headers, extra=b""):
    """A head's bytes from bytes: ``first_line`` (no CRLF), ``(name, value)`` byte pairs, ``extra`` lines."""
    parts = [first_line]
    for name, value in raw_headers:
        parts += (b"\r\n", name, b": ", value)
    parts += (b"\r\n", extra, b"\r\n")
    return b"".join(parts)


def encode_pairs(pairs):
    """Str pairs (a handler's) as byte pairs, each checked first (ValueError for a broken one)."""
    out = []
    for name, value in pairs:
        check_header_text(name, value)
        out.append((name.encode("latin-1"), value.encode("latin-1")))
    return out


def encode_chunk(data):
    return b"%x\r\n%s\r\n" % (len(data), data)


def encode_last_chunk(trailers=()):
    if not trailers:
        return b"0\r\n\r\n"
    return b"0\r\n" + "".join(f"{name}: {value}\r\n" for name, value in trailers).encode("latin-1") + b"\r\n"


def check_header_text(name, value):
    """Raise ValueError for a handler-supplied header that would break the head (CR, LF, non-Latin-1)."""
    if not _TOKEN.match(name.encode("latin-1")):
        raise ValueError(f"header name {name!r} is not a token")
    data = value.encode("latin-1")
    if _FIELD_VALUE_BAD.search(data):
        raise ValueError(f"control character in header {name}")
