"""``GET <prefix>status``: what glb holds right now, as JSON, for operators and health checks.

Only peers that may open a control channel (``[backends] allow`` or the bearer
token) see it: it names backends' internal addresses.
"""

import os

from glb import __version__
from glb.control import authorize, json_response
from glb.errors import Status


class StatusEndpoint:
    """WSGI app: backends with their state and load, open connections by kind, listeners."""

    def __init__(self, balancer):
        self.balancer = balancer

    def __call__(self, environ, start_response):
        refused = refuse_operator_read(self.balancer, environ, start_response)
        if refused is not None:
            return refused
        return json_response(start_response, Status.OK, snapshot(self.balancer))


def operator_refusal(balancer, environ):
    """None when the peer may read glb's operator views (status, metrics, the status page), else a Rejection.

    The rule is the control channel's: a peer inside ``[backends] allow``, or the bearer token.
    """
    return authorize(balancer.settings.backends, environ.get("REMOTE_ADDR", ""), environ.get("HTTP_AUTHORIZATION"))


def refuse_operator_read(balancer, environ, start_response):
    """The answer for a peer that may not read operator views, or for a method but GET or HEAD; else None.

    A HEAD is answered like a GET: the HTTP server sends the head without the body.
    """
    refusal = operator_refusal(balancer, environ)
    if refusal is not None:
        start_response(refusal.status, refusal.headers)
        return [refusal.body]
    if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
        return json_response(start_response, Status.METHOD_NOT_ALLOWED, {"error": "use GET"},
                             [("Allow", "GET, HEAD")])
    return None


def snapshot(balancer):
    """The status document (plain data, no sockets touched)."""
    connections = {"client": 0, "control": 0, "own": 0}
    for conn in list(balancer.connections.values()):
        connections[conn.kind] = connections.get(conn.kind, 0) + 1
    candidates = set(id(backend) for backend in balancer.registry.candidates())
    return {
        "version": __version__,
        "pid": os.getpid(),  # after an upgrade (SIGUSR2), which process answered
        "stopping": balancer.stopping,
        "balancing": balancer.settings.glb.balancing,
        "listeners": [f"http://{host}:{port}" for host, port in balancer.addresses]
        + [f"https://{host}:{port}" for host, port in getattr(balancer, "tls_addresses", [])],
        "connections": connections,
        "rebalance_closes": balancer.rebalance_closes,
        "backends": [{
            "guid": backend.guid,
            "name": backend.name,
            "state": backend.state,
            "static": backend.static,
            "accepts_clients": id(backend) in candidates,
            "bindings": [{"host": b.host, "port": b.port, "ssl": b.ssl} for b in backend.bindings],
            "health": backend.health,
            "weight": backend.weight,
            "max_clients": backend.max_clients,
            "relayed": backend.relayed,
            "reported_clients": len(backend.reported_clients),
        } for backend in balancer.registry.all()],
    }
