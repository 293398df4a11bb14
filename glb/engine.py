"""The relay engine: moves a session's bytes between its two legs and applies the closing handshake.

Each direction reads one leg and writes the other, in one of two modes chosen
per direction when the session starts:

    raw      no handler needs the payload: received chunks are forwarded as they
             are (client frames stay masked, backend frames unmasked); a
             FrameScanner follows frame boundaries to see close frames and
             enforce max_message_size. No unmasking, decoding or copying.
    decoded  a handler listens to raw_message / client_message / client_binary /
             client_fragmented: frames are read, events fired, and what is left
             is re-encoded for the other leg.

Where it runs: every session the same way, with no greenlet parked while it
is idle. One persistent io watcher per socket (and no other: a plain socket
is held as a ``glb.lean_socket.LeanSocket``) calls ``on_readable`` in the
hub. For a raw direction between plain sockets it reads the chunk and, in the
common case (no close, ping or violation in it, the other socket takes it
whole), forwards it right there without switching greenlets. Anything else (a
decoded direction, a TLS leg, a send that would block, a notable frame, EOF,
a linger timer) becomes a job for a shared worker greenlet, which may block
and fire handlers; while it runs, further events for that session wait their
turn, so one slow peer holds only its own session. A decoded direction feeds
what the job read to the leg's socket-free frame parser (``WebSocket.feed`` /
``take_frame``); a TLS leg is read until its SSL object holds nothing more
(``pending()``), since the kernel's readiness cannot show those bytes.

What a close means for each leg is decided by ``glb.closing.ClosingHandshake``;
this module only carries it out.
"""
import logging
import time

import gevent
from greenlet import getcurrent, greenlet

from glb.errors import CloseCode, ConnectionClosed, MessageTooBig
from glb.frames import OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, FrameScanner, frame_size
from glb.websocket import NEED_MORE, is_tls

log = logging.getLogger("glb.relay")

RECV_SIZE = 65536
# What the fast path reads into. It runs in the hub and never switches before it is done with
# the chunk, so one buffer serves every session (no 64 KiB allocation per chunk).
_CHUNK = bytearray(RECV_SIZE)
_CHUNK_VIEW = memoryview(_CHUNK)
NOT_SCANNED = object()  # a job's chunk the scanner has not seen yet
START = "start"  # the first job: what was read with the handshakes
LINGER = "linger"  # timer job: the closing handshake took too long, end both legs
GIVE_UP = "give up"  # timer job: the legs did not end after that either


_NOTHING_READ: dict = {}  # never written to


