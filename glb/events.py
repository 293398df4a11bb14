"""The 22 events, declared once, and the bus that dispatches them.

Every event is one row of ``EVENT_TABLE``; the bus turns each row into a
blinker ``Signal`` reachable as an attribute (``bus.client_message``), so a
typo at a call site is an ``AttributeError``, never a new silent signal.

Cost when nobody listens: call sites test ``signal.receivers`` (a dict) before
building an ``Event``; ``EventBus.fire`` does the same test first. Handlers are
called through ``_contained``: a handler that raises is logged with its
traceback, fires ``exception`` (never recursively), and the session goes on.
"""

import logging
from collections import namedtuple
from typing import Any, Callable

from blinker import Signal

log = logging.getLogger("glb.events")

EventSpec = namedtuple("EventSpec", "name fires carries may")

EVENT_TABLE = (
    EventSpec("connect", "any WebSocket (client session or control channel) is established with glb",
              "connection", "read"),
    EventSpec("disconnect", "any WebSocket accepted by glb is closed",
              "connection, code, reason", "read"),
    EventSpec("handshake", "glb has validated an upgrade request, before the 101 response is written",
              "connection, request_headers, response_headers",
              "add response headers; reject(status, reason)"),
    EventSpec("error", "a protocol or I/O error on one of glb's connections",
              "connection, error (text)", "read"),
    EventSpec("exception", "an unexpected Python exception while processing a connection, "
              "a handler's included", "connection (if any), exception", "read"),
    EventSpec("message", "a complete text message arrives on an own session",
              "connection, text", "mark handled"),
    EventSpec("binary", "a complete binary message arrives on an own session",
              "connection, data", "mark handled"),
    EventSpec("fragmented", "a fragment arrives on an own session",
              "connection, data, opcode, continuation, final", "read"),
    EventSpec("raw_message", "any text frame arrives at glb, before protocol logic or the relay touches it",
              "connection, text, source (client|backend|control)", "mark handled: the frame goes no further"),
    EventSpec("client_connect", "a downstream client is paired with a backend (the backend accepted)",
              "connection, session, backend", "read; close the session"),
    EventSpec("client_disconnect", "a client session ends",
              "connection, session, backend, code, reason, closed_by", "read"),
    EventSpec("client_message", "a text message from a client, before it is forwarded",
              "connection, session, text", "change text; drop (handled)"),
    EventSpec("client_binary", "a binary message from a client, before it is forwarded",
              "connection, session, data", "change data; drop (handled)"),
    EventSpec("client_fragmented", "a fragment from a client, before it is forwarded (pass-through mode)",
              "connection, session, data, opcode, continuation, final", "drop (handled)"),
    EventSpec("server_connect", "a backend has opened a control channel (not yet registered)",
              "connection, backend", "read; reject by closing"),
    EventSpec("server_disconnect", "a backend's control channel has closed, or health checks took a backend "
              "out (then connection and code are None)", "connection, backend, code", "read"),
    EventSpec("server_ready", "a backend has finished registering and is eligible for traffic, or is back "
              "after health checks (then connection is None)", "connection, backend", "read"),
    EventSpec("before_send_server_binding", "glb is about to send a chosen backend binding to a client",
              "connection, binding (host, port, ssl)", "change host, port, ssl"),
    EventSpec("http_request", "an ordinary HTTP request arrived, before it is forwarded",
              "request, backend", "change request or backend; respond(status, headers, body)"),
    EventSpec("http_response", "the backend's response (or the forwarding failure) is back",
              "request, response, error", "change status, headers, body"),
    EventSpec("ssl_get_handler", "glb is about to build the TLS context for a TLS listener",
              "listener, context", "assign context (an ssl.SSLContext)"),
    EventSpec("ssl_after_create_handler", "glb has built its default TLS context",
              "listener, context", "customise the context"),
)

EVENT_NAMES = frozenset(spec.name for spec in EVENT_TABLE)


class Event:
    """What a handler receives: ``name`` plus the attributes its row carries.

    ``handled`` starts False; ``reject`` and ``respond`` record a decision the
    emitting code acts on after every handler has run.
    """

    name: str
    handled: bool  # a handler set it: glb drops the message or skips what the event announced
    rejection: tuple[int, str] | None
    response: tuple[int, dict[str, str], bytes] | None

    def __init__(self, name: str, **attrs: Any) -> None:
        self.name = name
        self.handled = False
        self.rejection = None
        self.response = None
        self.__dict__.update(attrs)

    def __getattr__(self, attr: str) -> Any:  # the attributes each row carries (see EVENT_TABLE)
        raise AttributeError(f"event {self.name!r} carries no {attr!r}")

    def reject(self, status: int, reason: str = "") -> None:
        """Refuse a handshake: the client gets this HTTP status and no session."""
        self.rejection = (int(status), str(reason))

    def respond(self, status: int, headers: dict[str, str] | None = None, body: bytes | str = b"") -> None:
        """Answer an HTTP request directly: no backend is called."""
        if isinstance(body, str):
            body = body.encode("utf-8")
        self.response = (int(status), dict(headers or {}), body)

    def __repr__(self):
        return f"<Event {self.name}>"


class EventSignal(Signal):
    """A blinker signal that knows which row of the table it is."""

    def __init__(self, spec):
        super().__init__(doc=f"fires when {spec.fires}; carries {spec.carries}; a handler may {spec.may}")
        self.name = spec.name


class EventBus:
    """One signal per event; one bus per running glb, so instances never cross-talk."""

    def __init__(self):
        for spec in EVENT_TABLE:
            setattr(self, spec.name, EventSignal(spec))
        self.handler_errors = dict.fromkeys(EVENT_NAMES, 0)  # event -> handler calls that raised

    def fire(self, signal: "EventSignal", **attrs: Any) -> Event | None:
        """Send an event to every receiver; None (and no Event built) if there are none."""
        if not signal.receivers:
            return None
        event = Event(signal.name, **attrs)
        signal.send(event)
        return event

    def add_handler(self, name: str, func: Callable[[Event], None], origin: str = "handler"):
        """Connect ``func(event)`` to event ``name``, contained so it cannot break a session."""
        signal = getattr(self, name)
        receiver = _contained(self, name, func, origin)
        signal.connect(receiver, weak=False)
        return receiver

    def remove_handler(self, name, receiver):
        getattr(self, name).disconnect(receiver)


def _contained(bus, name, func, origin):
    def receiver(event):
        try:
            func(event)
        except Exception as exc:  # a handler bug must never reach the session
            log.exception("! handler %s.on_%s raised", origin, name)
            bus.handler_errors[name] += 1
            if name != "exception":
                bus.fire(bus.exception, connection=getattr(event, "connection", None),
                         exception=exc, event=event)
    receiver.__name__ = f"{origin}.on_{name}"
    return receiver


def render_reference():
    """The README's event table, generated from ``EVENT_TABLE``."""
    rows = ["| event | fires when | carries | a handler may |", "|---|---|---|---|"]
    rows += [f"| `{s.name}` | {s.fires} | {s.carries} | {s.may} |" for s in EVENT_TABLE]
    return "\n".join(rows)
