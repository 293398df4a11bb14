"""Bundled handler: one line per ended WebSocket and per plain HTTP request.

A client session's line carries the figures ``/glb/metrics`` counts: messages
and bytes each way (frame headers included), the close code and reason, and
who closed (``client``, ``backend`` or ``glb``). Settings: the
``[glb.handlers.access_log]`` section (``format`` text or json, ``file``, ``http``).

Text lines (fields separated by spaces; values with spaces are quoted)::

    c7 127.0.0.1:50312 client /chat?room=1 backend=one 12.503s up=25/1150B down=25/1050B code=1000 closed_by=client reason="bye"
    c2 127.0.0.1:50300 control /glb/control backend=b1 30.112s code=1000 reason=""
    127.0.0.1 GET /page?x=1 -> 200 backend=one 5120B 0.004s

JSON lines have the same fields, named in full (``type`` is ``session`` or ``http``).
"""

import json
import logging
import logging.handlers
import time

log = logging.getLogger("glb.access")


def configure(section):
    """The handlers for one Balancer, set up from ``[glb.handlers.access_log]``."""
    return AccessLog(section.format if section else "text", section.file if section else None,
                     section.http if section else True)


class AccessLog:
    def __init__(self, format="text", file=None, http=True):
        self.json = format == "json"
        self.write = log.info if file is None else _file_writer(file)
        if not http:
            self.on_http_response = None  # not a handler: no HTTP lines

    def on_client_disconnect(self, event):
        conn, session = event.connection, event.session
        figures = session.figures()
        self.session_line(conn, getattr(event.backend, "name", "-"), event.code, event.reason, event.closed_by,
                          figures)

    def on_disconnect(self, event):
        conn = event.connection
        if conn.kind != "client":  # client sessions have their line from client_disconnect
            backend = getattr(conn.session, "backend", None)  # a control channel's registered backend
            self.session_line(conn, getattr(backend, "name", None), event.code, event.reason, None, None)

    def session_line(self, conn, backend, code, reason, closed_by, figures):
        duration = round(time.monotonic() - conn.started, 3)
        peer = f"{conn.peer[0]}:{conn.peer[1]}" if conn.peer else "-"
        target = f"{conn.path}?{conn.query}" if conn.query else conn.path
        if self.json:
            record = {"type": "session", "id": conn.id, "client": peer, "kind": conn.kind, "path": target,
                      "backend": backend, "duration": duration}
            if figures is not None:
                record.update(figures.as_dict())
            record.update(code=code, reason=reason, closed_by=closed_by)
            self.write("%s", json.dumps(record, separators=(",", ":")))
            return
        parts = [conn.id, peer, conn.kind, target]
        if backend is not None:
            parts.append(f"backend={backend}")
        parts.append(f"{duration:.3f}s")
        if figures is not None:
            parts.append(f"up={figures.messages_to_backend}/{figures.bytes_to_backend}B")
            parts.append(f"down={figures.messages_to_client}/{figures.bytes_to_client}B")
        parts.append(f"code={code}")
        if closed_by is not None:
            parts.append(f"closed_by={closed_by}")
        parts.append(f"reason={json.dumps(reason or '')}")
        self.write("%s", " ".join(parts))

    def on_http_response(self, event):
        request, response = event.request, event.response
        backend = getattr(event.backend, "name", None) or "-"
        duration = round(time.monotonic() - request.started, 4)
        status = response.status if response is not None else "-"
        size = response.body_length() if response is not None else 0
        target = f"{request.path}?{request.query}" if request.query else request.path
        if self.json:
            self.write("%s", json.dumps({"type": "http", "client": request.peer_ip, "method": request.method,
                                         "path": target, "status": status, "backend": backend, "bytes": size,
                                         "duration": duration, "error": event.error}, separators=(",", ":")))
            return
        line = f"{request.peer_ip} {request.method} {target} -> {status} backend={backend} {size}B {duration:.3f}s"
        if event.error:
            line += f" error={json.dumps(event.error)}"
        self.write("%s", line)


def _file_writer(path):
    """A ``write(format, *args)`` appending bare lines to ``path``; reopened if logrotate moves it."""
    handler = logging.handlers.WatchedFileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(message)s"))
    writer = logging.Logger(f"glb.access:{path}")  # outside the logging tree: nothing propagates
    writer.addHandler(handler)
    writer.setLevel(logging.INFO)
    return writer.info
