"""The backend agent: lets any gevent Python WebSocket server join one or more glb instances.

::

    agent = Agent(["ws://10.0.0.1:8080", "ws://10.0.0.2:8080"], bindings=[("10.0.0.5", 9001, False)])
    agent.start()
    ...
    agent.client_connected(conn_id, ip=peer_ip)      # a client connected to this server directly
    agent.client_disconnected(conn_id)               # ... and left
    ...
    agent.stop()                                     # closes every control channel with 1000

One ``Link`` per glb instance owns a greenlet that connects the control channel
(docs/protocol.md), registers (server data, bindings, the current client records,
ready), reports client changes, hands envelopes from glb to ``on_envelope``,
and reconnects with exponential back-off and jitter whenever the channel
ends, repeating the whole registration. Every greenlet lives in the agent's
``Group``, so ``stop()`` can wait for them and kill what is left.

Ordering: each link writes from one queue in one greenlet, and a new channel's
queue is filled with the registration (client snapshot included) in the same
step that makes it visible to ``client_connected``/``client_disconnected``, so
a client record is never sent before server data or overtaken by an older one.

Broadcasts (docs/protocol.md, "Broadcast across backends")::

    agent = Agent(urls, ..., on_envelope=deliver)
    agent.broadcast("price 42", channel="prices")    # to the clients of every backend, this one included

    def deliver(envelope):                           # every envelope glb relays to this backend
        for conn_id in agent.recipients(envelope):   # this backend's clients it is meant for
            my_websockets[conn_id].send(envelope.payload)

Each glb relays an envelope to the backends it holds, in the order the sender sent its
envelopes; no glb need hold every backend (one restarted and is refilling, or a backend's
channel to one glb dropped). Each glb tells the agent which backends it relays to (glb's
``glb@lb@ready`` extension, which the agent subscribes to in its server data), so
``broadcast`` covers every backend a registered glb holds, each once: the envelope goes
unchanged to the glb holding the most (among equals, the one registered longest), and to
each other glb holding backends not covered yet behind a route record
(``glb@broadcast@to``) naming just those. Until every glb it is registered with has said
what it holds (the moment between ready and the answer; a glb without the extension never
does), the agent sends the whole envelope to the glb it has been registered with longest:
after a restart the glbs that stayed up have held everyone all along. Delivery is at most once: an envelope sent while no glb is connected,
or lost with a dropped channel, is gone; for about 0.1 s after the pool changes (until
glb's push arrives) a backend that just joined a glb may get an envelope twice, and one
that just left it may miss one.
"""

import logging
import random
import ssl
import time
import uuid
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit, urlunsplit

import gevent
from gevent.event import Event
from gevent.pool import Group
from gevent.queue import Queue

from glb import control_records
from glb.control_records import READY_SET, Binding, BroadcastRoute, ClientRecord, RecordError, ServerData
from glb.errors import CloseCode, ConnectionClosed, HandshakeFailed
from glb.frames import OP_BINARY, OP_CONTINUATION, OP_TEXT
from glb.websocket import connect

log = logging.getLogger("glb.agent")

DEFAULT_CONTROL_PATH = "/glb/control"
_SCHEMES = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}

# Queue items besides text/bytes to send.
_END = object()    # the channel's reader has finished: the channel is gone
_CLOSE = object()  # stop(): close the channel with 1000


def select_clients(envelope, clients):
    """The ids in ``clients`` (id -> ClientRecord, or anything with ``channel`` and ``protocol``)
    that ``envelope`` is meant for, in the mapping's order.

    Text envelope: ``guid`` set means that one connection only; ``include`` set keeps only
    those ids; ``exclude`` drops ids; ``channel`` / ``protocol`` set keep only clients with
    exactly that channel / protocol. Binary envelope: ``target`` set means that one
    connection only, else everyone.
    """
    if isinstance(envelope, control_records.BinaryEnvelope):
        if envelope.target:
            return [envelope.target] if envelope.target in clients else []
        return list(clients)
    if envelope.guid:
        candidates = [envelope.guid] if envelope.guid in clients else []
    else:
        candidates = list(clients)
    include = envelope.include_ids
    if include:
        include = frozenset(include)
        candidates = [conn_id for conn_id in candidates if conn_id in include]
    exclude = envelope.exclude_ids
    if exclude:
        exclude = frozenset(exclude)
        candidates = [conn_id for conn_id in candidates if conn_id not in exclude]
    if envelope.channel:
        candidates = [c for c in candidates if clients[c].channel == envelope.channel]
    if envelope.protocol:
        candidates = [c for c in candidates if clients[c].protocol == envelope.protocol]
    return candidates


