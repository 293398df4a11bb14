"""Exceptions, close codes and HTTP statuses, named once.

Exception tree::

    GlbError
    ├── ConfigError            a bad config file; start-up stops (exit 2)
    ├── HandlerLoadError       a handler module that cannot be loaded or is malformed
    └── WebSocketError         anything that ends a WebSocket
        ├── ProtocolError      the peer broke RFC 6455 (carries the close code to answer with)
        ├── MessageTooBig      a frame or message over max_message_size (1009)
        ├── ConnectionClosed   the connection is closed (carries code, reason)
        └── HandshakeFailed    an upgrade was refused (carries HTTP status, headers, body)

"The peer did wrong" is ProtocolError/MessageTooBig: answered with a close
code. "We did wrong" is any other exception: logged and turned into 1011.
"""


class CloseCode:
    """RFC 6455 §7.4.1 and the IANA registry."""

    NORMAL = 1000
    GOING_AWAY = 1001
    PROTOCOL_ERROR = 1002
    UNSUPPORTED_DATA = 1003
    NO_STATUS = 1005  # never sent on the wire
    ABNORMAL = 1006  # never sent on the wire
    INVALID_DATA = 1007
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    MANDATORY_EXTENSION = 1010
    INTERNAL_ERROR = 1011
    SERVICE_RESTART = 1012
    TRY_AGAIN_LATER = 1013
    BAD_GATEWAY = 1014
    TLS_HANDSHAKE = 1015  # never sent on the wire


# Codes a peer may put on the wire (RFC 6455 §7.4, plus 1012-1014 from the registry).
SENDABLE_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
) | frozenset(range(3000, 5000))


def is_sendable_close_code(code):
    return code in SENDABLE_CLOSE_CODES


class Status:
    """HTTP statuses glb answers with itself."""

    SWITCHING_PROTOCOLS = "101 Switching Protocols"
    OK = "200 OK"
    BAD_REQUEST = "400 Bad Request"
    UNAUTHORIZED = "401 Unauthorized"
    FORBIDDEN = "403 Forbidden"
    NOT_FOUND = "404 Not Found"
    METHOD_NOT_ALLOWED = "405 Method Not Allowed"
    REQUEST_TIMEOUT = "408 Request Timeout"
    CONFLICT = "409 Conflict"
    PAYLOAD_TOO_LARGE = "413 Content Too Large"
    URI_TOO_LONG = "414 URI Too Long"
    UNSUPPORTED_MEDIA_TYPE = "415 Unsupported Media Type"
    UPGRADE_REQUIRED = "426 Upgrade Required"
    TOO_MANY_REQUESTS = "429 Too Many Requests"
    HEADERS_TOO_LARGE = "431 Request Header Fields Too Large"
    INTERNAL_ERROR = "500 Internal Server Error"
    BAD_GATEWAY = "502 Bad Gateway"
    SERVICE_UNAVAILABLE = "503 Service Unavailable"
    GATEWAY_TIMEOUT = "504 Gateway Timeout"
    VERSION_NOT_SUPPORTED = "505 HTTP Version Not Supported"


class GlbError(Exception):
    """Base of every error glb raises on purpose."""


class ConfigError(GlbError):
    """A config problem: names the file, section, key and reason in one line."""

    def __init__(self, reason, file=None, section=None, key=None):
        self.reason, self.file, self.section, self.key = reason, file, section, key
        where = ", ".join(
            part for part in (
                file and f"file {file}",
                section and f"section [{section}]",
                key and f"key {key!r}",
            ) if part
        )
        super().__init__(f"{where}: {reason}" if where else reason)


class HandlerLoadError(GlbError):
    """A handler module could not be imported or defines something unusable."""


class WebSocketError(GlbError):
    """Anything that ends a WebSocket."""


class ProtocolError(WebSocketError):
    """The peer broke the protocol; ``code`` is what glb closes with."""

    def __init__(self, reason, code=CloseCode.PROTOCOL_ERROR):
        super().__init__(reason)
        self.code, self.reason = code, reason


class MessageTooBig(ProtocolError):
    def __init__(self, reason):
        super().__init__(reason, CloseCode.MESSAGE_TOO_BIG)


class ConnectionClosed(WebSocketError):
    """The connection is closed; ``code``/``reason`` are what the peer (or glb) sent."""

    def __init__(self, code=CloseCode.ABNORMAL, reason=""):
        super().__init__(f"connection closed: {code} {reason}".rstrip())
        self.code, self.reason = code, reason


class HandshakeFailed(WebSocketError):
    """An upgrade to a backend was refused or could not be made."""

    def __init__(self, reason, status=None, headers=None, body=b""):
        super().__init__(reason)
        self.reason, self.status, self.headers, self.body = reason, status, headers or [], body
