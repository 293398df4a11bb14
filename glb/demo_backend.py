"""A small demo backend that registers with glb through the backend agent.

Over WebSocket (any path) it echoes every message unchanged (text and binary)
and echoes the close code and reason, except that the text ``whoami`` is
answered with its guid and a text ``broadcast:<payload>`` is not echoed but
broadcast through glb: ``<payload>`` reaches every client of every backend
registered with that glb (this one's included). A client that connected with
``?channel=NAME`` is in that channel, so envelopes for a channel reach it. Over HTTP, ``GET /`` serves a demo page (its script
opens a WebSocket to the page's own origin, so through glb, and shows which
backend answered) and ``GET /whoami`` returns the guid as text/plain. Every
WebSocket client is reported to glb (client records), so fewest-connections
balancing sees it.

Run one::

    python -m glb.demo_backend --port 9001 --lb ws://127.0.0.1:8080

or let glb run ``[demo] backends = N`` of them in-process (``DemoFleet``).
"""

if __name__ == "__main__":  # an entry point: patch before anything imports socket or threading
    from gevent import monkey

    monkey.patch_all()

import argparse  # noqa: E402
import importlib.resources  # noqa: E402
import itertools  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402
import uuid  # noqa: E402
from urllib.parse import parse_qs  # noqa: E402

import gevent  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pool import Group  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

from glb import handshake  # noqa: E402
from glb.agent import Agent, select_clients  # noqa: E402
from glb.control import SGC_CONTROL_PATH  # noqa: E402
from glb.control_records import ClientRecord, TextEnvelope  # noqa: E402
from glb.errors import CloseCode, ConnectionClosed, Status  # noqa: E402
from glb.frames import OP_BINARY, OP_TEXT, encode_frame  # noqa: E402
from glb.server import accept_websocket  # noqa: E402

log = logging.getLogger("glb.demo")

WHOAMI = "whoami"
BROADCAST = "broadcast:"
CLIENT_SEND_TIMEOUT = 5.0  # a client that reads nothing this long while a broadcast waits is dropped
PAGE = "static/demo.html"


def demo_page():
    """The bytes of the demo page (package data)."""
    return importlib.resources.files("glb").joinpath(PAGE).read_bytes()


class DemoHandler(WebSocketHandler):
    """pywsgi handler: upgrades go to the demo backend, everything else to its WSGI app."""

    def handle(self):
        if self.socket.family != socket.AF_UNIX:
            # pywsgi writes headers and body separately: without this, Nagle delays small answers
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().handle()

    def log_request(self):
        pass

    def run_application(self):
        if handshake.is_upgrade_request(self.environ):
            self.server.demo.handle_upgrade(self)
        else:
            WSGIHandler.run_application(self)


