"""Server wiring: listeners, routing, the upgrade path and graceful shutdown.

``Balancer`` is one running glb. Each listener is a gevent ``WSGIServer`` whose
handler class, ``UpgradeHandler`` (glb.http_server), reads every request itself:
glb's own endpoints (``http_routes``), upgrades (``handle_upgrade``) and the rest
(``http_proxy``). A valid upgrade becomes a *session*: an object with
``response_headers`` and ``start()`` chosen by path (own echo, control channel,
client relay); ``start()`` tells ``end_session`` once when the session is over.
The 101 is written by glb, then the socket is detached from the server so the
session lives in its own greenlet (a plain client's relay, on io watchers).
"""

import logging
import socket as stdlib_socket
import time

import gevent
from gevent.pool import Group
from gevent.pywsgi import WSGIServer

from glb import broadcast  # Balancer.broadcast / write_data / write_backend_client / ping delegate to it
from glb import handshake, reload, tls
from glb.admin import AdminApi
from glb.admission import Admission
from glb.balancing import PickRequest, make_policy
from glb.control import SGC_BINDING_PATH, SGC_CONTROL_PATH, BindingEndpoint, ControlSession
from glb.connection import CLIENT, Connection, headers_from_environ
from glb.errors import CloseCode, Status
from glb.events import EventBus
from glb.handlers import load_handler_receivers
from glb.health import HealthMonitor
from glb.http_proxy import HttpProxy
from glb.http_server import UpgradeHandler
from glb.own_sessions import EchoSession
from glb.pool import PoolControl
from glb.rebalance import Rebalancer
from glb.relay import ClientSession
from glb.live import LiveFeed, LiveSession, StatusPage
from glb.metrics import MetricsEndpoint
from glb.stats import Stats
from glb.status import StatusEndpoint
from glb.ready_set import ReadySetPublisher
from glb.registry import Registry
from glb.websocket import WebSocket

log = logging.getLogger("glb.server")


