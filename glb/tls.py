"""TLS: the contexts of TLS listeners and of glb's own connections to backends.

A TLS listener (``[tls] listen``) gets its context once, at start-up, before
any listener binds::

    ssl_get_handler fires (listener, context=None)
      a handler assigned event.context  -> that context, as it is; nothing else fires
      nobody did                        -> glb builds its default context from [tls]:
                                           certificate chain, minimum_version, ciphers,
                                           ALPN "http/1.1", client certificates per
                                           verify_client / cafile
                                        -> ssl_after_create_handler fires (listener, context);
                                           handlers change the context in place (or
                                           assign another one)

``listener`` is the address as configured, ``host:port`` (``[::1]:8443`` for IPv6),
so a handler can tell listeners apart whatever port the system picks for port 0.

Start-up stops (``ConfigError`` / ``HandlerLoadError``, exit 2) instead of running
a listener without the policy that was asked for, when: the certificate, key or
CA bundle cannot be loaded (one line naming the file, section and key); a handler
supplies something that is not a server-side ``ssl.SSLContext``; or a handler
raises while the context is being built (its traceback is logged and
``exception`` fires first, as for any handler).

Accepted connections do their TLS handshake in the connection's own greenlet,
bounded by ``[glb] handshake_timeout``. A failed or timed-out handshake closes
the connection and is an ``error`` event (``connection.path`` is empty: no
request was read); it never reaches the server or the hub as a traceback.

To backends (``[backends] verify``, ``cafile``, ``certfile``/``keyfile``),
``backend_context`` is the client context for wss:// bindings and
``requests_options`` the same policy for https:// forwarding, so both check the
same CAs and present the same client certificate.
"""

import logging
import ssl
import warnings

import gevent
import gevent.ssl
import urllib3
from gevent.pywsgi import WSGIServer

from glb.connection import CLIENT, Connection
from glb.errors import ConfigError, HandlerLoadError

log = logging.getLogger("glb.tls")

MINIMUM_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
VERIFY_CLIENT = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "required": ssl.CERT_REQUIRED}
ALPN = ["http/1.1"]  # glb speaks HTTP/1.1 only: say so, so clients offering h2 settle at once

# Any SSLContext will do, gevent's or the standard library's: TLSServer wraps with gevent's socket.
_SSLContext = gevent.ssl.orig_SSLContext
_TLS_EVENTS = ("ssl_get_handler", "ssl_after_create_handler")


def listener_name(address):
    """``host:port`` of a listener address, IPv6 in brackets."""
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- listener contexts ---------------------------------------------------------------------------

def server_context(tls, file=None):
    """glb's default context for a TLS listener, from the ``[tls]`` section ``tls``."""
    context = gevent.ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = MINIMUM_VERSIONS[tls.minimum_version]
    password = tls.password
    try:
        # A callable password stops OpenSSL prompting on the terminal for an encrypted key.
        context.load_cert_chain(tls.certfile, tls.keyfile, password=lambda: password)
    except (ssl.SSLError, OSError, TypeError) as exc:
        raise ConfigError(f"cannot load certificate and key: {_reason(exc)}", file, "tls", "certfile") from None
    if tls.ciphers:
        try:
            context.set_ciphers(tls.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"OpenSSL accepts none of these ciphers: {tls.ciphers!r}", file, "tls",
                              "ciphers") from None
    if tls.verify_client != "none":
        try:
            context.load_verify_locations(tls.cafile)
        except (ssl.SSLError, OSError, TypeError) as exc:
            raise ConfigError(f"not a usable CA bundle: {_reason(exc)}", file, "tls", "cafile") from None
        context.verify_mode = VERIFY_CLIENT[tls.verify_client]
    context.set_alpn_protocols(ALPN)
    return context


def listener_context(bus, tls, listener, file=None):
    """The context for the TLS listener named ``listener``: a handler's, or glb's default (see the module doc)."""
    failures = []

    def watch(event):  # the bus contains handler exceptions; here one must stop start-up
        failed = getattr(event, "event", None)
        if getattr(failed, "name", None) in _TLS_EVENTS and getattr(failed, "listener", None) == listener:
            failures.append((failed.name, event.exception))

    watcher = bus.add_handler("exception", watch, origin="glb.tls")
    try:
        event = bus.fire(bus.ssl_get_handler, listener=listener, context=None)
        _raise_failure(failures, listener)
        supplied = event.context if event is not None else None
        if supplied is not None:
            _check_context(supplied, "ssl_get_handler", listener)
            log.info("= %s: TLS context supplied by an ssl_get_handler handler", listener)
            return supplied
        context = server_context(tls, file)
        event = bus.fire(bus.ssl_after_create_handler, listener=listener, context=context)
        _raise_failure(failures, listener)
        if event is not None:
            context = event.context
            _check_context(context, "ssl_after_create_handler", listener)
        return context
    finally:
        bus.remove_handler("exception", watcher)


def _raise_failure(failures, listener):
    if failures:
        name, exc = failures[0]
        raise HandlerLoadError(f"an on_{name} handler raised {type(exc).__name__}: {exc} "
                               f"while the TLS context for {listener} was built (traceback logged)")


