"""The admin API under ``<prefix>admin/``: JSON in and out, for operators and ``glb.ctl``.

::

    GET  admin/backends                         every backend: state, health, weights, sessions
    GET  admin/backends/NAME                    one backend
    POST admin/backends/NAME/drain              {"spread": seconds}  (optional: close its sessions 1012)
    POST admin/backends/NAME/undrain
    POST admin/backends/NAME/weight             {"weight": 1..100}
    POST admin/backends/NAME/close              {"code": 1012, "reason": "...", "spread": seconds}
    POST admin/rebalance                        a rebalancing pass now (whatever [glb] rebalance says)
    POST admin/reload                           read the config file again and apply it (as SIGHUP);
                                                409 with the one-line reason when it is refused
    GET  admin/sessions?backend=NAME&offset=0&limit=100
    POST admin/sessions/ID/close                {"code": 1012, "reason": "..."}

NAME is a registered backend's guid or a static backend's section name. A call
is allowed from an address in ``[admin] allow`` or with ``[admin] token`` as a
bearer token; anything else gets 401 (no token presented) or 403, and nothing
changes. The API is not for browsers: a request with an ``Origin`` other than
glb's own is refused (403), and a body must be ``application/json`` (415), so a
web page cannot drive it from an operator's browser on an allowed address.
Errors are JSON ``{"error": ...}``: 400 bad body or parameter, 404 unknown
path/backend/session, 405 wrong method, 409 the backend's state (or the
balancing policy, for rebalancing) forbids it.

Each endpoint is a plain WSGI callable over a minimal environ (``REQUEST_METHOD``,
``PATH_INFO``, ``QUERY_STRING``, ``REMOTE_ADDR``, ``HTTP_*``, ``wsgi.input``).
"""

import json
import logging
import time
from urllib.parse import parse_qs, unquote

from glb import reload
from glb.config import REBALANCE_POLICIES, rebalance_policy_reason
from glb.connection import CLIENT
from glb.control import admitted, bearer_token, json_response
from glb.errors import CloseCode, Status, is_sendable_close_code
from glb.registry import CONNECTING, GONE
from glb.pool import RESTART_REASON

log = logging.getLogger("glb.admin")

MAX_BODY = 64 * 1024
MAX_LIMIT = 1000
MAX_SPREAD = 24 * 3600.0


class ApiError(Exception):
    """An answer other than 200: ``status`` and a message for ``{"error": ...}``."""

    def __init__(self, status, message, headers=()):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, list(headers)


def authorize(admin_settings, peer_ip, authorization):
    """None if the call may proceed, else the ApiError to answer with (401 or 403)."""
    expected = admin_settings.token
    presented = bearer_token(authorization)
    if admitted(expected, presented, admin_settings.allow, peer_ip):
        return None
    if expected and presented is None:
        return ApiError(Status.UNAUTHORIZED, "the admin API needs Authorization: Bearer <token>",
                        [("WWW-Authenticate", 'Bearer realm="glb admin"')])
    if expected:
        return ApiError(Status.FORBIDDEN, "wrong admin token")
    return ApiError(Status.FORBIDDEN, f"admin calls from {peer_ip} are not allowed")


# -- request parsing ---------------------------------------------------------------------------

def cross_site(environ):
    """True for a request a browser made from another origin (the admin API takes none)."""
    origin = environ.get("HTTP_ORIGIN")
    if origin is None:
        return False
    host = environ.get("HTTP_HOST", "")
    return origin.partition("://")[2].rstrip("/") != host or not host


