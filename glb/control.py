"""The control channel (backends registering over a WebSocket) and the binding endpoint.

A backend opens a WebSocket on ``/sgc@load_balancer_client`` (or
``<prefix>control``) and registers (docs/protocol.md). ``ControlSession`` only
moves frames: every text frame goes to ``Registration.receive`` (registry.py),
whose answer says what happened; this module turns answers into events, close
codes and relayed envelopes.

Per channel, in order (docs/events.md)::

    connect -> server_connect -> [server_ready] -> server_disconnect -> disconnect

``server_connect`` and ``server_disconnect`` fire exactly once each for every
channel that passed authentication; refused channels (``prepare`` answers
401/403) fire neither, nor ``connect``.

What a channel may send and what glb does with it::

    frame                                   before server data     after server data
    record (exact JSON method / ready)      server data only,      applied (registry.py ACCEPTED)
                                            else close 1008
    bad server data / binding, duplicate    close 1008 + error     close 1008 + error
    guid, record out of order
    malformed client record                 close 1008 + error     error, channel stays up
    a binding beyond max_bindings           close 1008 + error     close 1008 + error
    a new client beyond                     close 1008 + error     dropped; one error per channel
    max_clients_reported
    route (glb@broadcast@to, glb extension) close 1008 + error     the frame after it, if an
                                                                   envelope, goes only to the
                                                                   listed backends; malformed:
                                                                   close 1008 + error
    "{..." that is no known record          close 1008 + error     error, dropped
    anything else (text or binary)          close 1008 + error     broadcast envelope: parsed
                                                                   strictly, then message / binary
                                                                   event, then (unless handled)
                                                                   relayed unchanged to every ready
                                                                   backend (glb.broadcast);
                                                                   malformed: error, dropped

A backend whose server data lists ``glb@lb@ready`` in ``subscribe`` is told which backends
this glb relays envelopes to, and every change (glb.ready_set).

The channel leaves the pool the moment it starts closing, whoever closes it
(``WebSocket.on_closing``), so its guid may register again at once.

The binding endpoint (``GET /sgc@lb@client@get@binding`` and ``<prefix>binding``)
answers with one ready backend's first binding, chosen by the balancing policy,
after ``before_send_server_binding``.
"""

import hmac
import ipaddress
import json
import logging

from glb import broadcast, control_records
from glb.connection import CONTROL, OWN, Connection, headers_from_environ
from glb.control_records import READY_SET, Binding, RecordError
from glb.errors import CloseCode, Status
from glb.handshake import Rejection
from glb.own_sessions import OwnSession
from glb.registry import Outcome, RegistrationError

log = logging.getLogger("glb.control")

SGC_CONTROL_PATH = "/sgc@load_balancer_client"
SGC_BINDING_PATH = "/sgc@lb@client@get@binding"

UNAUTHORIZED = "401 Unauthorized"  # no credentials presented (glb's Status has no 401 yet)


# -- authentication -----------------------------------------------------------------------------