class Balancer:
    """One running glb: settings, event bus, backend pool, listeners and open sessions."""

    def __init__(self, settings, handler_modules=None):
        self.settings = settings
        self.stats = Stats()  # plain counters; glb.metrics and the status page read them
        self.bus = EventBus()
        modules = settings.handlers.modules if handler_modules is None else handler_modules
        self.handler_receivers, warnings = load_handler_receivers(modules, self.bus, settings)
        for warning in warnings:
            log.warning("%s", warning)
        backends = settings.backends
        self.registry = Registry(backends.max_clients_reported, backends.max_bindings,
                                 max_fails=backends.max_fails, fail_timeout=backends.fail_timeout,
                                 slow_start=backends.slow_start)
        for static in settings.backends_static:
            self.registry.add_static(static.name, static.url, http=static.http,
                                     weight=static.weight, max_clients=static.max_clients,
                                     max_fails=static.max_fails, fail_timeout=static.fail_timeout,
                                     slow_start=static.slow_start)
        self.policy = make_policy(settings.glb.balancing, hash_key=settings.glb.hash_key)
        self.prefix = settings.glb.prefix
        self.connections = {}  # id -> Connection, every open WebSocket
        self.client_sessions = set()  # every relayed ClientSession, for the keep-alive sweeper
        self.sessions = Group()  # every session greenlet, so stop() can wait for them
        self.servers = []
        self.stopping = False
        self._sweeper = None  # the keep-alive greenlet, once started
        self.handed_over = False  # the listeners went to a new glb (SIGUSR2); this one drains
        self.control_channels = {}  # guid -> ControlSession whose server data was accepted
        self.ready_set = ReadySetPublisher(self)  # tells subscribed agents which backends get envelopes
        self.reload_hooks = []  # f(old_settings, new_settings), called once a reload is applied (glb.reload)
        self.ws_routes = {
            self.prefix + "echo": EchoSession,
            self.prefix + "control": ControlSession,
            SGC_CONTROL_PATH: ControlSession,
            self.prefix + "status/live": LiveSession,
        }
        self.live_feed = LiveFeed(self)  # samples only while a status page is open
        binding_endpoint = BindingEndpoint(self)
        self.http_routes = {
            SGC_BINDING_PATH: binding_endpoint,
            self.prefix + "binding": binding_endpoint,
            self.prefix + "status": StatusEndpoint(self),
            self.prefix + "metrics": MetricsEndpoint(self),
            self.prefix: StatusPage(self),
        }
        self.http_prefix_routes = {self.prefix + "admin/": AdminApi(self)}  # path prefix -> WSGI app
        self.http_proxy = HttpProxy(self)  # everything else over plain HTTP
        self.admission = Admission(self)  # connection limits, origins, handshake rate
        self.health = HealthMonitor(self)  # heartbeats, active and passive checks
        self.pool = PoolControl(self)  # drain, undrain, weights, closing a backend's sessions
        self.rebalancer = Rebalancer(self)
        self.rebalance_closes = 0  # sessions closed by rebalancing

    # -- listeners ---------------------------------------------------------

    def start(self, inherited=None):
        """Bind every listener and start accepting; returns the plain (host, port) list.

        TLS listeners (``tls_addresses``) get their contexts first, so a bad
        certificate or a failing TLS handler binds nothing (see glb.tls).
        ``inherited`` (glb.listeners) holds listening sockets passed by the
        previous glb or systemd: a listener uses its socket instead of binding.
        """
        settings = self.settings
        file = settings.path or "<dict>"
        contexts = [(address, tls.listener_context(self.bus, settings.tls, tls.listener_name(address), file))
                    for address in settings.tls.listen]
        if settings.backends.cafile or settings.backends.certfile:
            self.backend_ssl_context()  # its files are checked now, not at the first wss:// backend
        if not settings.backends.verify:
            log.warning("= [backends] verify = false: certificates of wss:// and https:// backends are not checked")
        self.admission.start()
        take = inherited.take if inherited is not None else (lambda scheme, address: None)
        for address in settings.glb.listen:
            self.start_listener(self.make_listener("http", address, sock=take("http", address)))
        for address, context in contexts:
            self.start_listener(self.make_listener("https", address, context, sock=take("https", address)))
        if inherited is not None:
            inherited.close_rest()
        self._sweeper = gevent.spawn(self._sweep_forever)
        self.http_proxy.start()
        self.health.start()
        self.rebalancer.start()
        return self.addresses

    def make_listener(self, scheme, address, context=None, sock=None):
        """A server for one configured listener, not yet accepting; ``sock``: an inherited listening socket."""
        glb = self.settings.glb
        listener = sock if sock is not None else address
        if scheme == "https":
            server = tls.TLSServer(listener, _no_application, context, handshake_timeout=glb.handshake_timeout,
                                   handler_class=UpgradeHandler, log=None, error_log=_PywsgiErrorLog())
        else:
            server = WSGIServer(listener, _no_application, handler_class=UpgradeHandler,
                                log=None, error_log=_PywsgiErrorLog())
        server.balancer = self
        server.scheme, server.configured, server.inherited = scheme, tuple(address), sock is not None
        self.admission.guard(server)
        return server

    def start_listener(self, server):
        """Start accepting on a server from ``make_listener`` (binding it, unless bound already)."""
        server.start()
        self.servers.append(server)
        log.info("= listening on %s://%s%s", server.scheme, _format_address(server.address),
                 " (inherited)" if server.inherited else "")
        return server

    def _sweep_forever(self):
        """Keep-alive pings, ping timeouts and idle timeouts for every client session, from one greenlet."""
        while not self.stopping:
            glb = self.settings.glb  # each round: a reload may change the periods
            periods = [p for p in (glb.ping_interval, glb.ping_timeout, glb.idle_timeout) if p]
            gevent.sleep(max(0.05, min(periods) / 4) if periods else 1.0)
            if not periods:
                continue
            now = time.monotonic()
            for session in list(self.client_sessions):
                session.keep_alive(now, glb.ping_interval, glb.ping_timeout, glb.idle_timeout)

    @property
    def ending_keep_alive(self):
        """No further requests on kept-alive HTTP connections: stopping, or handed over to a new glb."""
        return self.stopping or self.handed_over

    @property
    def addresses(self):
        """Bound (host, port) of the plain listeners."""
        return [server.address[:2] for server in self.servers if not server.ssl_enabled]

    @property
    def tls_addresses(self):
        """Bound (host, port) of the TLS listeners."""
        return [server.address[:2] for server in self.servers if server.ssl_enabled]

    def stop(self, timeout=None):
        """Stop accepting, close every session with 1001, wait up to ``timeout``, then kill."""
        timeout = self.settings.glb.shutdown_timeout if timeout is None else timeout
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.kill(block=False)
        for part in (self.health, self.rebalancer, self.pool):
            part.stop()
        self.live_feed.stop()
        self.ready_set.stop()
        for server in self.servers:
            server.close()
        for conn in list(self.connections.values()):
            gevent.spawn(_close_quietly, conn, CloseCode.GOING_AWAY, "going away")
        deadline = time.monotonic() + timeout
        joined = self.sessions.join(timeout=timeout)
        while self.client_sessions and time.monotonic() < deadline:
            gevent.sleep(0.05)  # detached client sessions end on their own io watchers
        if not joined or self.client_sessions:
            log.warning("= %d sessions still open after %.1fs; ending them",
                        len(self.sessions) + len(self.client_sessions), timeout)
            for session in list(self.client_sessions):
                session.end_now()
            self.sessions.kill(block=True, timeout=1)
            end = time.monotonic() + 1
            while self.client_sessions and time.monotonic() < end:
                gevent.sleep(0.05)
        for server in self.servers:
            server.stop(timeout=0)
        self.http_proxy.end_idle_clients()
        self.http_proxy.close()  # its pooled backend connections
        self.admission.stop()

    # -- plain HTTP --------------------------------------------------------

    def http_route(self, path):
        """glb's own WSGI endpoint for ``path``, or None (the request is forwarded).

        An exact entry of ``http_routes`` first; else the longest entry of
        ``http_prefix_routes`` that ``path`` starts with (``/glb/admin/...``).
        """
        route = self.http_routes.get(path)
        if route is not None or not path.startswith(self.prefix):
            return route
        best = ""
        for prefix in self.http_prefix_routes:
            if len(prefix) > len(best) and path.startswith(prefix):
                best = prefix
        return self.http_prefix_routes[best] if best else None

    # -- upgrades ----------------------------------------------------------

    def handle_upgrade(self, handler):
        environ = handler.environ
        rejection = handshake.check_upgrade(environ)
        if rejection is not None:
            log.info("! %s bad upgrade for %s: %s", handler.client_address[0],
                     environ.get("PATH_INFO"), rejection)
            return _respond(handler, rejection)
        path = environ.get("PATH_INFO", "/")
        session_class, kind = self.route_upgrade(path)
        if session_class is None:
            return _respond(handler, handshake.Rejection(Status.NOT_FOUND, f"no WebSocket endpoint at {path}"))
        conn = Connection(handler.client_address, path, environ.get("QUERY_STRING", ""),
                          headers_from_environ(environ), kind,
                          secure=environ.get("wsgi.url_scheme") == "https")
        refusal = self.admission.refuse_upgrade(conn)  # origin, handshake rate
        if isinstance(refusal, handshake.Rejection):
            return _respond(handler, refusal)
        response_headers = {}
        event = self.bus.fire(self.bus.handshake, connection=conn, request_headers=conn.headers,
                              response_headers=response_headers)
        if event is not None and event.rejection is not None:
            code, reason = event.rejection
            log.info("! %s handshake rejected by handler: %s %s", conn.id, code, reason)
            status = handshake.status_line(code)
            return _respond(handler, handshake.Rejection(status, reason or status))
        session = (refusal or session_class).prepare(self, conn, environ)
        if isinstance(session, handshake.Rejection):
            return _respond(handler, session)
        extra = list(session.response_headers) + list(response_headers.items())
        sock = handler.socket
        problem = handshake.header_problem(extra)
        if problem is not None:  # a handshake handler's mistake: no 101, and nothing held
            session.abandon(problem)
            self.report_error(conn, f"handshake refused: {problem}")
            return _respond(handler, handshake.Rejection(Status.INTERNAL_ERROR, "bad response header"))
        try:
            conn.websocket, detached = accept_websocket(
                handler, extra, max_message_size=self.settings.glb.max_message_size, connection=conn)
        except OSError as exc:
            session.abandon(f"101 could not be written: {exc}")
            return
        except BaseException as exc:  # whatever failed, the session's backend slot is given back
            session.abandon(f"101 could not be written: {exc!r}")
            raise
        if detached:
            self.admission.hold(sock, conn.id)  # the session keeps the connection's count
            self.sessions.spawn(self.run_session, conn, session)
        else:
            self.sessions.add(gevent.getcurrent())
            self.run_session(conn, session)

    def route_upgrade(self, path):
        """(session class, connection kind) for an upgrade path; (None, None) for glb paths it lacks."""
        session_class = self.ws_routes.get(path)
        if session_class is not None:
            return session_class, session_class.kind
        if path.startswith(self.prefix):
            return None, None
        return self.client_session_class, CLIENT

    client_session_class = ClientSession

    def run_session(self, conn, session):
        """Where every WebSocket session starts: ``session.start()`` tells ``end_session`` when it is over.

        That may be after this returns (a plain client's relay ends in its io watchers).
        """
        conn.session = session
        self.connections[conn.id] = conn
        self.stats.connection_opened(conn.kind)
        try:
            self.bus.fire(self.bus.connect, connection=conn)
        except BaseException:
            self.end_session(conn, session)
            raise
        if self.stopping:
            _close_quietly(conn, CloseCode.GOING_AWAY, "going away")
            self.end_session(conn, session)
            return
        session.start()

    def session_failed(self, conn, exc):
        """A session's own code raised (a glb bug): log it, fire ``exception``, close with 1011."""
        log.exception("! %s session failed", conn.id, exc_info=exc)
        self.bus.fire(self.bus.exception, connection=conn, exception=exc)
        _close_quietly(conn, CloseCode.INTERNAL_ERROR, "internal error")

    def end_session(self, conn, session):
        """Everything that happens once when a session is over, whichever greenlet ends it."""
        if self.connections.pop(conn.id, None) is None:  # told already
            return
        if not conn.websocket.closed:
            _close_quietly(conn, CloseCode.INTERNAL_ERROR, "session ended")
        self.admission.release_held(conn.id)
        code, reason = session.close_status
        self.bus.fire(self.bus.disconnect, connection=conn, code=code, reason=reason)

    # -- glb's own messages (glb.broadcast) --------------------------------

    def broadcast(self, message: str | bytes, channel: str = "", protocol: str = "", include: str = "",
                  exclude: str = "") -> int:
        """Send to the clients of every ready backend as an envelope; how many backends took it."""
        return broadcast.broadcast(self, message, channel, protocol, include, exclude)

    def write_data(self, connection_id: str, message: str | bytes) -> int:
        """Send to one of glb's own connections (Connection.id); 1 if written, 0 if not."""
        return broadcast.write_data(self, connection_id, message)

    def write_backend_client(self, client_id, message):
        """Send to a client a backend reported (its own id), through the backends; how many took it."""
        return broadcast.write_backend_client(self, client_id, message)

    def ping(self) -> int:
        """Ping every WebSocket glb accepted, control channels included; how many were pinged."""
        return broadcast.ping(self)

    def report_error(self, conn, text):
        """A protocol or I/O error on one of glb's connections: log it and fire ``error``."""
        log.info("! %s %s", conn.id if conn is not None else "-", text)
        self.bus.fire(self.bus.error, connection=conn, error=text)

    def reload(self, path=None):
        """Check the config at ``path`` (default: the file it came from) and apply it in place.

        Returns what changed (glb.reload.Changes). Raises ConfigError, HandlerLoadError or
        OSError with the running config untouched.
        """
        return reload.reload(self, path or self.settings.path)

    def pick_request(self, environ):
        return PickRequest.from_environ(environ)

    def backend_ssl_context(self):
        """The TLS context for wss:// backends, from ``[backends]`` (built once, on first need)."""
        context = self.__dict__.get("_backend_ssl_context")
        if context is None:
            context = self._backend_ssl_context = tls.backend_context(
                self.settings.backends, self.settings.path or "<dict>")
        return context

    def pick_backend(self, request=None, exclude=()):
        return self.policy.pick(self.registry.candidates(), request=request, exclude=exclude)


