"""Server side of the opening handshake (RFC 6455 §4.2), as plain functions.

gevent-websocket's own checks answer HTTP/1.0 with "402 Bad Request", a bad
key with a 500 and rejections with a ``str`` body pywsgi cannot write; glb
validates here instead and answers 400 / 426 with a short body.
"""

import base64
import binascii
import hashlib
import http
import re

from glb.errors import Status

WEBSOCKET_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
SUPPORTED_VERSION = "13"


class Rejection:
    """An HTTP answer instead of a 101: status line, headers and a bytes body."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status, reason, headers=()):
        self.status = status
        self.body = (reason + "\n").encode("utf-8")
        self.headers = [("Content-Type", "text/plain; charset=utf-8"),
                        ("Content-Length", str(len(self.body))), *headers]

    @classmethod
    def from_backend(cls, status, headers, body):
        """The backend's own refusal, passed on: its status, body and end-to-end headers."""
        rejection = cls(status_line(status), "")
        rejection.body = body
        rejection.headers = [(name, value) for name, value in headers
                             if name.lower() in PASSED_REFUSAL_HEADERS]
        rejection.headers.append(("Content-Length", str(len(body))))
        return rejection

    def __repr__(self):
        return f"<Rejection {self.status}: {self.body[:80]!r}>"


# Headers of a backend's refused handshake that reach the client; the rest is hop-by-hop or glb's.
PASSED_REFUSAL_HEADERS = frozenset({"content-type", "www-authenticate", "set-cookie", "retry-after",
                                    "location", "cache-control", "sec-websocket-version"})


def status_line(code, reason=""):
    """'403 Forbidden' for 403; unknown codes keep ``reason`` as their phrase."""
    try:
        phrase = http.HTTPStatus(code).phrase
    except ValueError:
        phrase = reason or "Error"
    return f"{code} {phrase}"


def header_tokens(value):
    return {token.strip().lower() for token in value.split(",") if token.strip()}


def is_upgrade_request(environ):
    """A request that asks for a WebSocket at all (valid or not)."""
    return environ.get("HTTP_UPGRADE", "").strip().lower() == "websocket"


def check_upgrade(environ):
    """None if the upgrade request is valid, else the ``Rejection`` to answer with."""
    if environ.get("REQUEST_METHOD") != "GET":
        return Rejection(Status.BAD_REQUEST, "a WebSocket upgrade must use GET")
    if environ.get("SERVER_PROTOCOL", "") != "HTTP/1.1":
        return Rejection(Status.BAD_REQUEST, "a WebSocket upgrade needs HTTP/1.1")
    if "upgrade" not in header_tokens(environ.get("HTTP_CONNECTION", "")):
        return Rejection(Status.BAD_REQUEST, "Connection header must include 'Upgrade'")
    if not environ.get("HTTP_HOST"):
        return Rejection(Status.BAD_REQUEST, "Host header missing")
    version = environ.get("HTTP_SEC_WEBSOCKET_VERSION", "").strip()
    if version != SUPPORTED_VERSION:
        return Rejection(Status.UPGRADE_REQUIRED,
                         f"unsupported Sec-WebSocket-Version {version!r}; this server speaks 13",
                         [("Sec-WebSocket-Version", SUPPORTED_VERSION)])
    key = environ.get("HTTP_SEC_WEBSOCKET_KEY", "").strip()
    try:
        if len(base64.b64decode(key.encode("ascii"), validate=True)) != 16:
            raise ValueError
    except (ValueError, binascii.Error, UnicodeEncodeError):
        return Rejection(Status.BAD_REQUEST, "Sec-WebSocket-Key must be 16 bytes in base64")
    return None


def accept_key(key):
    digest = hashlib.sha1((key.strip() + WEBSOCKET_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def header_problem(headers):
    """Why ``(name, value)`` pairs cannot go in a response head as they are, or None.

    Names are RFC 9110 tokens; values are Latin-1 text without CR, LF or NUL
    (anything else would split the head or fail to encode half-way through it).
    """
    for name, value in headers:
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            return f"header name {name!r} is not an HTTP token"
        if not isinstance(value, str):
            return f"header {name} value {value!r} is not a string"
        if any(c in value for c in "\r\n\0"):
            return f"header {name} value {value!r} holds CR, LF or NUL"
        try:
            value.encode("latin-1")
        except UnicodeEncodeError:
            return f"header {name} value {value!r} is not Latin-1"
    return None


def switching_protocols(key, extra_headers=()):
    """The bytes of a 101 response, with ``extra_headers`` (name, value) pairs."""
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept_key(key)}"]
    lines.extend(f"{name}: {value}" for name, value in extra_headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
