"""The backend registry: the one owner of every backend's state, no sockets.

The control-channel greenlet hands each text frame to ``Registration.receive``
and only moves bytes; the relay reports sessions with ``session_started`` /
``session_ended``; health checks move a backend between ``up`` and ``down``
(``mark_down`` / ``mark_up`` / ``connect_failed``); the operator drains and
reweights (``drain`` / ``resume`` / ``set_weight``); the balancer reads
``candidates()``, which is cached and rebuilt only after a change (``version``
counts changes).

Errors::

    GlbError
    └── RegistryError          a registry operation that cannot be done (unknown guid, ...)
        ├── TransitionError    a backend state change the table does not allow (a glb bug)
        └── RegistrationError  the backend broke the protocol: close with close_code
"""
import ipaddress
import time
from urllib.parse import urlsplit

from glb.balancing import slow_start_weight
from glb.control_records import (
    CLIENT_CONNECTION, DRAIN, SERVER_DATA, Binding, BroadcastRoute, ClientRecord, Drain, Ready,
    RecordError, ServerData, Undrain, parse_record,
)
from glb.errors import CloseCode, GlbError

CONNECTING = "connecting"  # control channel open, registering: not eligible
READY = "ready"            # registered: eligible for new clients
DRAINING = "draining"      # no new clients; existing sessions continue
GONE = "gone"              # removed from the pool; terminal

# Backend states. Rules: a backend only becomes eligible through `ready`; an
# operator may move it between `ready` and `draining` as often as they like; any
# live state may end in `gone` (control channel closed, or removed), and `gone`
# is final — a backend that comes back registers anew as a new Backend.
TRANSITIONS = {
    CONNECTING: frozenset({READY, GONE}),
    READY: frozenset({DRAINING, GONE}),
    DRAINING: frozenset({READY, GONE}),
    GONE: frozenset(),
}

UP = "up"      # passes its health checks (or has none): may be a candidate
DOWN = "down"  # failed active checks, or ejected after max_fails failures: not a candidate

# Health is a second, independent state: a draining backend can also be down, and
# comes back up still draining. Every live backend starts up; `down` is left by
# rise passed checks or the end of its ejection (fail_timeout); each change bumps
# the registry's version, so candidates() follows.
HEALTH_TRANSITIONS = {
    UP: frozenset({DOWN}),
    DOWN: frozenset({UP}),
}

# What a control channel may send, by the state of its backend (None: no server
# data yet). Server data comes once and first; bindings and client records may
# follow; ready comes once. A binding after ready is accepted and added: a
# backend may open another listener, and adding an address harms nobody.
# A ready backend may drain itself and undrain again (glb's extension records;
# either one in the state it leads to changes nothing).
# Broadcast envelopes are not records: valid in any state once server data came, and so
# is the route (glb's extension) that may precede one.
ACCEPTED = {
    None: (ServerData,),
    CONNECTING: (Binding, ClientRecord, Ready, BroadcastRoute),
    READY: (Binding, ClientRecord, Drain, Undrain, BroadcastRoute),
    DRAINING: (Binding, ClientRecord, Drain, Undrain, BroadcastRoute),
    GONE: (),
}


class Outcome:
    """What ``Registration.receive``/``apply`` did with a frame."""

    REGISTERED = "registered"  # server data accepted: the backend exists, state connecting
    BINDING = "binding"        # a binding was added (or was already known)
    CLIENT = "client"          # a client record updated the backend's client count
    CLIENT_DROPPED = "client dropped"  # a client record over max_clients_reported, not kept
    READY = "ready"            # the backend became eligible: fire server_ready
    DRAIN = "drain"            # the backend asks to be drained (``Registration.last`` has the spread)
    UNDRAIN = "undrain"        # the backend asks to take new clients again
    ROUTE = "route"            # the next envelope goes to ``Registration.last.backends`` only
    ENVELOPE = "envelope"      # not a record: a broadcast envelope for the caller


class RegistryError(GlbError):
    """A registry operation that cannot be done."""


class TransitionError(RegistryError):
    """A state change that TRANSITIONS does not allow."""


class RegistrationError(RegistryError):
    """The backend broke the registration protocol: close its channel with ``close_code``."""

    def __init__(self, reason, close_code=CloseCode.POLICY_VIOLATION):
        super().__init__(reason)
        self.reason, self.close_code = reason, close_code