def read_json(environ):
    """The request body as a JSON object ({} when empty); ApiError 400/413/415 otherwise."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise ApiError(Status.BAD_REQUEST, "bad Content-Length") from None
    if length > MAX_BODY:
        raise ApiError(Status.PAYLOAD_TOO_LARGE, f"body over {MAX_BODY} bytes")
    content_type = (environ.get("CONTENT_TYPE") or "").partition(";")[0].strip().lower()
    if length > 0 and content_type != "application/json":
        raise ApiError(Status.UNSUPPORTED_MEDIA_TYPE, "a body must be Content-Type: application/json")
    body = environ["wsgi.input"].read(length) if length > 0 else b""
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ApiError(Status.BAD_REQUEST, "body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(Status.BAD_REQUEST, "body must be a JSON object")
    return data


def _number(data, key, low, high, integer=False, default=None):
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        kind = "an integer" if integer else "a number"
        raise ApiError(Status.BAD_REQUEST, f"{key!r} must be {kind}, got {value!r}")
    if not low <= value <= high:
        raise ApiError(Status.BAD_REQUEST, f"{key!r} must be between {low:g} and {high:g}, got {value!r}")
    return value


def close_args(data):
    """(code, reason) of a close request body; 1012 "service restart" by default."""
    code = _number(data, "code", 1000, 4999, integer=True, default=CloseCode.SERVICE_RESTART)
    if not is_sendable_close_code(code):
        raise ApiError(Status.BAD_REQUEST, f"close code {code} may not be sent")
    reason = data.get("reason", RESTART_REASON)
    if not isinstance(reason, str) or len(reason.encode("utf-8")) > 123:
        raise ApiError(Status.BAD_REQUEST, "'reason' must be a string of at most 123 bytes")
    return code, reason


def _query_int(query, key, default, high):
    text = query.get(key, [""])[0]
    if not text:
        return default
    if not text.isdigit() or int(text) > high:
        raise ApiError(Status.BAD_REQUEST, f"{key} must be an integer 0..{high}, got {text!r}")
    return int(text)


# -- documents ---------------------------------------------------------------------------------

def backend_doc(backend, candidates, sessions):
    return {
        "name": backend.name,
        "guid": backend.guid,
        "static": backend.static,
        "state": backend.state,
        "health": backend.health,
        "down_reason": backend.down_reason,
        "accepts_clients": backend in candidates,
        "weight": backend.weight,
        "effective_weight": round(backend.effective_weight, 3),
        "sessions": sessions,
        "reported_clients": len(backend.reported_clients),
        "max_clients": backend.max_clients,
        "bindings": [{"host": b.host, "port": b.port, "ssl": b.ssl} for b in backend.bindings],
    }


def session_doc(session, now):
    conn = session.conn
    return {
        "id": conn.id,
        "peer": conn.peer_ip,
        "path": conn.path,
        "backend": session.backend.name,
        "age": round(now - conn.started, 3),
    }


# -- the API -----------------------------------------------------------------------------------

class AdminApi:
    """WSGI app for every path under ``<prefix>admin/``."""

    def __init__(self, balancer):
        self.balancer = balancer
        self.root = balancer.prefix + "admin/"

    def __call__(self, environ, start_response):
        try:
            refusal = authorize(self.balancer.settings.admin, environ.get("REMOTE_ADDR", ""),
                                environ.get("HTTP_AUTHORIZATION"))
            if refusal is None and cross_site(environ):
                refusal = ApiError(Status.FORBIDDEN, "admin calls from web pages of another origin are refused")
            if refusal is not None:
                log.info("! admin call %s %s from %s refused: %s", environ.get("REQUEST_METHOD"),
                         environ.get("PATH_INFO"), environ.get("REMOTE_ADDR"), refusal.message)
                raise refusal
            status, body = self.dispatch(environ)
        except ApiError as exc:
            return json_response(start_response, exc.status, {"error": exc.message}, exc.headers)
        return json_response(start_response, status, body)

    def dispatch(self, environ):
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        # Split the path as sent, then decode each part, so a guid with "/" (sent as %2F) is one name.
        sent = environ.get("RAW_URI", path).split("?", 1)[0]
        parts = [unquote(p) for p in sent[len(self.root):].split("/")] if sent.startswith(self.root) else []
        route = self._route(parts)
        if route is None:
            raise ApiError(Status.NOT_FOUND, f"no admin endpoint at {path}")
        wanted, handler, args = route
        if method != wanted:
            raise ApiError(Status.METHOD_NOT_ALLOWED, f"use {wanted}", [("Allow", wanted)])
        data = read_json(environ) if method == "POST" else None
        query = parse_qs(environ.get("QUERY_STRING", ""))
        return Status.OK, handler(*args, data=data, query=query)

    def _route(self, parts):
        if parts == ["backends"]:
            return "GET", self.list_backends, ()
        if len(parts) == 2 and parts[0] == "backends" and parts[1]:
            return "GET", self.show_backend, (parts[1],)
        if len(parts) == 3 and parts[0] == "backends" and parts[2] in self.BACKEND_ACTIONS:
            return "POST", getattr(self, self.BACKEND_ACTIONS[parts[2]]), (parts[1],)
        if parts == ["rebalance"]:
            return "POST", self.rebalance, ()
        if parts == ["reload"]:
            return "POST", self.reload, ()
        if parts == ["sessions"]:
            return "GET", self.list_sessions, ()
        if len(parts) == 3 and parts[0] == "sessions" and parts[2] == "close":
            return "POST", self.close_session, (parts[1],)
        return None

    BACKEND_ACTIONS = {"drain": "drain", "undrain": "undrain", "weight": "weight", "close": "close"}

    # -- backends -------------------------------------------------------------------------------

    def _backend(self, name):
        registry = self.balancer.registry
        backend = registry.get(name)
        if backend is None:
            backend = next((b for b in registry.all() if b.name == name), None)
        if backend is None or backend.state == GONE:
            raise ApiError(Status.NOT_FOUND, f"no backend {name!r}")
        return backend

    def _session_counts(self):
        counts: dict = {}
        for session in self.balancer.pool.sessions_of():
            counts[session.backend] = counts.get(session.backend, 0) + 1
        return counts

    def _doc(self, backend, counts=None):
        counts = self._session_counts() if counts is None else counts
        return backend_doc(backend, self.balancer.registry.candidates(), counts.get(backend, 0))

    def list_backends(self, data, query):
        counts = self._session_counts()
        return {"backends": [self._doc(b, counts) for b in self.balancer.registry.all()]}

    def show_backend(self, name, data, query):
        return self._doc(self._backend(name))

    def drain(self, name, data, query):
        backend = self._live(name, "drained")
        spread = _number(data, "spread", 0, MAX_SPREAD)
        closing = self.balancer.pool.drain(backend, spread)
        log.info("= admin: drain %s (spread %s)", backend.name, spread)
        return {**self._doc(backend), "closing": closing}

    def undrain(self, name, data, query):
        backend = self._live(name, "undrained")
        self.balancer.pool.undrain(backend)
        log.info("= admin: undrain %s", backend.name)
        return self._doc(backend)

    def weight(self, name, data, query):
        backend = self._backend(name)
        weight = _number(data, "weight", 1, 100, integer=True)
        if weight is None:
            raise ApiError(Status.BAD_REQUEST, "'weight' is required")
        self.balancer.pool.set_weight(backend, weight)
        log.info("= admin: weight %s %d", backend.name, weight)
        return self._doc(backend)

    def close(self, name, data, query):
        backend = self._backend(name)
        code, reason = close_args(data)
        spread = _number(data, "spread", 0, MAX_SPREAD, default=0)
        closing, _ = self.balancer.pool.close_sessions(backend, code, reason, spread)
        log.info("= admin: close %d session(s) of %s with %d", closing, backend.name, code)
        return {**self._doc(backend), "closing": closing}

    def _live(self, name, verb):
        backend = self._backend(name)
        if backend.state == CONNECTING:
            raise ApiError(Status.CONFLICT, f"backend {name!r} is still registering and cannot be {verb}")
        return backend

    # -- rebalancing and sessions -----------------------------------------------------------------

    def rebalance(self, data, query):
        balancing = self.balancer.settings.glb.balancing
        if balancing not in REBALANCE_POLICIES:
            raise ApiError(Status.CONFLICT, f"rebalancing {rebalance_policy_reason(balancing)}")
        rebalancer = self.balancer.rebalancer
        moves, chosen, short, _ = rebalancer.plan()
        rebalancer.trigger()
        log.info("= admin: rebalance (%d session(s) to move)", len(chosen))
        return {"moving": len(chosen), "too_young": short,
                "from": {backend.name: n for backend, n in moves.items()},
                "rebalance_closes": self.balancer.rebalance_closes}

    def reload(self, data, query):
        changes, refusal = reload.reload_and_log(self.balancer)
        if refusal is not None:
            raise ApiError(Status.CONFLICT, f"reload refused; still running the previous config: {refusal}")
        return {"reloaded": self.balancer.settings.path, "changes": changes.describe(), **changes._asdict()}

    def list_sessions(self, data, query):
        backend = None
        name = query.get("backend", [""])[0]
        if name:
            backend = self._backend(name)
        offset = _query_int(query, "offset", 0, 10 ** 9)
        limit = _query_int(query, "limit", 100, MAX_LIMIT)
        sessions = self.balancer.pool.sessions_of(backend)
        now = time.monotonic()
        return {"total": len(sessions), "offset": offset, "limit": limit,
                "sessions": [session_doc(s, now) for s in sessions[offset:offset + limit]]}

    def close_session(self, session_id, data, query):
        conn = self.balancer.connections.get(session_id)
        if conn is None or conn.kind != CLIENT or conn.session is None:
            raise ApiError(Status.NOT_FOUND, f"no client session {session_id!r}")
        code, reason = close_args(data)
        conn.close(code, reason)
        log.info("= admin: closed session %s with %d", session_id, code)
        return {"id": session_id, "code": code, "reason": reason}