class RelayEngine:
    """Moves bytes for one ``ClientSession`` until both directions are done."""

    __slots__ = ("session", "conn", "bus", "closing", "client", "backend", "close_timeout",
                 "max_message_size", "_busy", "_waiting", "_timer", "_initial")

    def __init__(self, session, max_message_size, close_timeout):
        self.session = session
        self.conn = session.conn
        self.bus = session.bus
        self.closing = session.closing
        self.client = session.client
        self.backend = session.backend_leg
        self.max_message_size = max_message_size
        self.close_timeout = close_timeout
        self._busy = False  # a job is running (on a worker, or the first one in the session greenlet)
        self._waiting = None  # a list of the jobs that came while it ran (made when one does)
        self._timer = None  # linger / give-up timer once one direction is done
        self._initial: dict = {}  # raw direction -> bytes read with the handshake, for the first job

    def run(self):
        """Start relaying on io watchers; ``session.relayed()`` is called once when both directions are done.

        The bytes read with the handshakes are relayed here first, in the caller's greenlet.
        """
        loop = gevent.get_hub().loop
        for src in (self.client, self.backend):
            src.ws.shed_watchers()  # a plain socket keeps no watcher of gevent's: the engine's own reads it
            src.os_sock = None if is_tls(src.sock) else src.sock._sock
            initial = self._raw_initial(src)
            if initial is None:
                src.inbound = Decoding(self.bus, from_client=src is self.client)
            else:
                self._initial[src] = initial
                self._scan_into(src.other)
        for src in (self.client, self.backend):
            dst = src.other
            src.fast = src.inbound is None and src.os_sock is not None and dst.os_sock is not None
            src.reading = True
            src.engine = self
            src.watcher = loop.io(src.sock.fileno(), 1)
        self._busy = True
        self._step(START)

    def _reading(self):
        """The legs whose direction is still read."""
        return [leg for leg in (self.client, self.backend) if leg.reading]

    def _raw_initial(self, src):
        """Bytes already read from ``src`` if its direction can run raw; None if it must be decoded."""
        bus = self.bus
        decoded = bus.raw_message.receivers or (src is self.client and (
            bus.client_message.receivers or bus.client_binary.receivers or bus.client_fragmented.receivers))
        if decoded:
            return None
        try:
            return src.ws.take_unread()
        except ValueError:  # a frame already half-parsed: this direction stays decoded
            return None

    def _scan_into(self, dst):
        """Follow the raw stream written to ``dst`` with a scanner of its own."""
        if dst.out_scanner is None:
            dst.out_scanner = FrameScanner(self.max_message_size, expect_masked=dst.other.sends_masked)

    # -- events and jobs ----------------------------------------------------------

    def _on_timer(self, job):
        if self._busy:
            self._wait_turn(job)
            return
        self._busy = True
        run_on_worker(self._step, job)

    def _wait_turn(self, job):
        if self._waiting is None:
            self._waiting = []
        self._waiting.append(job)

    def _step(self, job):
        """Run ``job``, then whatever queued meanwhile; the watchers resume after.

        They are stopped meanwhile: a socket closed by the WebSocket layer during the
        job is then closed at once (gevent defers closing an fd that a watcher is on).
        """
        for leg in (self.client, self.backend):
            if leg.watcher is not None:
                leg.watcher.stop()
        try:
            self._handle(job)
            while self.client.reading or self.backend.reading:
                if self._waiting:
                    self._handle(self._waiting.pop(0))
                    continue
                closed = [leg for leg in self._reading() if leg.ws.socket_closed]
                if not closed:
                    break
                for leg in closed:  # closed by the WebSocket layer: reading it ends the direction
                    self._handle(leg)
        except Exception as exc:  # a bug here must end this session only
            log.exception("! %s relay failed", self.conn.id)
            self.bus.fire(self.bus.exception, connection=self.conn, exception=exc)
            self.session.close(CloseCode.INTERNAL_ERROR, "internal error")
            for leg in (self.client, self.backend):
                leg.shutdown()
        finally:
            self._busy = False
            self._waiting = None
            reading = self._reading()
            for leg in reading:
                if leg.watcher is not None and not leg.watcher.active:
                    leg.watcher.start(on_readable, leg)
            if not reading:
                self._stop_watching()

    def _handle(self, job):
        if job is START:
            for src in (self.client, self.backend):
                if src.reading and not self._receive(src, self._initial.pop(src, None) or None):
                    self._direction_done(src)
            self._initial = _NOTHING_READ  # shared: one dict less per session
            return
        if job is LINGER:
            for leg in self._reading():
                leg.shutdown()
            self._start_timer(1.0, GIVE_UP)
            return
        if job is GIVE_UP:
            self.client.reading = self.backend.reading = False
            return
        if isinstance(job, tuple):  # a chunk the fast path read
            src, data, notes = job
            if src.reading and not self._chunk(src, data, notes):
                self._direction_done(src)
            return
        src = job
        while src.reading:
            try:
                data = src.sock.recv(RECV_SIZE)
            except OSError:
                data = b""
            if not self._receive(src, data):
                self._direction_done(src)
            elif not (src.os_sock is None and src.sock.pending()):
                return  # a TLS leg's SSL object may hold bytes the kernel no longer shows

    def _receive(self, src, data):
        """Relay what was read from ``src`` (None: only what is buffered); False ends the direction."""
        if src.inbound is not None:
            return self._decoded(src, data)
        if data is None:
            return True
        return self._chunk(src, data, NOT_SCANNED)

    def _direction_done(self, src):
        src.reading = False
        if src.watcher is not None:
            src.watcher.stop()
        if (self.client.reading or self.backend.reading) and self._timer is None:
            self._start_timer(self.close_timeout, LINGER)

    def _start_timer(self, seconds, job):
        self._stop_timer()
        self._timer = gevent.get_hub().loop.timer(seconds)
        self._timer.start(self._on_timer, job)

    def _stop_timer(self):
        if self._timer is not None:
            self._timer.stop()
            self._timer.close()
            self._timer = None

    def _stop_watching(self):
        if self.client.watcher is None:  # stopped already: the session has been told
            return
        for leg in (self.client, self.backend):
            if leg.watcher is not None:
                leg.watcher.stop()
                leg.watcher.close()
                leg.watcher = None
        self._stop_timer()
        self.session.relayed()

    # -- raw directions ----------------------------------------------------------

    def _chunk(self, src, data, notes):
        """Forward one chunk read from ``src`` (``notes`` from the scanner, if it saw it); False ends it."""
        dst = src.other
        if not data:
            self._eof(src)
            return False
        try:
            if notes is NOT_SCANNED:
                return self._forward_chunk(src, dst, data)
            if notes is None:
                dst.ws.send_raw(data)
                dst.wrote()
                return True
            self._note_liveness(src, data, notes)
            return self._forward_notable(src, dst, data, notes)
        except ConnectionClosed:
            self._lost(dst)  # the other leg is gone or did not read in time
            return False

    def _forward_chunk(self, src, dst, data):
        """Scan and forward one received chunk as it is; False ends the direction."""
        scanner = dst.out_scanner
        if scanner.error is not None:  # the far peer judges what glb could not follow
            src.bytes += len(data)
            src.active = True
            dst.ws.send_raw(data)
        elif src.close_in is None:  # after its close frame, a peer's bytes are ignored
            notes = scanner.feed(data)
            if notes is None:
                src.active = True
                dst.ws.send_raw(data)
            else:
                self._note_liveness(src, data, notes)
                return self._forward_notable(src, dst, data, notes)
        dst.wrote()
        return True

    @staticmethod
    def _note_liveness(src, data, notes):
        if _only_pongs(notes, len(data), src.header_size):
            src.last_pong = time.monotonic()  # liveness, not activity
        else:
            src.active = True

    def _forward_notable(self, src, dst, data, notes):
        """Forward a chunk holding close/ping/pong frames or a violation; False ends the direction."""
        for note in notes:
            if hasattr(note, "error"):  # a Violation
                if not isinstance(note.error, MessageTooBig):
                    # A protocol error: the far peer fails the connection as it would have
                    # without glb (same close code, after the messages before it). From here
                    # on this direction is forwarded blind, and glb injects nothing into it.
                    self.session.balancer.report_error(self.conn, f"{src.name} broke the protocol "
                                      f"({note.error.code} {note.error.reason}); "
                                      f"passed on for the {dst.name} to judge")
                    dst.ws.send_raw(data)
                    return True
                if note.offset > 0:
                    dst.ws.send_raw(data[:note.offset])
                self._violation(src, note.error, mid_frame=note.offset < 0)
                return False
            if note.opcode == OP_CLOSE:
                if dst.close_out:  # glb already closed that leg: this close answers glb's, not forwarded
                    start = note.end - len(note.payload) - src.header_size
                    if start > 0:
                        dst.ws.send_raw(data[:start])
                else:
                    dst.ws.send_raw(data[:note.end], close=(note.code, note.reason))
                self._close_passed(src, note.code, note.reason)
                return True  # whatever follows a close frame is ignored (RFC 6455 §5.5.1)
        dst.ws.send_raw(data)
        dst.wrote()
        return True

    # -- decoded directions ------------------------------------------------------

    def _decoded(self, src, data):
        """Whole frames from ``src`` (``data`` just read; None: only what is buffered); False ends it."""
        ws = src.ws
        if data is not None:
            if data:
                ws.feed(data)
            else:
                ws.peer_ended()
        dst = src.other
        try:
            while True:
                frame = ws.take_frame()
                if frame is NEED_MORE:
                    return True
                if frame is None:
                    break
                self._decoded_frame(src, dst, frame)
        except ConnectionClosed:
            self._lost(dst)
            return False
        if ws.closed_by == "error" and ws.close_code != CloseCode.ABNORMAL:
            self._violation(src, _Broken(ws.close_code, ws.close_reason), told=True)
        elif src.close_in is None:
            self._eof(src)
        return False

    def _decoded_frame(self, src, dst, frame):
        """One frame from ``src``: fire the hot-path events, re-encode what is left for ``dst``."""
        op = frame.opcode
        src.bytes += frame_size(len(frame.payload), src.sends_masked)
        if frame.fin and op < OP_CLOSE:
            src.messages += 1
        if op != OP_PONG:
            src.active = True
        if op == OP_CLOSE:
            code, reason = src.ws.close_code, src.ws.close_reason
            src.close_out = True  # the WebSocket layer has echoed it
            dst.send_close(code, reason)  # no-op if glb closed that leg already
            self._close_passed(src, code, reason)
            return
        if op == OP_PING or op == OP_PONG:
            if op == OP_PONG:
                src.last_pong = time.monotonic()
            self._send_frame(dst, op, frame.payload, True)
            return
        decoding = src.inbound
        if op != OP_CONTINUATION:
            decoding.opcode = op
        whole = decoding.assemble or (decoding.text_whole and decoding.opcode == OP_TEXT)
        if not whole:
            if decoding.fragments:
                bus = self.bus
                event = bus.fire(bus.client_fragmented, connection=self.conn, session=self.session,
                                 data=frame.payload, opcode=op, continuation=op == OP_CONTINUATION,
                                 final=frame.fin)
                if event.handled:
                    return
            self._send_frame(dst, op, frame.payload, frame.fin)
            return
        decoding.parts.append(frame.payload)
        if frame.fin:
            payload = b"".join(decoding.parts)
            decoding.parts.clear()
            self._deliver(src, dst, decoding.opcode, payload)

    @staticmethod
    def _send_frame(dst, opcode, payload, fin):
        """One decoded frame to ``dst``, keeping track of a fragmented message under way there."""
        if opcode < OP_CLOSE:
            dst.out_in_message = not fin
        dst.ws.send_frame(opcode, payload, fin=fin)
        dst.wrote()

    def _deliver(self, src, dst, opcode, payload):
        """One whole message from ``src``: events first, then (unless dropped) to ``dst``."""
        bus = self.bus
        from_client = src is self.client
        if opcode == OP_TEXT:
            text = payload.decode("utf-8")
            if bus.raw_message.receivers:
                event = bus.fire(bus.raw_message, connection=self.conn, text=text, source=src.name)
                if event.handled:
                    return
            if from_client and bus.client_message.receivers:
                event = bus.fire(bus.client_message, connection=self.conn, session=self.session, text=text)
                if event.handled:
                    return
                text = event.text
            dst.ws.send(text)
        else:
            if from_client and bus.client_binary.receivers:
                event = bus.fire(bus.client_binary, connection=self.conn, session=self.session, data=payload)
                if event.handled:
                    return
                payload = event.data
            dst.ws.send(bytes(payload), binary=True)
        dst.wrote()

    # -- the closing handshake, carried out -----------------------------------

    def _close_passed(self, src, code, reason):
        """A close frame came from ``src`` (and went to the other leg unless glb had closed it)."""
        self.closing.peer_closed(src, code, reason)
        if self.client.complete:
            self.client.shutdown()  # glb is the server on this leg: it closes TCP first

    def _eof(self, src):
        """``src`` ended its TCP connection."""
        send_closes(self.closing.peer_vanished(src))

    def _lost(self, dst):
        """Writing to ``dst`` failed: it is gone, or did not read within send_timeout."""
        send_closes(self.closing.write_failed(dst, dst.ws.close_reason or "connection lost"))
        dst.shutdown()

    def _violation(self, src, error, mid_frame=False, told=False):
        """``src`` broke the protocol (or a limit): tell it why, and close the other leg."""
        self.session.balancer.report_error(self.conn, f"{src.name} {error.code} {error.reason}")
        for leg, code, reason in self.closing.violated(src, error.code, error.reason, told=told):
            leg.send_close(code, reason, mid_frame=mid_frame and leg is not src)
        src.shutdown()

    def end_now(self):
        """Shutdown could not wait: end both legs; the relay then finishes by itself."""
        for leg in (self.client, self.backend):
            leg.shutdown()