def check_transition(old, new, table=TRANSITIONS):
    if new not in table.get(old, ()):
        raise TransitionError(f"illegal backend state change {old} -> {new}")


class Backend:
    """One backend: what it registered, its state, health and client count.

    ``weight`` is the operator's (registered, configured or set over the admin
    API); ``effective_weight`` is what balancing uses: during ``slow_start``
    seconds after the backend became eligible it ramps up to ``weight``.
    """

    __slots__ = ("guid", "bindings", "weight", "max_clients", "http", "tags", "state",
                 "reported_clients", "relayed", "static", "peer", "name", "health", "down_reason",
                 "down_until", "failures", "max_fails", "fail_timeout", "slow_start", "ramp_start",
                 "retiring")

    def __init__(self, guid, weight=1, max_clients=0, http=None, tags=(), static=False,
                 peer=None, name=None, state=CONNECTING, max_fails=0, fail_timeout=10.0,
                 slow_start=0.0):
        self.guid = guid
        self.bindings = []
        self.weight = weight
        self.max_clients = max_clients
        self.http = http
        self.tags = tuple(tags)
        self.state = state
        self.reported_clients = {}  # client guid -> ClientRecord, connected to it directly
        self.relayed = 0            # sessions glb relays to it
        self.static = static
        self.peer = peer
        self.name = name or guid
        self.retiring = False  # draining until its last session ends, then removed
        self.health = UP
        self.down_reason = None  # why it is down
        self.down_until = None   # monotonic end of a passive ejection (None: until checks pass)
        self.failures = []       # monotonic times of recent failed connects (passive checks)
        self.max_fails, self.fail_timeout = max_fails, fail_timeout
        self.slow_start = slow_start
        self.ramp_start = None   # monotonic start of the slow-start ramp, None when at full weight

    @property
    def effective_weight(self):
        """``weight``, or less while slow start ramps it up (what balancing uses)."""
        start = self.ramp_start
        if start is None:
            return self.weight
        elapsed = time.monotonic() - start
        if elapsed >= self.slow_start:
            self.ramp_start = None
            return self.weight
        return slow_start_weight(self.weight, elapsed, self.slow_start)

    @property
    def load(self):
        """Clients per unit of effective weight, counting the next one (least-loaded balancing)."""
        return (self.clients + 1) / self.effective_weight

    @property
    def clients(self):
        return len(self.reported_clients) + self.relayed

    @property
    def full(self):
        return bool(self.max_clients) and self.clients >= self.max_clients

    def _first_binding(self):
        if not self.bindings:
            raise RegistryError(f"backend {self.name} has no binding")
        return self.bindings[0]

    def binding_url(self, path_qs=""):
        """The WebSocket URL of the first binding, for ``path_qs`` ("/path?query")."""
        binding = self._first_binding()
        if not path_qs.startswith("/"):
            path_qs = "/" + path_qs
        return f"{'wss' if binding.ssl else 'ws'}://{binding.netloc}{path_qs}"

    @property
    def takes_http(self):
        """Whether plain HTTP may be forwarded here ("" for ``http`` opts out)."""
        return bool(self.http) or (self.http is None and bool(self.bindings))

    def http_base(self):
        """Base URL for HTTP forwarding: the registered ``http``, else the first binding's."""
        if self.http:
            return self.http.rstrip("/")
        if self.http == "":
            raise RegistryError(f"backend {self.name} takes no HTTP")
        binding = self._first_binding()
        return f"{'https' if binding.ssl else 'http'}://{binding.netloc}"

    def __repr__(self):
        return f"<Backend {self.name} {self.state} {self.health} clients={self.clients} weight={self.weight}>"


def _peer_host(peer):
    if isinstance(peer, (tuple, list)) and peer:
        return peer[0]
    return peer if isinstance(peer, str) else None


def _unspecified(host):
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


