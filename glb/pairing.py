"""Pairing a client with a backend before the client's 101, retrying unreachable backends.

glb opens the backend WebSocket first (same path and query, end-to-end headers,
X-Forwarded-*), so the client sees what the backend decided: its subprotocol,
its refusal status, or 502/503 when no backend could take the session.
"""
import logging
from collections import namedtuple

from glb.errors import HandshakeFailed, Status
from glb.handshake import Rejection, header_tokens
from glb.websocket import connect

log = logging.getLogger("glb.relay")

Paired = namedtuple("Paired", "backend upstream response_headers")
Paired.__doc__ = """A backend that accepted the session: its open WebSocket and the 101 headers passed on."""

# Request headers that belong to one hop (RFC 9110 §7.6.1) or to glb's own handshake with the client.
NOT_FORWARDED = frozenset({
    "connection", "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization",
    "proxy-connection", "host", "sec-websocket-key", "sec-websocket-version", "sec-websocket-accept",
    # the relay forwards frames as they are, so it can honour no extension (permessage-deflate would
    # need both legs to agree and handlers could not read compressed payloads)
    "sec-websocket-extensions",
    "x-forwarded-for", "x-forwarded-proto", "x-forwarded-host",
})
# Backend 101 response headers that reach the client; the rest belongs to that handshake.
PASSED_101_HEADERS = frozenset({"sec-websocket-protocol", "set-cookie", "cache-control"})


def forwarded_headers(conn, environ):
    """The headers the backend handshake carries: the client's end-to-end ones plus X-Forwarded-*."""
    headers = [(name, value) for name, value in conn.headers.items()
               if name.lower() not in NOT_FORWARDED and not name.lower().startswith("proxy-")]
    hop = header_tokens(environ.get("HTTP_CONNECTION", ""))
    headers = [(name, value) for name, value in headers if name.lower() not in hop]
    prior = environ.get("HTTP_X_FORWARDED_FOR")
    headers.append(("X-Forwarded-For", f"{prior}, {conn.peer_ip}" if prior else conn.peer_ip))
    headers.append(("X-Forwarded-Proto", "https" if conn.secure else "http"))
    headers.append(("X-Forwarded-Host", environ.get("HTTP_HOST", "")))
    return headers


def target_of(environ):
    path = environ.get("PATH_INFO", "/") or "/"
    query = environ.get("QUERY_STRING", "")
    return f"{path}?{query}" if query else path


def pair(balancer, conn, environ):
    """Open a backend WebSocket for ``conn``: ``Paired``, or the ``Rejection`` to answer the client with.

    Up to ``1 + backend_retries`` backends are tried; a backend that refuses the
    handshake with a status decides for the client (no retry), an unreachable
    one is reported and skipped. A backend's session count is taken from the
    pick and given back if the attempt fails.
    """
    settings = balancer.settings.glb
    if "websocket" not in settings.protocols:
        return Rejection(Status.NOT_FOUND, "WebSocket sessions are turned off here")
    request = balancer.pick_request(environ)
    headers = forwarded_headers(conn, environ)
    target = target_of(environ)
    tried: list = []  # registry entries already tried
    for _ in range(1 + settings.backend_retries):
        backend = balancer.pick_backend(request, exclude=tried)
        if backend is None:
            break
        tried.append(backend)
        answer = _open(balancer, conn, backend, target, headers)
        if answer is not None:
            return answer
    if not tried:
        return Rejection(Status.SERVICE_UNAVAILABLE, "no backend available")
    return Rejection(Status.BAD_GATEWAY, "no backend could be reached")


def _open(balancer, conn, backend, target, headers):
    """One attempt: ``Paired``, the backend's ``Rejection``, or None when it could not be reached."""
    settings = balancer.settings.glb
    # Counted from the pick, not from the backend's 101: sessions arriving together
    # (a reconnect wave) see each other and least-loaded placement spreads them.
    balancer.registry.session_started(backend)
    try:
        upstream, _, answer = connect(
            backend.binding_url(target), headers=headers,
            timeout=settings.backend_connect_timeout,
            ssl_context=balancer.backend_ssl_context(),
            max_message_size=settings.max_message_size)
    except HandshakeFailed as exc:
        balancer.registry.session_ended(backend)
        if exc.status is not None and exc.status != 101:
            log.info("! %s backend %s refused the handshake: %s", conn.id, backend.guid, exc.status)
            if exc.status >= 500:  # the backend is failing, not judging this client
                balancer.health.connect_failed(backend)
            return Rejection.from_backend(exc.status, exc.headers, exc.body)
        balancer.report_error(conn, f"backend {backend.guid} unreachable: {exc.reason}")
        balancer.health.connect_failed(backend)
        balancer.stats.connect_failed(backend.name, exc.reason)
        return None
    except BaseException:
        balancer.registry.session_ended(backend)
        raise
    upstream.auto_pong = False
    upstream.send_timeout = settings.send_timeout
    conn.backend = backend
    passed = [(name, value) for name, value in answer if name.lower() in PASSED_101_HEADERS]
    return Paired(backend, upstream, passed)
