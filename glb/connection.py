"""What glb knows about one accepted connection, as handlers see it (``event.connection``)."""

import itertools
import time


CLIENT, CONTROL, OWN = "client", "control", "own"

_ids = itertools.count(1)

# Title-cased header names, shared by every connection's Headers (a session keeps its headers for
# its whole life: one copy of "Sec-Websocket-Key" for all of them). Bounded: names a client makes
# up are title-cased afresh once it is full.
_TITLED: dict[str, str] = {}
TITLED_NAMES = 512


def _titled(name):
    titled = _TITLED.get(name)
    if titled is None:
        titled = name.title()
        if len(_TITLED) < TITLED_NAMES:
            _TITLED[name] = titled
    return titled


class Headers(dict):
    """Request headers, looked up case-insensitively; names kept in WSGI's title case.

    A plain dict underneath (it lives as long as each session does, so it is kept small).
    """

    __slots__ = ()

    def __init__(self, items=()):
        super().__init__()
        self.update(items)

    def __getitem__(self, name):
        return super().__getitem__(name.title())

    def __setitem__(self, name, value):
        super().__setitem__(_titled(name), value)

    def __delitem__(self, name):
        super().__delitem__(name.title())

    def __contains__(self, name):
        return isinstance(name, str) and super().__contains__(name.title())

    def get(self, name, default=None):
        return super().get(name.title(), default)

    def pop(self, name, *default):
        return super().pop(name.title(), *default)

    def setdefault(self, name, default=None):
        return super().setdefault(_titled(name), default)

    def update(self, items=(), **more):
        for name, value in (items.items() if hasattr(items, "items") else items):
            self[name] = value
        for name, value in more.items():
            self[name] = value

    def copy(self):
        return Headers(self)

    def __repr__(self):
        return f"Headers({dict.__repr__(self)})"


def headers_from_environ(environ):
    """The request headers of a WSGI environ, looked up case-insensitively."""
    headers = Headers()
    for key, value in environ.items():
        if key.startswith("HTTP_"):
            headers[key[5:].replace("_", "-")] = value
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
        self.headers = headers if headers is not None else Headers()
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
        """Send a text (str) or binary (bytes) message to this connection's peer; True if written.

        The session decides how: a relayed client only between two relayed messages,
        a control channel through its queue, an own session at once.
        """
        return self.session.send(message)

    def close(self, code=1000, reason=""):
        """Close the connection (for a client session: both legs) with this code and reason."""
        self.session.close(code, reason)

    def __repr__(self):
        return f"<Connection {self.id} {self.kind} {self.peer_ip} {self.path}>"