class Registration:
    """One control channel's registration; the greenlet calls ``receive`` per text frame."""

    def __init__(self, registry, peer=None):
        self.registry = registry
        self.peer = peer
        self.backend = None
        self.last = None  # the record last applied

    @property
    def state(self):
        """The backend's state, or None before server data."""
        return self.backend.state if self.backend else None

    def receive(self, text):
        """Handle one text frame and say what happened (an Outcome).

        Raises RegistrationError (close the channel) for a sequencing error, a
        duplicate guid, bad server data or a bad binding; RecordError (an ``error``
        event, the channel stays open) for another malformed record.
        """
        try:
            record = parse_record(text)
        except RecordError as exc:
            if self.backend is None and exc.method != SERVER_DATA:
                # Out of order beats badly formed: nothing but server data may come first.
                raise RegistrationError(f"record before server data ({exc.reason})") from None
            if exc.method in (CLIENT_CONNECTION, DRAIN):
                raise
            raise RegistrationError(exc.reason) from None
        if record is None:
            if self.backend is None:
                raise RegistrationError("message before server data")
            return Outcome.ENVELOPE
        return self.apply(record)

    def apply(self, record):
        """Apply one parsed record (see ACCEPTED) and return an Outcome."""
        state = self.state
        if not isinstance(record, ACCEPTED[state]):
            raise RegistrationError(*self._refusal(record, state))
        self.last = record
        if isinstance(record, ServerData):
            self.backend = self.registry._register(record, self.peer)
            return Outcome.REGISTERED
        if isinstance(record, Binding):
            self.registry._add_binding(self.backend, self._resolve(record))
            return Outcome.BINDING
        if isinstance(record, ClientRecord):
            kept = self.registry._client_record(self.backend, record)
            return Outcome.CLIENT if kept else Outcome.CLIENT_DROPPED
        if isinstance(record, Drain):
            return Outcome.DRAIN  # the caller drains through glb.pool, which also closes sessions
        if isinstance(record, Undrain):
            return Outcome.UNDRAIN
        if isinstance(record, BroadcastRoute):
            return Outcome.ROUTE
        self.registry._move(self.backend, READY)
        return Outcome.READY

    def _refusal(self, record, state):
        if state is None:
            return ("record before server data",)
        if state == GONE:
            return ("backend was removed", CloseCode.GOING_AWAY)
        if isinstance(record, ServerData):
            return ("server data sent twice",)
        if isinstance(record, (Drain, Undrain)):
            return ("drain before ready",)
        return ("ready sent twice",)

    def _resolve(self, binding):
        """An unspecified address (0.0.0.0, ::) means the address the channel came from."""
        host = _peer_host(self.peer)
        if host and _unspecified(binding.host):
            return Binding(host, binding.port, binding.ssl)
        return binding

    def close(self):
        """The control channel has closed: the backend leaves the pool. Returns it (or None)."""
        backend = self.backend
        if backend is not None and backend.state != GONE:
            self.registry._discard(backend)
        return backend