def _check_context(context, name, listener):
    if not isinstance(context, _SSLContext):
        raise HandlerLoadError(f"an on_{name} handler left event.context = {context!r} for {listener}; "
                               "expected an ssl.SSLContext")
    if context.protocol == ssl.PROTOCOL_TLS_CLIENT:
        raise HandlerLoadError(f"an on_{name} handler gave {listener} a client-side context; "
                               "a listener needs ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)")


class TLSServer(WSGIServer):
    """A gevent server for one TLS listener: handshakes bounded in time, failures reported.

    ``wsgi.url_scheme`` is ``https`` in every environ, so connections are
    ``secure`` and X-Forwarded-Proto says https. ``balancer`` (set by the
    Balancer, like on plain listeners) receives failed handshakes as ``error``.

    A TLS socket cannot be detached from the server's handler, so an upgraded TLS
    connection's session runs inside that handler's greenlet. Two consequences are handled here:
    ``_TLSSocket.close`` ends the connection even while the handler's request
    reader still refers to the socket, and ``handler_class`` is given a
    ``handle_error`` that never tries to answer HTTP on a connection already
    upgraded (a session killed at shutdown ends quietly, as a plain one does).
    """

    def __init__(self, listener, application, context, handshake_timeout=10.0, **kwargs):
        if kwargs.get("handler_class") is not None:
            kwargs["handler_class"] = _upgrade_aware(kwargs["handler_class"])
        super().__init__(listener, application, ssl_context=context, **kwargs)
        self.context = context
        self.handshake_timeout = handshake_timeout

    def wrap_socket_and_handle(self, client_socket, address):
        try:
            # gevent's socket whatever the context's class, so a handler's plain ssl.SSLContext cooperates too
            tls_socket = _TLSSocket(sock=client_socket, server_side=True, do_handshake_on_connect=False,
                                    suppress_ragged_eofs=True, _context=self.context)
        except OSError as exc:
            client_socket.close()
            return self._failed(address, f"TLS setup failed: {_reason(exc)}")
        timer = gevent.Timeout.start_new(self.handshake_timeout)
        try:
            tls_socket.do_handshake()
        except gevent.Timeout as exc:
            if exc is not timer:
                raise
            tls_socket.close()
            return self._failed(address, f"TLS handshake timed out after {self.handshake_timeout} s")
        except OSError as exc:
            tls_socket.close()
            return self._failed(address, f"TLS handshake failed: {_reason(exc)}")
        finally:
            timer.close()
        try:
            return self.handle(tls_socket, address)
        finally:
            tls_socket.close()

    def _failed(self, address, text):
        conn = Connection(tuple(address[:2]) if address else ("", 0), "", kind=CLIENT, secure=True)
        balancer = getattr(self, "balancer", None)
        if balancer is not None:
            balancer.report_error(conn, text)
        else:
            log.info("! %s %s", conn.id, text)


class _TLSSocket(gevent.ssl.SSLSocket):
    """A server-side TLS connection whose ``close()`` always ends it.

    Anything still holding a ``makefile()`` reference to the socket would keep
    it open while the handler lives; an upgraded or failed connection must end now.
    """

    def close(self):
        self._io_refs = 0
        super().close()


_upgrade_aware_classes = {}


def _upgrade_aware(handler_class):
    """``handler_class`` with a ``handle_error`` that knows an upgraded connection has no HTTP left."""
    derived = _upgrade_aware_classes.get(handler_class)
    if derived is None:
        def handle_error(self, t, v, tb):
            if self.socket is None or self.headers_sent:  # taken for a WebSocket: no 500 possible
                self.close_connection = True
                if not issubclass(t, gevent.GreenletExit):
                    self._log_error(t, v, tb)
                return
            handler_class.handle_error(self, t, v, tb)

        derived = _upgrade_aware_classes[handler_class] = type(
            f"TLS{handler_class.__name__}", (handler_class,), {"handle_error": handle_error,
                                                                "__module__": handler_class.__module__})
    return derived


# -- to backends ---------------------------------------------------------------------------------

def backend_context(backends, file=None):
    """The client context for wss:// backends, from the ``[backends]`` section ``backends``."""
    try:
        context = gevent.ssl.create_default_context(cafile=backends.cafile)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"not a usable CA bundle: {_reason(exc)}", file, "backends", "cafile") from None
    if not backends.verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if backends.certfile:
        try:
            context.load_cert_chain(backends.certfile, backends.keyfile, password=lambda: "")
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load certificate and key: {_reason(exc)}", file, "backends",
                              "certfile") from None
    return context


def requests_options(backends):
    """``(verify, cert)`` for requests' adapter: the same policy as ``backend_context``."""
    verify = backends.verify
    if verify and backends.cafile:
        verify = backends.cafile
    if not verify:
        # Chosen in the config, and said once at start-up: not a warning per request.
        warnings.filterwarnings("ignore", category=urllib3.exceptions.InsecureRequestWarning)
    cert = (backends.certfile, backends.keyfile) if backends.certfile else None
    return verify, cert


def _reason(exc):
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
    if "PEM lib" in str(exc):  # OpenSSL says only this for both of its usual causes
        reason += " (not PEM, or an encrypted key with a wrong or missing password)"
    return reason