def encode_envelope(message, guid="", channel="", protocol="", include="", exclude=""):
    """The envelope for ``message``: str as a text envelope, bytes as a binary one.

    A binary envelope has room for one target id (``guid``) only; RecordError if filters are given.
    """
    if isinstance(message, str):
        return control_records.encode_text_envelope(message, guid, channel, protocol, include, exclude)
    if channel or protocol or include or exclude:
        raise RecordError("binary envelope: only a target id fits; channel, protocol, include "
                          "and exclude are text only")
    return control_records.encode_binary_envelope(guid, message)


def control_url(url):
    """The control-channel URL for a glb address: ``ws://host:port`` gets ``/glb/control``.

    ``http(s)://`` becomes ``ws(s)://``; a URL with a path (``/sgc@load_balancer_client``,
    or a glb with another prefix) is kept as given. Raises ValueError for anything else.
    """
    parts = urlsplit(url)
    scheme = _SCHEMES.get(parts.scheme)
    if scheme is None or not parts.hostname:
        raise ValueError(f"not a glb address (ws://host:port or a full ws:// URL): {url!r}")
    path = parts.path if parts.path not in ("", "/") else DEFAULT_CONTROL_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class Backoff:
    """Reconnect delays: ``base`` doubling per failure up to ``cap``, times a random 1 ± ``jitter``."""

    def __init__(self, base=0.1, cap=5.0, jitter=0.5, rng=None):
        self.base, self.cap, self.jitter = base, cap, jitter
        self.rng = rng or random.Random()
        self.failures = 0

    def next_delay(self):
        delay = min(self.cap, self.base * (2 ** min(self.failures, 32)))
        self.failures += 1
        return delay * self.rng.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self):
        self.failures = 0


