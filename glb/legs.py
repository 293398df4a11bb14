"""The two legs of a relayed session: the client's WebSocket and the backend's.

A leg knows what differs between the two sides (who masks, how long a small
frame's header is, its name in logs and events), what the closing handshake
has done on it (``LegClose``), how alive its peer is (for keep-alive), and
whether the stream glb writes to it is between two frames or messages, so
glb's own frames (keep-alive pings, ``send_to_client``) never land inside a
relayed one. Waiting for such a boundary is an event the relay engine signals
(``wrote``), not a polling loop.
"""
import time

from gevent.event import Event

from glb.closing import LegClose
from glb.errors import ConnectionClosed
from glb.frames import OP_CLOSE, encode_close_payload, encode_frame


class Leg(LegClose):
    """One side of a session (made by ``Leg.client`` or ``Leg.backend``); ``other`` is the opposite
    leg once both exist.

    Both sides are one class, told apart by what they hold, not by type: the relay's hot code then
    reads the attributes of one type only, which the interpreter specializes (two leg classes met
    alternately at the same line would undo that on every chunk).
    """

    __slots__ = ("name", "masks", "sends_masked", "header_size", "ws", "os_sock", "fast", "inbound", "other", "out_scanner", "out_in_message", "active",
                 "last_activity", "last_pong", "ping_sent", "messages", "bytes", "boundary", "watcher", "engine", "reading")

    def __init__(self, ws, name, masks):
        super().__init__()
        self.name = name  # "client" or "backend", in logs and events
        self.masks = masks  # glb masks the frames it writes to this peer
        self.sends_masked = not masks  # this peer's frames are masked
        self.header_size = 6 if self.sends_masked else 2  # header of a small (< 126 bytes) frame from this peer
        self.ws = ws
        self.os_sock = None  # the OS socket of a plain (not TLS) leg while it relays, for the engine's fast path
        self.fast = False  # the engine may relay this peer's chunks in its watcher callback
        self.inbound = None  # glb.engine.Decoding when this peer's frames are decoded, None when raw
        self.other = None
        self.out_scanner = None  # FrameScanner over the raw stream written to this leg
        self.out_in_message = False  # decoded writes: a fragmented message to this leg is under way
        # Anything but a pong received from this peer: the engine sets ``active`` per chunk (a store
        # costs less than reading the clock), the keep-alive sweep turns it into ``last_activity``.
        self.active = False
        self.last_activity = time.monotonic()
        self.last_pong = 0.0
        self.ping_sent = None  # when glb's last keep-alive ping went to this peer
        # Received from this peer where no raw scanner counts them (decoded frames, blind forwarding)
        self.messages = 0
        self.bytes = 0
        self.boundary = None  # Event for glb's own frames waiting on a boundary (made when one waits)
        self.watcher = None  # the relay engine's io watcher on this peer's socket, while it relays
        self.engine = None  # the relay engine, while it relays
        self.reading = False  # the engine still reads this peer (its direction is not done)

    @classmethod
    def client(cls, ws):
        """The downstream client: glb is the WebSocket server here."""
        return cls(ws, "client", masks=False)

    @classmethod
    def backend(cls, ws):
        """The backend: glb is the WebSocket client here, so it masks what it writes."""
        return cls(ws, "backend", masks=True)

    def __repr__(self):
        return f"<Leg {self.name} {self.ws!r}>"

    @property
    def sock(self):
        return self.ws.sock


    def stamp_activity(self, now):
        """The keep-alive sweep at ``now``: activity flagged since the last sweep counts as at ``now``."""
        if self.active:
            self.active = False
            self.last_activity = now

    def answered_since(self, moment):
        return self.last_activity >= moment or self.last_pong >= moment

    # -- the stream glb writes to this leg -----------------------------------

    def between_frames(self):
        """True when what was written to this peer ends between two frames."""
        scanner = self.out_scanner
        return scanner is None or (scanner.error is None and scanner.at_boundary)

    def between_messages(self):
        """True when what was written to this peer ends between two whole messages."""
        scanner = self.out_scanner
        if scanner is None:
            return not self.out_in_message
        return scanner.error is None and scanner.at_boundary and not scanner.in_message

    def wrote(self):
        """The engine wrote to this leg: wake whoever waits for a boundary, if one was reached."""
        boundary = self.boundary
        if boundary is not None and self.between_frames():
            self.boundary = None
            boundary.set()

    def wake(self):
        """Wake every waiter now (the session is ending, or a write of glb's own finished)."""
        boundary = self.boundary
        if boundary is not None:
            self.boundary = None
            boundary.set()

    def wait_boundary(self, timeout):
        """Block until the engine next signals a boundary on this leg, at most ``timeout`` seconds."""
        if self.boundary is None:
            self.boundary = Event()
        self.boundary.wait(timeout)

    # -- closing -------------------------------------------------------------

    def send_close(self, code, reason, mid_frame=False):
        """Write a close frame if none went yet and the stream is between frames; else end TCP."""
        if self.close_out:
            return
        self.close_out = True
        frame = encode_frame(OP_CLOSE, encode_close_payload(code, reason), mask=self.masks)
        try:
            if mid_frame or not self.between_frames():
                raise ConnectionClosed(code, "mid-frame")
            self.ws.send_raw(frame, close=(code, reason))
        except ConnectionClosed:
            self.shutdown()
        self.wake()

    def shutdown(self):
        """End the TCP connection; whoever reads it sees EOF."""
        try:
            self.sock.shutdown(2)
        except OSError:
            pass
