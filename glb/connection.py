"""What glb knows about one accepted connection, as handlers see it (``event.connection``)."""

import itertools
import time

from requests.structures import CaseInsensitiveDict

CLIENT, CONTROL, OWN = "client", "control", "own"

_ids = itertools.count(1)


def headers_from_environ(environ):
    """The request headers of a WSGI environ, case-insensitive, as the client spelled them."""
    headers = CaseInsensitiveDict()
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-").title()] = value
    if environ.get("CONTENT_TYPE"):
        headers["Content-Type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        headers["Content-Length"] = environ["CONTENT_LENGTH"]
    return headers


class Connection:
    """One WebSocket accepted by glb: a client session, a control channel or an own session.

    ``id`` is carried by every log line about the connection; ``kind`` is
    ``client``, ``control`` or ``own``; ``peer`` is ``(ip, port)``.
    """

    __slots__ = ("id", "peer", "path", "query", "headers", "kind", "started",
                 "websocket", "backend", "secure", "session")

    def __init__(self, peer, path, query="", headers=None, kind=OWN, secure=False):
        self.id = f"c{next(_ids)}"
        self.peer = peer
        self.path = path
        self.query = query
        self.headers = headers if headers is not None else CaseInsensitiveDict()
        self.kind = kind
        self.started = time.monotonic()
        self.websocket = None
        self.backend = None
        self.secure = secure
        self.session = None

    @property
    def peer_ip(self):
        return self.peer[0] if self.peer else ""

    def send(self, message):
        """Send a text (str) or binary (bytes) message to this connection's peer."""
        self.websocket.send(message)

    def close(self, code=1000, reason=""):
        """Close the connection (for a client session: both legs) with this code and reason."""
        self.session.close(code, reason)

    def __repr__(self):
        return f"<Connection {self.id} {self.kind} {self.peer_ip} {self.path}>"