class Registry:
    """Every live backend, by guid; the source of the candidate list."""

    def __init__(self, max_clients_reported=0, max_bindings=0, max_fails=0, fail_timeout=10.0,
                 slow_start=0.0):
        self.max_clients_reported = max_clients_reported  # per backend; 0 = no cap
        self.max_bindings = max_bindings  # per backend; 0 = no cap
        self.max_fails, self.fail_timeout, self.slow_start = max_fails, fail_timeout, slow_start
        self._backends = {}
        self._candidates = None
        self._http_candidates = None
        self.version = 0  # bumped on every change that may alter candidates()

    # -- reading --------------------------------------------------------------------------

    def get(self, guid):
        return self._backends.get(guid)

    def all(self):
        return list(self._backends.values())

    def __len__(self):
        return len(self._backends)

    def candidates(self):
        """Backends that may take a new client: ready, with a binding, below max_clients.

        A tuple, cached until the next change: the same object while nothing changed,
        so policies may cache what they derive from it by identity.
        """
        if self._candidates is None:
            self._candidates = tuple(
                b for b in self._backends.values()
                if b.state == READY and b.health == UP and b.bindings and not b.full
            )
        return self._candidates

    def http_candidates(self):
        """Like candidates(), for plain HTTP: those that take HTTP (cached the same way).

        Give it its own policy object: a policy caches by the list it was last handed.
        """
        if self._http_candidates is None:
            self._http_candidates = tuple(b for b in self.candidates() if b.takes_http)
        return self._http_candidates

    # -- changing -------------------------------------------------------------------------

    def _changed(self):
        self.version += 1
        self._candidates = self._http_candidates = None

    def _move(self, backend, new):
        check_transition(backend.state, new)
        backend.state = new
        if new == READY:
            self._ramp(backend)
        self._changed()

    @staticmethod
    def _ramp(backend):
        """A backend that becomes eligible (ready, undrained, back up) starts its slow start."""
        backend.ramp_start = time.monotonic() if backend.slow_start > 0 else None

    def add_static(self, name, url, http=None, weight=1, max_clients=0, max_fails=None,
                   fail_timeout=None, slow_start=None):
        """A backend from the config: one binding parsed from ``url``, ready at once.

        ``http``: a base URL, None to use the binding's address, "" for no HTTP.

        Its guid is its name. Raises RecordError for a bad url/weight, RegistrationError
        when the name is already a live guid.
        """
        record = ServerData(name, weight, max_clients, http)
        binding = binding_from_url(url)
        backend = self._register(record, peer=None, static=True)
        for key, value in (("max_fails", max_fails), ("fail_timeout", fail_timeout),
                           ("slow_start", slow_start)):
            if value is not None:
                setattr(backend, key, value)
        backend.bindings.append(binding)
        self._move(backend, READY)
        return backend

    def begin(self, peer=None):
        """Start the registration of a backend whose control channel came from ``peer``."""
        return Registration(self, peer)

    def _register(self, record, peer, static=False):
        if record.guid in self._backends:
            raise RegistrationError("duplicate guid")
        backend = Backend(record.guid, record.weight, record.max_clients, record.http,
                          record.tags, static=static, peer=peer, max_fails=self.max_fails,
                          fail_timeout=self.fail_timeout, slow_start=self.slow_start)
        self._backends[record.guid] = backend
        self._changed()
        return backend

    def _add_binding(self, backend, binding):
        if binding not in backend.bindings:
            if self.max_bindings and len(backend.bindings) >= self.max_bindings:
                raise RegistrationError(f"more than {self.max_bindings} bindings (max_bindings)")
            backend.bindings.append(binding)
            self._changed()

    def _client_record(self, backend, record):
        """Apply a client record; False if it was dropped (a new client beyond max_clients_reported)."""
        was_full = backend.full
        reported = backend.reported_clients
        if record.active:
            if self.max_clients_reported and len(reported) >= self.max_clients_reported \
                    and record.guid not in reported:
                return False
            reported[record.guid] = record
        else:
            reported.pop(record.guid, None)
        if backend.full != was_full:
            self._changed()
        return True

    def _discard(self, backend):
        """Remove this very backend (not a newer one with the same guid)."""
        guid = backend.guid
        if self._backends.get(guid) is backend:
            del self._backends[guid]
        if backend.state != GONE:
            self._move(backend, GONE)

    def remove(self, guid):
        """Take a backend out of the pool (its channel, if any, is for the caller to close)."""
        backend = self._backends.get(guid)
        if backend is None:
            raise RegistryError(f"no backend {guid!r}")
        self._discard(backend)
        return backend

    def update_static(self, name, url, http=None, weight=1, max_clients=0, max_fails=None,
                      fail_timeout=None, slow_start=None):
        """A static backend's config changed (or it came back while retiring).

        A new ``url`` is a new backend: the old one leaves the pool (its open sessions
        continue) and the new one is ready at once. Other values change in place; its
        health and client counts stay.
        """
        backend = self._backends.get(name)
        if backend is None or not backend.static:
            raise RegistryError(f"no static backend {name!r}")
        binding = binding_from_url(url)
        if backend.bindings != [binding]:
            self._discard(backend)
            return self.add_static(name, url, http=http, weight=weight, max_clients=max_clients,
                                   max_fails=max_fails, fail_timeout=fail_timeout, slow_start=slow_start)
        backend.http, backend.weight, backend.max_clients = http, weight, max_clients
        for key, value in (("max_fails", max_fails), ("fail_timeout", fail_timeout),
                           ("slow_start", slow_start)):
            if value is not None:
                setattr(backend, key, value)
        if backend.state == DRAINING and backend.retiring:
            backend.retiring = False
            self._move(backend, READY)
        self._changed()
        return backend

    def retire(self, guid):
        """No new clients for this backend; it leaves the pool when its last relayed session ends."""
        backend = self._backends.get(guid)
        if backend is None:
            raise RegistryError(f"no backend {guid!r}")
        backend.retiring = True
        if backend.relayed == 0:
            self._discard(backend)
        elif backend.state != DRAINING:
            self._move(backend, DRAINING)
        return backend

    def drain(self, guid):
        """No new clients for this backend; its sessions continue."""
        return self._set_state(guid, DRAINING)

    def resume(self, guid):
        """A drained backend takes new clients again."""
        return self._set_state(guid, READY)

    def _set_state(self, guid, state):
        backend = self._backends.get(guid)
        if backend is None:
            raise RegistryError(f"no backend {guid!r}")
        self._move(backend, state)
        return backend

    def set_weight(self, guid, weight):
        """The operator's new weight for a backend (1..100)."""
        backend = self._backends.get(guid)
        if backend is None:
            raise RegistryError(f"no backend {guid!r}")
        if not (isinstance(weight, int) and not isinstance(weight, bool) and 1 <= weight <= 100):
            raise RegistryError(f"weight must be an integer 1..100, got {weight!r}")
        backend.weight = weight
        self._changed()
        return backend

    # -- health ---------------------------------------------------------------------------

    def mark_down(self, backend, reason, until=None):
        """Take a backend out of the candidates (until ``until``, monotonic; None: until marked up).

        False if it was down already (its reason is kept).
        """
        if backend.health == DOWN:
            return False
        check_transition(backend.health, DOWN, HEALTH_TRANSITIONS)
        backend.health, backend.down_reason, backend.down_until = DOWN, reason, until
        self._changed()
        return True

    def mark_up(self, backend):
        """A down backend is healthy again: a candidate once more, through its slow start."""
        if backend.health == UP:
            return False
        check_transition(backend.health, UP, HEALTH_TRANSITIONS)
        backend.health, backend.down_reason, backend.down_until = UP, None, None
        backend.failures.clear()
        self._ramp(backend)
        self._changed()
        return True

    def connect_failed(self, backend, now=None):
        """A connect or handshake to ``backend`` failed; True when it should now be ejected.

        ``max_fails`` failures within ``fail_timeout`` seconds (passive check): the caller
        marks it down until ``now + fail_timeout``. The only candidate left is never ejected.
        """
        if not backend.max_fails or backend.health == DOWN or backend.state == GONE:
            return False
        if self.candidates() == (backend,):
            return False  # the last one left (nginx ignores max_fails for a lone server): 503 helps nobody
        now = time.monotonic() if now is None else now
        window = backend.fail_timeout
        failures = [t for t in backend.failures if now - t < window]
        failures.append(now)
        backend.failures = failures
        return len(failures) >= backend.max_fails

    def ejections_over(self, now=None):
        """Backends whose passive ejection has ended (still down: the caller marks them up)."""
        now = time.monotonic() if now is None else now
        return [b for b in self._backends.values()
                if b.health == DOWN and b.down_until is not None and b.down_until <= now]

    # -- client counts --------------------------------------------------------------------

    def session_started(self, backend):
        """glb has paired a client session with ``backend``."""
        was_full = backend.full
        backend.relayed += 1
        if backend.full != was_full:
            self._changed()

    def session_ended(self, backend):
        """A session relayed to ``backend`` has ended."""
        was_full = backend.full
        backend.relayed = max(0, backend.relayed - 1)
        if backend.retiring and not backend.relayed:
            self._discard(backend)
        elif backend.full != was_full:
            self._changed()


_DEFAULT_PORTS = {"ws": 80, "http": 80, "wss": 443, "https": 443}


def binding_from_url(url):
    """The Binding for a static backend's URL (ws, wss, http or https; no path)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except (ValueError, TypeError, AttributeError):
        raise RecordError(f"backend url {url!r} is not a URL") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise RecordError(f"backend url {url!r}: scheme must be ws, wss, http or https")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise RecordError(f"backend url {url!r}: must not have a path, query or fragment")
    if not parts.hostname:
        raise RecordError(f"backend url {url!r}: no host")
    return Binding(parts.hostname, port or _DEFAULT_PORTS[parts.scheme],
                   parts.scheme in ("wss", "https"))