def bearer_token(authorization):
    """The token of an ``Authorization: Bearer <token>`` header value, or None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def admitted(expected, presented, allow, peer_ip):
    """True for the right bearer token (when one is set) or a peer inside ``allow``."""
    if expected and presented is not None and hmac.compare_digest(
            presented.encode("utf-8"), expected.encode("utf-8")):
        return True
    address = peer_address(peer_ip)
    return address is not None and any(address in network for network in allow)


def peer_address(ip):
    """``ip`` as an ``ipaddress`` address (an IPv4-mapped IPv6 address as IPv4), or None."""
    try:
        address = ipaddress.ip_address((ip or "").split("%", 1)[0])
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def authorize(backends_settings, peer_ip, authorization):
    """None if a control channel from ``peer_ip`` may open, else the ``Rejection`` to answer with.

    Allowed: a peer inside ``[backends] allow``, or one presenting the right
    ``[backends] token`` as a bearer token. Refused: 401 when no token was
    presented (and one would do), 403 otherwise.
    """
    expected = backends_settings.token
    presented = bearer_token(authorization)
    if admitted(expected, presented, backends_settings.allow, peer_ip):
        return None
    if not expected:
        return Rejection(Status.FORBIDDEN, f"control channels from {peer_ip} are not allowed")
    if presented is None:
        return Rejection(UNAUTHORIZED, "a control channel needs Authorization: Bearer <token>",
                         [("WWW-Authenticate", 'Bearer realm="glb"')])
    return Rejection(Status.FORBIDDEN, "wrong backend token")


# -- the control channel --------------------------------------------------------------------------

class PendingBackend:
    """What ``server_connect`` (and ``server_disconnect`` of a channel that never registered) carry."""

    __slots__ = ("peer",)
    guid = None
    weight = 1
    clients = 0
    state = None
    bindings = ()

    def __init__(self, peer):
        self.peer = peer

    def __repr__(self):
        return f"<PendingBackend from {self.peer}>"


def describe_non_record(text):
    """Why a text starting with ``{`` is not a control record (it cannot be an envelope either)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return "malformed record: not valid JSON"
    if not isinstance(obj, dict):
        return "malformed record: not a JSON object"
    method = obj.get("method")
    if method is None:
        return "malformed record: no method"
    return f"unknown record method {method!r}"


class ControlSession(OwnSession):
    """One backend's control channel: registration, client counts and envelope relay."""

    kind = CONTROL
    raw_source = "control"

    def __init__(self, balancer, conn):
        super().__init__(balancer, conn)
        self.registration = balancer.registry.begin(conn.peer)
        self.pending = PendingBackend(conn.peer)
        self.channels = balancer.control_channels
        self.outbox = None  # glb.broadcast.Outbox while the channel runs: every frame glb sends on it
        self._left = False
        self._dropping = False  # client records are being dropped (max_clients_reported)
        self._subscribed = False  # the backend asked for glb@lb@ready (glb.ready_set)
        self._route = None  # the guids a route record limits the next envelope to

    @classmethod
    def prepare(cls, balancer, conn, environ):
        rejection = authorize(balancer.settings.backends, conn.peer_ip, environ.get("HTTP_AUTHORIZATION"))
        if rejection is not None:
            log.info("! %s control channel refused: %s", conn.id, rejection)
            return rejection
        return cls(balancer, conn)

    @property
    def backend(self):
        """The registered Backend, or the PendingBackend before server data."""
        return self.registration.backend or self.pending

    def send(self, message):
        """``Connection.send`` for a control channel: queued behind the envelopes already waiting."""
        return self.outbox is not None and self.outbox.put(broadcast.encode_message_frame(message))

    def run(self):
        ws = self.conn.websocket
        ws.send_timeout = self.balancer.settings.glb.send_timeout  # a backend that reads nothing is dropped
        # Out of the pool as soon as the channel starts closing (1009, slow consumer, ...), not
        # when the peer finally lets go of TCP: its guid may register again at once.
        ws.on_closing = self._leave
        bus = self.bus
        self.outbox = broadcast.Outbox(self.balancer, self.conn).start()
        try:
            bus.fire(bus.server_connect, connection=self.conn, backend=self.pending)
            if not ws.closed:  # a server_connect handler may reject by closing
                super().run()
        finally:
            if not ws.closed:  # an exception on the way: glb did wrong
                self._leave()
                _close_quietly(ws, CloseCode.INTERNAL_ERROR, "internal error")
            self._leave()
            self.outbox.stop()
            bus.fire(bus.server_disconnect, connection=self.conn, backend=self.backend,
                     code=ws.close_code)

    def leave_pool(self):
        """The backend leaves the pool now (heartbeat eviction); the channel closes after."""
        self._leave()

    def _leave(self):
        """Take the backend out of the pool and the relay map (once; before any slow close)."""
        if self._left:
            return
        self._left = True
        backend = self.registration.close()
        if backend is not None:
            if self.channels.get(backend.guid) is self:
                del self.channels[backend.guid]
            log.info("= %s backend %s left the pool", self.conn.id, backend.guid)
            self.balancer.ready_set.unsubscribe(self)
            self.balancer.ready_set.changed()

    def _refuse(self, reason, code=CloseCode.POLICY_VIOLATION):
        self.balancer.report_error(self.conn, f"control channel refused: {reason}")
        self._leave()
        _close_quietly(self.conn.websocket, code, reason)

    # -- frames -------------------------------------------------------------------------------

    def on_message(self, message):
        if self._left:  # refused already; whatever the peer still sends is not news
            return True
        route, self._route = self._route, None  # a route holds for the very next frame only
        if isinstance(message, str):
            if self.raw_message_handled(message):
                return True
            return self._on_text(message, route)
        if self.registration.backend is None:
            self._refuse("binary message before server data")
            return True
        return self._relay_envelope(message, control_records.parse_binary_envelope, route)

    def _on_text(self, text, route=None):
        registration = self.registration
        before_data = registration.backend is None
        try:
            outcome = registration.receive(text)
        except RegistrationError as exc:
            reason = exc.reason
            if before_data and text.startswith("{") and reason == "message before server data":
                reason = f"{describe_non_record(text)} (before server data)"
            self._refuse(reason, exc.close_code)
            return True
        except RecordError as exc:
            self.balancer.report_error(self.conn, f"malformed record: {exc.reason}")
            return True
        if outcome == Outcome.ENVELOPE:
            return self._on_envelope_text(text, route)
        backend = registration.backend
        if outcome == Outcome.ROUTE:
            self._route = registration.last.backends
        elif outcome == Outcome.REGISTERED:
            self.channels[backend.guid] = self
            self._subscribed = READY_SET in registration.last.subscribe
            log.info("< %s server data: guid %s weight %s", self.conn.id, backend.guid, backend.weight)
        elif outcome == Outcome.CLIENT_DROPPED:
            if not self._dropping:  # one error per channel, not one per record
                self._dropping = True
                self.balancer.report_error(
                    self.conn, f"backend {backend.guid} reports more than {self.balancer.registry.max_clients_reported} "
                    "clients (max_clients_reported); further client records are dropped")
        elif outcome == Outcome.READY:
            log.info("= %s backend %s ready: %s", self.conn.id, backend.guid,
                     ", ".join(b.netloc for b in backend.bindings) or "no bindings")
            self.bus.fire(self.bus.server_ready, connection=self.conn, backend=backend)
            self.balancer.ready_set.changed()
            if self._subscribed and not self._left:
                self.balancer.ready_set.subscribe(self)
        elif outcome == Outcome.DRAIN:
            log.info("< %s backend %s drains itself (spread %s)", self.conn.id, backend.guid,
                     registration.last.spread)
            self.balancer.pool.drain(backend, registration.last.spread)
        elif outcome == Outcome.UNDRAIN:
            log.info("< %s backend %s undrains itself", self.conn.id, backend.guid)
            self.balancer.pool.undrain(backend)
        return True

    def _on_envelope_text(self, text, route):
        if text.startswith("{"):  # shaped like a record, so certainly not an envelope
            self.balancer.report_error(self.conn, f"{describe_non_record(text)}; dropped")
            return True
        return self._relay_envelope(text, control_records.parse_text_envelope, route)

    def _relay_envelope(self, message, parse, route=None):
        """A well-formed envelope fires message/binary, then (unless handled) goes to every backend,
        or to those ``route`` lists."""
        try:
            parse(message)
        except RecordError as exc:
            self.balancer.report_error(self.conn, f"{exc.reason}; dropped")
            return True
        if not self.message_handled(message):
            broadcast.fan_out(self.balancer, message, route)
        return True


def _close_quietly(ws, code, reason):
    try:
        ws.close(code, reason)
    except Exception:  # closing a broken connection is not news
        log.debug("= close failed", exc_info=True)


# -- the binding endpoint ------------------------------------------------------------------------

class BindingOffer:
    """The binding about to be sent (``before_send_server_binding`` may change all three)."""

    __slots__ = ("host", "port", "ssl", "backend")

    def __init__(self, host, port, ssl, backend=None):
        self.host, self.port, self.ssl, self.backend = host, port, ssl, backend

    def __repr__(self):
        return f"<BindingOffer {self.host}:{self.port} ssl={self.ssl}>"


class BindingEndpoint:
    """WSGI app for the binding request: one ready backend's binding as JSON, or 503."""

    def __init__(self, balancer):
        self.balancer = balancer

    def __call__(self, environ, start_response):
        balancer = self.balancer
        if environ.get("REQUEST_METHOD") != "GET":
            return json_response(start_response, Status.METHOD_NOT_ALLOWED,
                         {"error": "the binding request must use GET"}, [("Allow", "GET")])
        backend = balancer.pick_backend(balancer.pick_request(environ))
        if backend is None or not backend.bindings:
            return json_response(start_response, Status.SERVICE_UNAVAILABLE, {"error": "no backend is ready"})
        first = backend.bindings[0]
        offer = BindingOffer(first.host, first.port, first.ssl, backend)
        bus = balancer.bus
        if bus.before_send_server_binding.receivers:
            conn = requester(environ)
            bus.fire(bus.before_send_server_binding, connection=conn, binding=offer)
            try:
                first = Binding(offer.host, offer.port, offer.ssl)
            except RecordError as exc:
                balancer.report_error(conn, f"before_send_server_binding left a bad binding: {exc.reason}")
                return json_response(start_response, Status.INTERNAL_ERROR, {"error": "bad binding"})
        return json_response(start_response, Status.OK, control_records.binding_json(first))


def requester(environ):
    """The ``Connection`` (kind own, no WebSocket) handlers see for an HTTP requester."""
    try:
        port = int(environ.get("REMOTE_PORT") or 0)
    except ValueError:
        port = 0
    return Connection((environ.get("REMOTE_ADDR", ""), port), environ.get("PATH_INFO", ""),
                      environ.get("QUERY_STRING", ""), headers_from_environ(environ), OWN,
                      secure=environ.get("wsgi.url_scheme") == "https")


def json_response(start_response, status, obj, headers=()):
    """A small JSON answer that no cache keeps."""
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store"),
                            ("Content-Length", str(len(body))), *headers])
    return [body]