def on_readable(src):
    """The io watcher callback for leg ``src``, in the hub (a plain function: no bound method per leg).

    Forwards the common chunk right here; hands anything else to a worker as a job.
    """
    engine = src.engine
    if engine._busy:  # the job in progress (as it blocks) stopped the watchers; it reads after
        engine._wait_turn(src)
        return
    job = src
    if src.fast:
        try:
            # a non-blocking OS socket: never waits, never switches (EBADF once closed)
            size = src.os_sock.recv_into(_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            size = 0
        data = _CHUNK_VIEW[:size]  # valid until this callback returns: a job gets a copy
        notes = NOT_SCANNED
        if size and src.close_in is None:
            dst = src.other
            scanner = dst.out_scanner
            if scanner.error is None:
                notes = scanner.feed(data)
                if notes is None:
                    src.active = True
                    sent = dst.ws.send_now(data)
                    if sent == size:
                        if dst.boundary is not None:  # glb's own frame waits for a boundary
                            dst.wrote()
                        return
                    data = data[sent:]
        job = (src, bytes(data), notes)
    engine._busy = True
    run_on_worker(engine._step, job)


def send_closes(owed):
    """Send the close frames the closing handshake says are owed."""
    for leg, code, reason in owed:
        leg.send_close(code, reason)


def _only_pongs(notes, size, header_size):
    """True when a chunk is nothing but whole pong frames (keep-alive answers)."""
    position = 0
    for note in notes:
        if getattr(note, "opcode", None) != OP_PONG or note.end - len(note.payload) - header_size != position:
            return False
        position = note.end
    return position == size


# Greenlets that run relay jobs, shared by every session. A new greenlet per job
# would cost a fresh Python data stack (an mmap and munmap) each time; a parked
# worker is only switched into. At most IDLE_WORKERS wait; more are made on demand
# (while jobs block in sends) and end when not needed.
IDLE_WORKERS = 64
_idle_workers: list[greenlet] = []


def run_on_worker(func, arg):
    """Run ``func(arg)`` in a worker greenlet now; called from the hub (a watcher callback)."""
    worker = _idle_workers.pop() if _idle_workers else greenlet(_worker_loop, gevent.get_hub())
    worker.switch(func, arg)


def _worker_loop(func, arg):
    hub = gevent.get_hub()
    while True:
        try:
            func(arg)
        except Exception:  # jobs contain their own errors; this is the last guard for the hub
            log.exception("! relay job failed")
        if len(_idle_workers) >= IDLE_WORKERS:
            return
        _idle_workers.append(getcurrent())
        func, arg = hub.switch()


class Decoding:
    """What a decoded direction needs across frames: which events listen, and a message being assembled."""

    __slots__ = ("assemble", "text_whole", "fragments", "parts", "opcode")

    def __init__(self, bus, from_client):
        self.assemble = from_client and bool(bus.client_message.receivers or bus.client_binary.receivers)
        self.text_whole = bool(bus.raw_message.receivers)  # raw_message: whole text messages, both ways
        self.fragments = from_client and bool(bus.client_fragmented.receivers)
        self.parts = []
        self.opcode = None  # of the data message under way


class _Broken:
    """A protocol error the WebSocket layer already answered (decoded pumps)."""

    def __init__(self, code, reason):
        self.code, self.reason = code, reason