class Link:
    """The agent's connection to one glb instance; ``run`` is its greenlet."""

    def __init__(self, agent, url):
        self.agent = agent
        self.url = control_url(url)
        self.backoff = Backoff(agent.backoff_base, agent.backoff_cap)
        self.outbox = None        # the current channel's send queue; None while not connected
        self.websocket = None
        self.registered = False   # ready was sent on the current channel
        self.registered_at = None  # monotonic time ready was sent on the current channel
        self.registrations = 0    # channels that got as far as ready
        self.last_error = None    # why the last attempt or channel ended
        self.last_close_code = None
        self.last_heard = 0.0       # monotonic time of the last frame from glb
        self.ready_backends: set[str] | None = None  # guids glb relays envelopes to (glb@lb@ready); None: not told

    def __repr__(self):
        state = "registered" if self.registered else "connected" if self.outbox else "down"
        return f"<Link {self.url} {state}>"

    def put(self, item):
        """Queue ``item`` for the current channel, if there is one."""
        outbox = self.outbox
        if outbox is not None:
            outbox.put(item)

    def run(self):
        stopping = self.agent.stopping
        while not stopping.is_set():
            if self._channel():
                self.backoff.reset()
            if stopping.is_set():
                break
            delay = self.backoff.next_delay()
            log.info("= %s reconnecting in %.2f s (%s)", self.url, delay, self.last_error)
            stopping.wait(delay)

    def _channel(self):
        """Connect, register and serve one channel; True if it registered and was not refused."""
        agent = self.agent
        try:
            ws, _, _ = connect(self.url, headers=agent.handshake_headers, timeout=agent.connect_timeout,
                               ssl_context=agent.ssl_context)
        except HandshakeFailed as exc:
            self.last_error = f"cannot open control channel: {exc}"
            log.warning("! %s %s", self.url, self.last_error)
            return False
        if agent.stopping.is_set():
            ws.close(CloseCode.NORMAL, "agent stopping")
            return False
        log.info("= %s control channel open", self.url)
        outbox = Queue()
        for text in agent.registration_texts():  # the snapshot and the queue become visible together
            outbox.put(text)
        self.websocket, self.outbox = ws, outbox
        reader = agent.group.spawn(self._read, ws, outbox)
        heartbeat = agent.group.spawn(self._heartbeat, ws) if agent.heartbeat else None
        ready_sent = False
        try:
            while True:
                item = outbox.get()
                if item is _END:
                    break
                if item is _CLOSE:
                    ws.close(CloseCode.NORMAL, "agent stopping", wait=agent.close_wait)
                    break
                ws.send(item)
                if item == control_records.READY:
                    ready_sent = self.registered = True
                    self.registered_at = time.monotonic()
                    self.registrations += 1
                    log.info("> %s registered as %s", self.url, agent.guid)
        except ConnectionClosed:
            pass
        finally:
            self.outbox = self.websocket = None
            self.registered = False
            self.registered_at = None
            self.ready_backends = None
            if not ws.closed:  # killed: no time for a closing handshake
                ws.abort()
            if heartbeat is not None:
                heartbeat.kill()
            reader.join(timeout=ws.close_timeout)
            reader.kill()
        self.last_close_code = ws.close_code
        self.last_error = f"control channel closed by {ws.closed_by}: {ws.close_code} {ws.close_reason}"
        log.info("= %s %s", self.url, self.last_error)
        # A refusal (1008: duplicate guid, bad binding) must not turn into a tight reconnect loop.
        return ready_sent and ws.close_code != CloseCode.POLICY_VIOLATION

    def _read(self, ws, outbox):
        """Hand every message from glb to the agent; any frame (a pong too) proves glb is alive."""
        parts: list = []  # str fragments of a text message, bytes of a binary one
        is_text = False
        try:
            while True:
                frame = ws.receive_frame()
                if frame is None:
                    break
                self.last_heard = time.monotonic()
                if frame.opcode in (OP_TEXT, OP_BINARY):
                    parts, is_text = [], frame.opcode == OP_TEXT
                elif frame.opcode != OP_CONTINUATION:
                    continue
                parts.append(frame.text if is_text else frame.payload)
                if frame.fin:
                    message = "".join(parts) if is_text else b"".join(parts)
                    parts = []
                    if not (is_text and self._ready_set(message)):
                        self.agent.handle_envelope(message, self)
        finally:
            outbox.put(_END)

    def _ready_set(self, text):
        """Apply a glb@lb@ready record from glb; False if ``text`` is not one (an envelope)."""
        try:
            record = control_records.parse_ready_set(text)
        except RecordError as exc:
            log.warning("! %s malformed %s: %s; broadcasts stop relying on it", self.url, READY_SET, exc.reason)
            self.ready_backends = None
            return True
        if record is None:
            return False
        if record.ready is not None:
            self.ready_backends = set(record.ready)
        elif self.ready_backends is not None:
            self.ready_backends.difference_update(record.left)
            self.ready_backends.update(record.joined)
        return True

    def _heartbeat(self, ws):
        """Ping glb every ``heartbeat`` s; drop a channel that stayed silent for two periods."""
        period = self.agent.heartbeat
        self.last_heard = time.monotonic()
        while not ws.closed:
            gevent.sleep(period)
            if time.monotonic() - self.last_heard > 2 * period:
                log.warning("! %s nothing from glb for %.0f s; dropping the channel", self.url, 2 * period)
                ws.abort()
                return
            try:
                ws.ping(b"agent")
            except ConnectionClosed:
                return


