"""Bundled handler: one log line per WebSocket connection and per HTTP request."""

import logging
import time

log = logging.getLogger("glb.access")


def on_disconnect(event):
    conn = event.connection
    duration = time.monotonic() - conn.started
    backend = getattr(conn.backend, "guid", "-") if conn.backend is not None else "-"
    log.info("%s %s %s ws %s backend=%s code=%s reason=%r %.3fs", conn.id, conn.peer_ip, conn.kind,
             conn.path, backend, event.code, event.reason, duration)


def on_http_response(event):
    req, resp = event.request, event.response
    status = resp.status if resp is not None else "-"
    backend = getattr(event, "backend", None)
    log.info("%s %s %s %s -> %s backend=%s%s", req.peer_ip, req.method, req.path,
             req.query and "?" + req.query or "", status,
             getattr(backend, "guid", "-"), f" error={event.error}" if event.error else "")