class DemoBackend:
    """One demo backend: a WebSocket/HTTP server on ``host:port`` and an agent for ``lb_urls``.

    ``port=0`` takes a free port (``start()`` returns it). With no ``lb_urls`` it
    runs on its own, registering nowhere.
    """

    def __init__(self, port=0, host="127.0.0.1", lb_urls=(), guid=None, token=None,
                 max_message_size=16 << 20):
        self.host, self.port = host, port
        self.lb_urls = [lb_urls] if isinstance(lb_urls, str) else list(lb_urls)
        self.guid = guid or str(uuid.uuid4())
        self.token = token
        self.max_message_size = max_message_size
        self.server = None
        self.agent = None
        self.sessions = Group()  # one greenlet per WebSocket client
        self.websockets = {}     # conn id -> WebSocket, so stop() can close them
        self.clients = {}        # conn id -> ClientRecord (channel), what broadcasts are filtered by
        self._ids = itertools.count(1)

    def __repr__(self):
        return f"<DemoBackend {self.guid} on {self.host}:{self.port}>"

    def start(self):
        """Listen, then register with every glb in the background; returns the bound port."""
        self.server = WSGIServer((self.host, self.port), self.app, handler_class=DemoHandler, log=None)
        self.server.demo = self
        self.server.start()
        self.port = self.server.address[1]
        log.info("= demo backend %s listening on %s:%s", self.guid, self.host, self.port)
        if self.lb_urls:
            self.agent = Agent(self.lb_urls, guid=self.guid, bindings=[(self.host or "0.0.0.0", self.port)],
                               token=self.token, on_envelope=self.deliver)
            self.agent.start()
        return self.port

    def stop(self, timeout=2.0):
        """Leave glb (1000), stop accepting, close clients with 1001, then end what is left."""
        if self.agent is not None:
            self.agent.stop(timeout=timeout)
        if self.server is not None:
            self.server.close()
        for ws in list(self.websockets.values()):
            self.sessions.spawn(_close_quietly, ws, CloseCode.GOING_AWAY, "going away")
        if not self.sessions.join(timeout=timeout):
            self.sessions.kill(block=True, timeout=1)
        if self.server is not None:
            self.server.stop(timeout=0)

    # -- WebSocket -------------------------------------------------------------------------------

    def handle_upgrade(self, handler):
        rejection = handshake.check_upgrade(handler.environ)
        if rejection is not None:
            handler.close_connection = True
            handler.start_response(rejection.status, rejection.headers + [("Connection", "close")])
            handler.write(rejection.body)
            return
        try:
            ws, detached = accept_websocket(handler, max_message_size=self.max_message_size)
        except OSError:
            return
        peer = handler.client_address
        query = parse_qs(handler.environ.get("QUERY_STRING", ""))
        channel = query.get("channel", [""])[0]
        # A session glb relays arrives with X-Forwarded-For; glb counts it already, so only
        # clients that connected directly are reported (docs/protocol.md).
        direct = "HTTP_X_FORWARDED_FOR" not in handler.environ
        if detached:
            self.sessions.spawn(self.serve, ws, peer, channel, direct)
        else:
            self.serve(ws, peer, channel, direct)

    def serve(self, ws, peer, channel="", direct=True):
        """Echo until the client leaves; ``whoami`` gets the guid, ``broadcast:...`` is broadcast."""
        conn_id = f"{self.guid}-{next(self._ids)}"
        ws.send_timeout = CLIENT_SEND_TIMEOUT
        self.websockets[conn_id] = ws
        ip = peer[0] if peer else ""
        self.clients[conn_id] = ClientRecord(True, conn_id, ip, channel)
        report = direct and self.agent is not None
        if report:
            self.agent.client_connected(conn_id, ip=ip, channel=channel)
        try:
            while True:
                message = ws.receive()
                if message is None:
                    break
                if isinstance(message, str) and message.startswith(BROADCAST):
                    self.broadcast(message[len(BROADCAST):])
                else:
                    ws.send(self.guid if message == WHOAMI else message)
        except ConnectionClosed:
            pass
        finally:
            self.websockets.pop(conn_id, None)
            self.clients.pop(conn_id, None)
            if report:
                self.agent.client_disconnected(conn_id)
            if not ws.closed:
                ws.abort()

    # -- broadcasts ------------------------------------------------------------------------------

    def broadcast(self, payload, channel=""):
        """Send ``payload`` to the clients of every backend through glb; only to ours if no glb is connected."""
        if self.agent is not None and self.agent.broadcast(payload, channel=channel):
            return
        self.deliver(TextEnvelope(channel=channel, payload=payload))

    def deliver(self, envelope):
        """An envelope from glb (``on_envelope``): its payload to each of our clients it is meant for."""
        payload = envelope.payload
        if isinstance(payload, str):
            frame = encode_frame(OP_TEXT, payload.encode("utf-8"), mask=False)
        else:
            frame = encode_frame(OP_BINARY, payload, mask=False)
        for conn_id in select_clients(envelope, self.clients):  # encoded once, the same bytes for all
            ws = self.websockets.get(conn_id)
            if ws is None:
                continue
            try:
                ws.send_raw(frame)
            except ConnectionClosed:  # that client's own greenlet cleans up
                pass

    # -- HTTP ------------------------------------------------------------------------------------

    def app(self, environ, start_response):
        method, path = environ.get("REQUEST_METHOD"), environ.get("PATH_INFO", "/")
        if path == "/":
            body, content_type = demo_page(), "text/html; charset=utf-8"
        elif path == "/" + WHOAMI:
            body, content_type = self.guid.encode("utf-8"), "text/plain; charset=utf-8"
        else:
            body, content_type, status = b"not found\n", "text/plain; charset=utf-8", Status.NOT_FOUND
            start_response(status, [("Content-Type", content_type), ("Content-Length", str(len(body)))])
            return [body]
        if method not in ("GET", "HEAD"):
            body = b"method not allowed\n"
            start_response(Status.METHOD_NOT_ALLOWED, [("Content-Type", "text/plain; charset=utf-8"),
                                                       ("Allow", "GET, HEAD"),
                                                       ("Content-Length", str(len(body)))])
            return [body]
        start_response(Status.OK, [("Content-Type", content_type), ("Cache-Control", "no-store"),
                                   ("Content-Length", str(len(body)))])
        return [b""] if method == "HEAD" else [body]


def _close_quietly(ws, code, reason):
    try:
        ws.close(code, reason)
    except Exception:  # a client already gone is not news
        log.debug("= close failed", exc_info=True)


def lb_url_for(address, path=SGC_CONTROL_PATH):
    """The control-channel URL for a glb listener ``(host, port)``; a wildcard host means loopback.

    The sgc path is used because it does not depend on glb's ``prefix`` setting.
    """
    host, port = address[:2]
    if host in ("", "0.0.0.0"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host:
        host = f"[{host}]"
    return f"ws://{host}:{port}{path}"


class DemoFleet:
    """``count`` demo backends in this process, on free loopback ports, registered with one glb."""

    def __init__(self, count, lb_address, host="127.0.0.1", token=None):
        self.lb_url = lb_url_for(lb_address)
        tag = uuid.uuid4().hex[:6]
        self.backends = [DemoBackend(0, host, [self.lb_url], guid=f"demo-{i}-{tag}", token=token)
                         for i in range(1, count + 1)]

    def start(self):
        """Start every backend; returns their ports."""
        return [backend.start() for backend in self.backends]

    def stop(self, timeout=2.0):
        group = Group()
        for backend in self.backends:
            group.spawn(backend.stop, timeout)
        group.join(timeout=timeout + 2)


# -- command line ------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m glb.demo_backend",
        description="A demo WebSocket echo backend that registers with glb over the control channel.")
    parser.add_argument("--port", type=int, default=9001, help="port to listen on (default 9001; 0 = any)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on and announce to glb (default 127.0.0.1)")
    parser.add_argument("--lb", action="append", default=[], metavar="URL",
                        help="glb to register with, e.g. ws://127.0.0.1:8080 (repeat for several)")
    parser.add_argument("--guid", help="this backend's id (default: a random uuid)")
    parser.add_argument("--token", help="backend token, if glb's [backends] token is set")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    backend = DemoBackend(args.port, args.host, args.lb, guid=args.guid, token=args.token)
    try:
        port = backend.start()
    except (OSError, ValueError) as exc:
        print(f"glb.demo_backend: {exc}", file=sys.stderr)
        return 1
    print(f"demo backend {backend.guid} on {args.host}:{port}", flush=True)
    stop_requested = Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(signum, stop_requested.set)
    stop_requested.wait()
    backend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