class Agent:
    """Registers this backend with the glb instances at ``lb_urls`` and keeps them informed.

    ``bindings`` are ``(host, port, ssl)`` tuples (``ssl`` optional) where clients
    reach this backend; ``0.0.0.0`` means "the address glb sees me come from".
    ``weight``, ``max_clients``, ``http`` and ``tags`` are glb's server-data
    extensions. ``token`` is sent as ``Authorization: Bearer``. ``on_envelope``,
    if given, is called as ``on_envelope(envelope)`` with a
    ``control_records.TextEnvelope`` or ``BinaryEnvelope`` for every broadcast
    glb relays to this backend. Every ``heartbeat`` seconds the agent pings glb and
    drops (then reconnects) a channel that stayed silent for two periods, so a glb
    that vanished without closing is noticed. Bad values raise ``RecordError``/``ValueError`` here.
    """

    def __init__(self, lb_urls: str | list[str], guid: str | None = None,
                 bindings: Iterable[Binding | tuple] = (), weight: int = 1, max_clients: int = 0,
                 http: str | None = None, token: str | None = None, tags: Iterable[str] = (),
                 on_envelope: Callable[[Any], None] | None = None, ssl_context: ssl.SSLContext | None = None,
                 connect_timeout: float = 10.0, backoff_base: float = 0.1, backoff_cap: float = 5.0,
                 heartbeat: float = 15.0) -> None:
        if isinstance(lb_urls, str):
            lb_urls = [lb_urls]
        self.guid = guid or str(uuid.uuid4())
        self.server_data = ServerData(self.guid, weight, max_clients, http, tuple(tags), (READY_SET,))
        self.bindings = [b if isinstance(b, Binding) else Binding(*b) for b in bindings]
        self.token = token
        self.on_envelope = on_envelope
        self.ssl_context = ssl_context
        self.connect_timeout = connect_timeout
        self.backoff_base, self.backoff_cap = backoff_base, backoff_cap
        self.heartbeat = heartbeat  # seconds between pings to glb; 0 = none
        self.close_wait = 2.0  # seconds stop() gives glb to answer a close
        self.clients: dict[str, ClientRecord] = {}  # conn id -> every client connected right now
        self.draining = False  # drain() was called: re-announced after every reconnect
        self.group = Group()
        self.stopping = Event()
        self.links = [Link(self, url) for url in lb_urls]
        if not self.links:
            raise ValueError("an agent needs at least one glb address")

    def __repr__(self):
        return f"<Agent {self.guid} {len(self.clients)} clients {self.links}>"

    @property
    def handshake_headers(self):
        return [("Authorization", f"Bearer {self.token}")] if self.token else []

    def registration_texts(self):
        """The whole registration, as sent after every (re)connect."""
        texts = [control_records.encode_record(self.server_data)]
        texts += [control_records.encode_record(binding) for binding in self.bindings]
        texts += [control_records.encode_record(record) for record in self.clients.values()]
        texts.append(control_records.READY)
        if self.draining:
            texts.append(control_records.encode_record(control_records.Drain()))
        return texts

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> "Agent":
        """Start one greenlet per glb; returns at once (registration happens in the background)."""
        if len(self.group):
            raise RuntimeError("agent already started")
        self.stopping.clear()
        for link in self.links:
            self.group.spawn(link.run)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Close every control channel with 1000 and end every greenlet, within about ``timeout`` s."""
        self.stopping.set()
        self.close_wait = min(self.close_wait, timeout / 2)  # time for glb to answer our close
        for link in self.links:
            link.put(_CLOSE)
        if not self.group.join(timeout=timeout):
            log.warning("= agent %s: greenlets still running after %.1f s; killing them", self.guid, timeout)
            self.group.kill(block=True, timeout=1)

    @property
    def registered(self) -> bool:
        """True when every glb has been sent a complete registration on its current channel."""
        return all(link.registered for link in self.links)

    # -- clients ---------------------------------------------------------------------------------

    def client_connected(self, conn_id: str, ip: str = "", channel: str = "", protocol: str = "") -> None:
        """A client connected to this backend directly: tell every connected glb."""
        record = ClientRecord(True, conn_id, ip or "", channel or "", protocol or "")
        self.clients[conn_id] = record
        self._send_all(control_records.encode_record(record))

    def client_disconnected(self, conn_id: str) -> None:
        """A client left; unknown ids are ignored."""
        record = self.clients.pop(conn_id, None)
        if record is not None:
            self._send_all(control_records.encode_record(
                ClientRecord(False, conn_id, record.ip, record.channel, record.protocol)))

    def drain(self, spread: float | None = None) -> None:
        """Ask every glb for no new clients; with ``spread`` (seconds) glb also closes this
        backend's sessions with 1012 at random moments within that window, so a deploy can
        stop this process once they are gone."""
        self.draining = True
        self._send_all(control_records.encode_record(control_records.Drain(spread)))

    def undrain(self) -> None:
        """Take new clients again."""
        self.draining = False
        self._send_all(control_records.encode_record(control_records.Undrain()))

    def _send_all(self, message):
        for link in self.links:
            link.put(message)

    # -- envelopes -------------------------------------------------------------------------------

    def send_envelope(self, message: str | bytes) -> bool:
        """Queue an encoded envelope (str or bytes) so that it reaches every backend once; False if
        no glb is connected.

        The seam for ``broadcast``: each glb relays what it gets to the backends it holds (or
        those a route names), this one included; ``broadcast_plan`` says which glb gets what.
        """
        plan = self.broadcast_plan()
        for link, backends in plan:
            if backends is not None:  # the route and its envelope leave together, in this order
                link.put(control_records.encode_record(BroadcastRoute(backends)))
            link.put(message)
        return bool(plan)

    def broadcast_plan(self):
        """``[(link, backends)]``: the glbs a broadcast goes through now and, for all but the first,
        the guids it is for there (None: every backend that glb holds); [] when none is connected.

        First the glb holding the most backends (among equals, the one registered longest);
        then, while some glb holds backends not covered yet, the one holding most of them, for
        just those. While a glb has not said what it holds: the one registered longest, alone.
        """
        registered = sorted((link for link in self.links if link.registered_at is not None),
                            key=lambda link: link.registered_at or 0.0)
        if not registered:
            connected = next((link for link in self.links if link.outbox is not None), None)
            return [] if connected is None else [(connected, None)]
        held = {link: link.ready_backends for link in registered}
        if any(guids is None for guids in held.values()):
            return [(registered[0], None)]
        known: dict[Link, set[str]] = {link: guids for link, guids in held.items() if guids is not None}
        primary = max(registered, key=lambda link: len(known[link]))
        plan: list[tuple[Link, tuple[str, ...] | None]] = [(primary, None)]
        covered = set(known[primary])
        others = [link for link in registered if link is not primary]
        while others:
            link = max(others, key=lambda link: len(known[link] - covered))
            extra = known[link] - covered
            if not extra:
                break
            plan.append((link, tuple(sorted(extra))))
            covered |= extra
            others.remove(link)
        return plan

    def broadcast(self, message: str | bytes, channel: str = "", protocol: str = "", include: str = "",
                  exclude: str = "", guid: str = "") -> bool:
        """Send ``message`` (str or bytes) to the clients of every backend glb holds, this one included.

        The filters travel in the envelope and each backend applies them to its own clients
        (``recipients``); ``guid`` addresses one connection. True if queued on a connected glb;
        False if none is connected (the message is dropped: delivery is at most once).
        """
        return self.send_envelope(encode_envelope(message, guid, channel, protocol, include, exclude))

    def recipients(self, envelope):
        """The ids of this backend's clients (as reported with ``client_connected``) ``envelope`` is for."""
        return select_clients(envelope, self.clients)

    def handle_envelope(self, message, link):
        """A message glb sent on a control channel: decode it and call ``on_envelope``."""
        try:
            if isinstance(message, str):
                envelope = control_records.parse_text_envelope(message)
            else:
                envelope = control_records.parse_binary_envelope(message)
        except RecordError as exc:
            log.warning("! %s dropped a malformed envelope: %s", link.url, exc.reason)
            return
        if self.on_envelope is None:
            return
        try:
            self.on_envelope(envelope)
        except Exception:  # a callback bug must not end the control channel
            log.exception("! %s on_envelope raised", link.url)

