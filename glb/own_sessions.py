"""Own sessions: WebSockets glb terminates itself, starting with the ``echo`` endpoint.

The echo endpoint sends every message back unchanged and echoes the close code
and reason, so operators can check a running glb and the WebSocket layer is
testable (Autobahn included) without any backend.
"""

from glb.connection import OWN
from glb.frames import OP_BINARY, OP_CONTINUATION, OP_TEXT


class OwnSession:
    """Base for own sessions: fires ``raw_message``, ``fragmented``, ``message`` and ``binary``."""

    kind = OWN
    response_headers = ()
    raw_source = "client"

    def __init__(self, balancer, conn):
        self.balancer = balancer
        self.bus = balancer.bus
        self.conn = conn

    @classmethod
    def prepare(cls, balancer, conn, environ):
        return cls(balancer, conn)

    def abandon(self, reason):
        """The 101 could not be written; nothing was set up, so nothing to undo."""

    def send(self, message):
        self.conn.websocket.send(message)
        return True

    def close(self, code, reason):
        self.conn.websocket.close(code, reason)

    @property
    def close_status(self):
        ws = self.conn.websocket
        return ws.close_code, ws.close_reason

    def start(self):
        """Run in this greenlet until the session is over, then tell the balancer (once)."""
        try:
            self.run()
        except Exception as exc:
            self.balancer.session_failed(self.conn, exc)
        finally:
            self.balancer.end_session(self.conn, self)

    def run(self):
        ws = self.conn.websocket
        while True:
            if self.bus.fragmented.receivers:
                message = self._receive_reporting_fragments(ws)
            else:
                message = ws.receive()
            if message is None:
                break
            self.on_message(message)
        if ws.close_code not in (1000, 1001, 1005) and ws.closed_by == "error":
            self.balancer.report_error(self.conn, f"connection ended: {ws.close_code} {ws.close_reason}")

    def _receive_reporting_fragments(self, ws):
        """Like ``receive()``, firing ``fragmented`` for every data frame on the way."""
        parts, opcode = [], None
        while True:
            frame = ws.receive_frame()
            if frame is None:
                return None
            if frame.opcode not in (OP_TEXT, OP_BINARY, OP_CONTINUATION):
                continue
            if frame.opcode != OP_CONTINUATION:
                opcode = frame.opcode
            self.bus.fire(self.bus.fragmented, connection=self.conn, data=frame.payload,
                          opcode=frame.opcode, continuation=frame.opcode == OP_CONTINUATION,
                          final=frame.fin)
            parts.append(frame.payload)
            if frame.fin:
                data = b"".join(parts)
                return data.decode("utf-8") if opcode == OP_TEXT else data

    def on_message(self, message):
        """Fire the events for one complete message; returns True if a handler consumed it."""
        if isinstance(message, str) and self.raw_message_handled(message):
            return True
        return self.message_handled(message)

    def raw_message_handled(self, text):
        """Fire ``raw_message`` (if anyone listens); True if a handler consumed the frame."""
        bus = self.bus
        return bool(bus.raw_message.receivers) and bus.fire(
            bus.raw_message, connection=self.conn, text=text, source=self.raw_source).handled

    def message_handled(self, message):
        """Fire ``message`` for text or ``binary`` for bytes; True if a handler marked it handled."""
        bus = self.bus
        if isinstance(message, str):
            return bool(bus.message.receivers) and bus.fire(
                bus.message, connection=self.conn, text=message).handled
        return bool(bus.binary.receivers) and bus.fire(
            bus.binary, connection=self.conn, data=message).handled


class EchoSession(OwnSession):
    """``<prefix>echo``: every message back unchanged; close code and reason echoed."""

    def on_message(self, message):
        if not super().on_message(message):
            self.conn.websocket.send(message)
