"""Backends for relay tests: real WebSocket servers on 127.0.0.1 whose behaviour a test scripts."""

import contextlib

import gevent
import gevent.queue

from glb import handshake
from glb.demo_backend import DemoBackend
from glb.server import accept_websocket


class ScriptedBackend(DemoBackend):
    """A backend whose per-connection behaviour is ``serve(ws, environ)``; default: the demo echo.

    ``refuse=(status, body)`` answers every upgrade with that HTTP status instead.
    ``environs`` queues every upgrade request's environ, ``sockets`` every server-side WebSocket.
    """

    def __init__(self, serve=None, refuse=None, subprotocol=None, **kwargs):
        super().__init__(**kwargs)
        self.script = serve
        self.refuse = refuse
        self.subprotocol = subprotocol
        self.environs = gevent.queue.Queue()
        self.sockets = []

    def handle_upgrade(self, handler):
        environ = dict(handler.environ)
        self.environs.put(environ)
        if self.refuse is not None:
            status, body = self.refuse
            handler.close_connection = True
            handler.start_response(handshake.status_line(status),
                                   [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
            handler.write(body)
            return
        if self.script is None:
            return super().handle_upgrade(handler)
        extra = [("Sec-WebSocket-Protocol", self.subprotocol)] if self.subprotocol else []
        ws, detached = accept_websocket(handler, extra, max_message_size=self.max_message_size)
        self.sockets.append(ws)
        if detached:
            self.sessions.spawn(self.script, ws, environ)
        else:
            self.script(ws, environ)

    def static_section(self):
        """The ``[backend:NAME]`` settings that put this backend in a glb's pool."""
        return {"url": f"ws://127.0.0.1:{self.port}"}


@contextlib.contextmanager
def started(*backends):
    for backend in backends:
        backend.start()
    try:
        yield backends
    finally:
        for backend in backends:
            backend.stop(timeout=1)


def recording_frames(frames):
    """A serve function that puts every frame it receives on ``frames`` as (opcode, fin, payload)."""
    def serve(ws, environ):
        while True:
            frame = ws.receive_frame()
            if frame is None:
                return
            frames.put((frame.opcode, frame.fin, frame.payload))
    return serve


def recording_close(closes, with_reason=True):
    """A serve function that reads until the close and puts (code, reason), or the code, on ``closes``."""
    def serve(ws, environ):
        while ws.receive() is not None:
            pass
        closes.put((ws.close_code, ws.close_reason) if with_reason else ws.close_code)
    return serve