def _close_quietly(conn, code, reason):
    try:
        conn.close(code, reason)
    except Exception:  # closing a connection that is already broken is not news
        log.debug("= %s close failed", conn.id, exc_info=True)


def _respond(handler, rejection):
    """Answer an upgrade with an HTTP error and close the connection."""
    handler.server.balancer.stats.handshake_rejected(rejection.status)
    handler.close_connection = True
    handler.start_response(rejection.status, rejection.headers + [("Connection", "close")])
    handler.write(rejection.body)


def accept_websocket(handler, extra_headers=(), max_message_size=16 << 20, connection=None):
    """Write the 101 for a validated upgrade and take the socket from pywsgi.

    Returns ``(WebSocket, detached)``; when detached, the caller must run the
    session in a greenlet of its own and let the handler return.
    """
    key = handler.environ["HTTP_SEC_WEBSOCKET_KEY"]
    handler.socket.sendall(handshake.switching_protocols(key, extra_headers))
    handler.status = Status.SWITCHING_PROTOCOLS
    handler.headers_sent = True
    sock, leftover, detached = _take_socket(handler)
    websocket = WebSocket(sock, server_side=True, initial=leftover, connection=connection,
                          max_message_size=max_message_size)
    return websocket, detached


def _take_socket(handler):
    """Take the upgraded socket from pywsgi: (socket, bytes already buffered, detached?).

    A plain socket is detached into a new socket object, so pywsgi's close of
    its own object is a no-op and the handler greenlet can end. A TLS socket
    cannot be detached; its session runs in the handler greenlet instead.
    """
    sock = handler.socket
    sock.settimeout(0)
    try:
        leftover = handler.rfile.read1(65536) or b""
    except OSError:
        leftover = b""
    sock.settimeout(None)  # sessions wait as long as they like; their own limits apply
    handler.close_connection = True
    handler.socket = None
    detached = type(sock).__name__ == "socket" and sock.family in (
        stdlib_socket.AF_INET, stdlib_socket.AF_INET6, stdlib_socket.AF_UNIX)
    if detached:
        fd = sock.detach()
        sock = stdlib_socket.socket(fileno=fd)
    return sock, leftover, detached


def _format_address(address):
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _no_application(environ, start_response):
    """gevent's server wants an application; glb's handler class never calls it."""
    raise RuntimeError("glb answers every request itself")


class _PywsgiErrorLog:
    """pywsgi's error log, routed to logging."""

    def write(self, text):
        text = text.strip()
        if text:
            log.warning("! pywsgi: %s", text)

    def flush(self):
        pass
