"""Settings: declared once, parsed from one INI file, checked before anything starts.

Every setting is one ``Setting`` line in ``SETTINGS``: section, key, type,
default and a one-line doc. That table drives the parser (unknown sections and
keys are errors), the sample config (``render_sample``) and the README
reference (``render_reference``), so the three cannot drift apart. Defaults are
written as INI text and go through the same parser as the file, so a default
is always something a user could have typed.

Any problem raises ``ConfigError`` naming the file, section, key and reason.
Relative file paths are resolved against the config file's directory (the
current directory for ``from_dict``), so a config can sit beside its
certificates.

Regenerate the README block after changing a declaration::

    python -m glb.config --write-readme README.md
"""
import configparser
import difflib
import importlib
import ipaddress
import math
import os
import re
import ssl
import sys
import textwrap
from typing import NamedTuple
from urllib.parse import urlsplit

from glb.errors import ConfigError
from glb.limits import normalise_origin

# --------------------------------------------------------------------------- types
# A type turns the INI text of one value into a Python value, or raises
# ValueError whose message is the reason shown to the user. ``name`` is what the
# generated docs show in the "type" column.


class Type:
    name = "string"

    def parse(self, text, base_dir):
        raise NotImplementedError


class Str(Type):
    """Free text; ``check`` may refuse some of it. ``secret`` hides it in reprs."""

    def __init__(self, check=None, name="string", secret=False):
        self.check, self.name, self.secret = check, name, secret

    def parse(self, text, base_dir):
        if self.check:
            self.check(text)
        return text


class Int(Type):
    def __init__(self, min=None, max=None):
        self.min, self.max = min, max
        if min is not None and max is not None:
            self.name = f"integer {min}..{max}"
        elif min is not None:
            self.name = f"integer >= {min}"
        else:
            self.name = "integer"

    def parse(self, text, base_dir):
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if self.min is not None and value < self.min:
            raise ValueError(f"must be at least {self.min}, got {value}")
        if self.max is not None and value > self.max:
            raise ValueError(f"must be at most {self.max}, got {value}")
        return value


class Seconds(Type):
    """A duration in seconds as a float; ``positive`` excludes 0 (where 0 would mean "never")."""

    def __init__(self, positive=False):
        self.positive = positive
        self.name = "seconds > 0" if positive else "seconds >= 0"

    def parse(self, text, base_dir):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number of seconds, got {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number of seconds, got {text!r}")
        if self.positive and value <= 0:
            raise ValueError(f"must be greater than 0, got {text}")
        if value < 0:
            raise ValueError(f"must not be negative, got {text}")
        return value


class Number(Type):
    """A number in ``[min, max]``: a fraction such as 0.1 (ten per cent), a rate."""

    def __init__(self, min=0.0, max=1.0):
        self.min, self.max = min, max
        self.name = f"number {min:g}..{max:g}"

    def parse(self, text, base_dir):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
        if not (self.min <= value <= self.max):
            raise ValueError(f"must be between {self.min:g} and {self.max:g}, got {text}")
        return value


class Inherit(Type):
    """``inner``, or empty for the value of the same key in ``[section]`` (filled in by ``_build``)."""

    def __init__(self, inner, section):
        self.inner, self.section = inner, section
        self.name = f"{inner.name}; empty = as [{section}]"

    def parse(self, text, base_dir):
        return self.inner.parse(text, base_dir) if text else None


class Bool(Type):
    name = "boolean"
    WORDS = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}

    def parse(self, text, base_dir):
        try:
            return self.WORDS[text.lower()]
        except KeyError:
            raise ValueError(f"expected true/false, yes/no, on/off or 1/0, got {text!r}") from None


class Choice(Type):
    """One of a fixed set of words, matched without regard to case; the declared spelling is kept."""

    def __init__(self, *choices):
        self.choices = choices
        self.by_lower = {choice.lower(): choice for choice in choices}
        self.name = "one of: " + ", ".join(choices)

    def parse(self, text, base_dir):
        try:
            return self.by_lower[text.lower()]
        except KeyError:
            pass
        reason = f"expected one of {', '.join(self.choices)}; got {text!r}"
        close = difflib.get_close_matches(text, self.choices, n=1)
        raise ValueError(reason + (f" (did you mean {close[0]!r}?)" if close else ""))


class List(Type):
    """Items separated by commas or newlines, each parsed by ``item``; a repeated item is an error."""

    def __init__(self, item=None, min_items=0, name=None):
        self.item, self.min_items = item or Str(), min_items
        self.name = name or (f"list of: {', '.join(item.choices)}" if isinstance(item, Choice)
                             else f"list of {self.item.name}")

    def parse(self, text, base_dir):
        values = []
        for part in re.split(r"[,\n]", text):
            part = part.strip()
            if not part:
                continue
            value = self.item.parse(part, base_dir)
            if value in values:
                raise ValueError(f"{part!r} is listed twice")
            values.append(value)
        if len(values) < self.min_items:
            raise ValueError(f"needs at least {self.min_items} item(s)")
        return values


class HostPort(Type):
    """``host:port`` to a ``(host, port)`` tuple; IPv6 in brackets, port 0 = any free port."""

    name = "host:port"
    HOSTNAME = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?$")

    def parse(self, text, base_dir):
        if text.startswith("["):
            host, sep, port = text[1:].partition("]:")
            if not sep:
                raise ValueError(f"expected [ipv6]:port, got {text!r}")
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ValueError(f"not an IPv6 address: {host!r} in {text!r}") from None
        else:
            host, sep, port = text.rpartition(":")
            if not sep:
                raise ValueError(f"expected host:port, got {text!r} (no port)")
            if ":" in host:
                raise ValueError(f"IPv6 addresses go in brackets, e.g. [::1]:8080; got {text!r}")
            if not host:
                raise ValueError(f"no host in {text!r} (use 0.0.0.0 or [::] for every interface)")
            if not self.HOSTNAME.match(host):
                raise ValueError(f"not a host name or address: {host!r} in {text!r}")
        if not port.isdigit() or int(port) > 65535:
            raise ValueError(f"port must be 0..65535, got {port!r} in {text!r}")
        return host, int(port)


class Network(Type):
    name = "network"

    def parse(self, text, base_dir):
        try:
            return ipaddress.ip_network(text, strict=False)
        except ValueError:
            raise ValueError(f"not an IP network or address: {text!r}") from None


class Rate(Type):
    """A number of events per second, >= 0 (0 = no limit)."""

    name = "per second >= 0"

    def parse(self, text, base_dir):
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"expected a number per second, got {text!r}") from None
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0, got {text!r}")
        return value


class Origin(Type):
    """A browser origin, ``scheme://host[:port]``, kept normalised (lower case, default port dropped)."""

    name = "origin"

    def parse(self, text, base_dir):
        origin = normalise_origin(text)
        if origin is None:
            raise ValueError(f"expected an origin like https://example.com or http://host:8080, got {text!r}")
        return origin


class DottedName(Type):
    name = "module name"

    def parse(self, text, base_dir):
        if not all(part.isidentifier() for part in text.split(".")):
            raise ValueError(f"not a dotted module name: {text!r}")
        return text


class FilePath(Type):
    """A file that must exist when the config is loaded; empty means unset (None)."""

    name = "file path"

    def parse(self, text, base_dir):
        if not text:
            return None
        path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(text)))
        if not os.path.exists(path):
            raise ValueError(f"file not found: {path}")
        if not os.path.isfile(path):
            raise ValueError(f"not a file: {path}")
        if not os.access(path, os.R_OK):
            raise ValueError(f"file not readable: {path}")
        return path


class OutputPath(Type):
    """A file glb writes (created if missing) in a directory that must exist; empty means unset (None)."""

    name = "file path (written)"

    def parse(self, text, base_dir):
        if not text:
            return None
        path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(text)))
        directory = os.path.dirname(path)
        if os.path.isdir(path):
            raise ValueError(f"is a directory, not a file: {path}")
        if not os.path.isdir(directory):
            raise ValueError(f"directory not found: {directory}")
        if not os.access(path if os.path.exists(path) else directory, os.W_OK):
            raise ValueError(f"not writable: {path}")
        return path


class Url(Type):
    """An absolute URL with one of ``schemes``; empty means unset (None)."""

    def __init__(self, *schemes, root_only=False):
        self.schemes = schemes
        self.root_only = root_only
        self.name = " or ".join(f"{scheme}://" for scheme in schemes) + " URL"

    def parse(self, text, base_dir):
        if not text:
            return None
        parts = urlsplit(text)
        if parts.scheme.lower() not in self.schemes:
            raise ValueError(f"expected a {self.name}, got {text!r}")
        if not parts.hostname:
            raise ValueError(f"no host in URL {text!r}")
        try:
            parts.port
        except ValueError:
            raise ValueError(f"bad port in URL {text!r}") from None
        if parts.fragment:
            raise ValueError(f"URL must not have a #fragment: {text!r}")
        if self.root_only and (parts.path not in ("", "/") or parts.query):
            raise ValueError(f"URL must be scheme://host:port only (clients keep their own path): {text!r}")
        return text


# --------------------------------------------------------------------------- checks
# Value checks for Str settings: raise ValueError(reason) or return.

_TOKEN_CHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"  # RFC 9110 token: cookie, header and query names


def _check_hash_key(text):
    kind, sep, name = text.partition(":")
    if text == "ip" or (sep and kind in ("cookie", "header", "query") and re.fullmatch(_TOKEN_CHARS, name)):
        return
    raise ValueError(f"expected ip, cookie:NAME, header:NAME or query:NAME; got {text!r}")


def _check_prefix(text):
    if not (text.startswith("/") and text.endswith("/")):
        raise ValueError(f"must start and end with '/', got {text!r}")
    if re.search(r"[\s?#]", text):
        raise ValueError(f"must be a plain path (no spaces, '?' or '#'), got {text!r}")


def _check_token(text):
    if re.search(r"\s", text):
        raise ValueError("must not contain whitespace (it is sent in an HTTP header)")


def _check_health_check(text):
    kind, _, path = text.partition(" ")
    path = path.strip()
    if text in ("", "tcp", "ws") or (kind == "http" and path.startswith("/") and not re.search(r"\s", path)):
        return
    raise ValueError(f"expected tcp, ws or http /path (or empty for no checks); got {text!r}")


def _check_ciphers(text):
    if text:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(text)
        except ssl.SSLError:
            raise ValueError(f"OpenSSL accepts none of these ciphers: {text!r}") from None


# --------------------------------------------------------------------------- declarations


class _Required:
    def __repr__(self):
        return "REQUIRED"


REQUIRED = _Required()  # default of a key that must be given


class Setting(NamedTuple):
    section: str
    key: str
    type: Type
    default: object  # INI text, or REQUIRED
    doc: str
    example: str = None  # shown in the sample config instead of an empty or required default


PATTERN = "backend:NAME"  # the one pattern section: [backend:<name>], zero or more
_BACKEND_NAME = re.compile(r"[A-Za-z0-9_.-]+")

# Section order here is the order in the sample config and the reference.
SECTIONS = {
    "glb": "Listeners, balancing and session limits.",
    "handlers": "Handler modules that receive glb's events.",
    "backends": "Who may register backends over the control channel, and how glb connects to backends.",
    "http": "Plain HTTP requests proxied to backends.",
    "tls": "TLS for clients (https:// and wss://); off unless `listen` is set.",
    "demo": "In-process demo backends, for trying glb out; delete in real deployments.",
    "admin": "Who may call the admin API under `<prefix>admin/` (drain, weights, rebalancing, sessions).",
    # A handler module's settings live in a section named after the module (used when it is listed).
    "glb.handlers.access_log": "The bundled access log: one line per ended WebSocket and per HTTP request, "
                               "to the `glb.access` logger or a file of its own.",
    PATTERN: "A static backend, configured here instead of registering over the control channel. "
             "Zero or more; NAME is unique and made of letters, digits, `.`, `_` and `-`.",
}

HOST_PORTS = List(HostPort(), name="host:port list")

SETTINGS = (
    Setting("glb", "listen", HOST_PORTS, "127.0.0.1:8080",
            "Where plain HTTP and WebSocket clients connect: host:port, comma-separated; IPv6 as [::1]:8080."),
    Setting("glb", "balancing", Choice("random", "least_connections", "round_robin", "weighted", "p2c", "hash"),
            "least_connections", "How a new session or request picks a backend."),
    Setting("glb", "hash_key", Str(_check_hash_key, "ip, cookie:NAME, header:NAME or query:NAME"), "ip",
            "What `hash` balancing hashes, so the same client keeps reaching the same backend."),
    Setting("glb", "max_message_size", Int(min=125), "16777216",
            "Largest WebSocket frame or message in bytes; larger ones are refused with close 1009."),
    Setting("glb", "prefix", Str(_check_prefix, "path"), "/glb/",
            "Path prefix of glb's own endpoints (control channel, status); starts and ends with `/`."),
    Setting("glb", "protocols", List(Choice("websocket", "http"), min_items=1), "websocket, http",
            "What clients may do: WebSocket sessions, plain HTTP requests, or both."),
    Setting("glb", "handshake_timeout", Seconds(positive=True), "10",
            "Time a client gets to send a whole request head (and a backend to complete a WebSocket handshake)."),
    Setting("glb", "idle_timeout", Seconds(), "0",
            "Close sessions with no traffic either way for this long (0 = never)."),
    Setting("glb", "ping_interval", Seconds(), "30",
            "Ping both legs of an idle session this often, so middleboxes keep it open (0 = never)."),
    Setting("glb", "ping_timeout", Seconds(positive=True), "10",
            "Close a peer that does not answer a ping within this time."),
    Setting("glb", "send_timeout", Seconds(positive=True), "30",
            "Close a peer that reads nothing for this long while glb has data for it (1008, slow reader)."),
    Setting("glb", "backend_connect_timeout", Seconds(positive=True), "5",
            "Time to connect to a backend and complete its handshake before trying another."),
    Setting("glb", "backend_retries", Int(min=0), "2",
            "Other backends tried for a new session when the chosen one cannot be reached."),
    Setting("glb", "shutdown_timeout", Seconds(), "10",
            "On SIGINT or SIGTERM, how long open sessions get to close before they are cut."),
    Setting("glb", "upgrade_timeout", Seconds(positive=True), "30",
            "On SIGUSR2, how long the new glb gets to start and say it is ready before it is stopped "
            "and the running one carries on."),
    Setting("glb", "drain_timeout", Seconds(), "60",
            "After handing over to a new glb (SIGUSR2), how long the old one keeps relaying its open "
            "sessions before closing them with 1001."),
    Setting("glb", "drain_spread", Seconds(), "10",
            "Those 1001 closes are spread at random over this many seconds, so clients do not "
            "reconnect all at once (0 = all together)."),
    Setting("glb", "max_connections", Int(min=0), "0",
            "Most open connections (HTTP and WebSocket, control channels included); a new one beyond "
            "it gets 503 and an `error` event. 0 = half the file descriptor limit (raised to the hard "
            "limit at start-up) less a reserve, since a relayed session holds two descriptors."),
    Setting("glb", "max_connections_per_ip", Int(min=0), "0",
            "Most open connections from one client address, as max_connections (0 = no cap)."),
    Setting("glb", "allowed_origins", List(Origin(), name="origin list"), "",
            "Origins (`https://app.example.com`) whose pages may open WebSockets; any other `Origin` "
            "gets 403. Requests without `Origin` (not from a browser) pass. Empty = any origin."),
    Setting("glb", "handshake_rate_per_ip", Rate(), "0",
            "WebSocket handshakes (sessions and control channels) one address may start per second, "
            "on average; beyond it 429, or close 1008 for a control channel (0 = no limit)."),
    Setting("glb", "handshake_burst_per_ip", Int(min=1), "20",
            "Handshakes one address may start at once before handshake_rate_per_ip applies."),
    Setting("glb", "rebalance", Bool(), "off",
            "When the pool changes, close sessions (1012) on backends above their weighted share "
            "so their clients reconnect to the others."),
    Setting("glb", "rebalance_threshold", Number(0, 1), "0.1",
            "How far above its share (a fraction of it) a backend may be before sessions are moved."),
    Setting("glb", "rebalance_rate", Number(0.1, 10000), "20",
            "Most sessions closed per second by rebalancing, each at a random moment of its own 1/rate slot."),
    Setting("glb", "rebalance_cooldown", Seconds(), "30",
            "Sessions younger than this are not moved (yet), so no client is moved twice in a row."),
    Setting("glb", "log_level", Choice("debug", "info", "warning", "error"), "info",
            "Least severe log level written."),

    Setting("handlers", "modules", List(DottedName(), name="list of module names"), "glb.handlers.access_log",
            "Handler modules loaded at start-up, in this order; empty for none."),

    Setting("backends", "token", Str(_check_token, secret=True), "",
            "When set, control channels must send `Authorization: Bearer <token>`."),
    Setting("backends", "allow", List(Network(), name="network list"), "127.0.0.0/8, ::1/128",
            "Networks whose control channels need no token."),
    Setting("backends", "max_clients_reported", Int(min=1), "100000",
            "Most client records one backend may report; beyond it further `active` records are dropped "
            "(one `error` event per channel) and its count stays at the cap, so a backend that grew "
            "popular is never taken out of the pool."),
    Setting("backends", "max_bindings", Int(min=1), "16",
            "Most bindings one backend may register; one more closes its channel with 1008 (a backend "
            "has a few listeners; thousands is a bug to see at once)."),
    Setting("backends", "max_outbox_bytes", Int(min=65536), "33554432",
            "Bytes of broadcast envelopes queued for one control channel; a backend that falls further "
            "behind is closed with 1008 \"slow consumer\" (one envelope of any size fits an empty queue)."),
    Setting("backends", "verify", Bool(), "true",
            "Verify the TLS certificates of wss:// and https:// backends."),
    Setting("backends", "cafile", FilePath(), "",
            "CA bundle for verifying backends (empty = the system's CAs)."),
    Setting("backends", "certfile", FilePath(), "",
            "Client certificate for mutual TLS to backends; set together with keyfile."),
    Setting("backends", "keyfile", FilePath(), "",
            "Private key of the client certificate; set together with certfile."),

    Setting("backends", "heartbeat_interval", Seconds(), "10",
            "Ping every registered backend's control channel this often (0 = never)."),
    Setting("backends", "heartbeat_timeout", Seconds(positive=True), "5",
            "A control channel that leaves a heartbeat ping unanswered this long is ended (1011) "
            "and its backend leaves the pool; its client sessions are closed with 1014."),
    Setting("backends", "max_fails", Int(min=0), "3",
            "Failed connects or 5xx handshake answers within `fail_timeout` that take a backend out "
            "of the pool for `fail_timeout` (0 = never)."),
    Setting("backends", "fail_timeout", Seconds(positive=True), "10",
            "The window `max_fails` are counted in, and how long a backend then stays out."),
    Setting("backends", "slow_start", Seconds(), "0",
            "A new or returning backend's weight ramps from a tenth to full over this time (0 = at once)."),

    Setting("http", "connect_timeout", Seconds(positive=True), "5",
            "Time to connect to a backend for an HTTP request."),
    Setting("http", "read_timeout", Seconds(positive=True), "60",
            "Time to wait for each read of a backend's response or of a client's request body."),
    Setting("http", "pool_connections", Int(min=1), "10",
            "Backend addresses whose keep-alive connections are kept (the least recently used beyond)."),
    Setting("http", "pool_maxsize", Int(min=1), "100",
            "Idle keep-alive connections kept per backend for reuse."),
    Setting("http", "pool_idle_timeout", Seconds(positive=True), "30",
            "Close a pooled backend connection unused for this long."),
    Setting("http", "keepalive_timeout", Seconds(positive=True), "60",
            "Close a client connection that sends no next request for this long."),
    Setting("http", "max_head_size", Int(min=1024), "16384",
            "Largest request or response head in bytes: 414 (request line) or 431 beyond it."),
    Setting("http", "host_header", Choice("client", "backend"), "client",
            "Host header the backend sees: the one the client sent, or the backend's own host."),
    Setting("http", "retries", Int(min=0), "2",
            "Other backends tried for an idempotent request when a connection fails."),
    Setting("http", "chunk_size", Int(min=1024), "65536",
            "Bytes per chunk when streaming request and response bodies."),

    Setting("tls", "listen", HOST_PORTS, "",
            "Where TLS clients connect: host:port, comma-separated; empty = no TLS listener."),
    Setting("tls", "certfile", FilePath(), "",
            "Server certificate chain (PEM); required when listen is set."),
    Setting("tls", "keyfile", FilePath(), "",
            "Private key of the certificate (PEM); required when listen is set."),
    Setting("tls", "password", Str(secret=True), "",
            "Password of an encrypted keyfile."),
    Setting("tls", "minimum_version", Choice("TLSv1.2", "TLSv1.3"), "TLSv1.2",
            "Oldest TLS version accepted from clients."),
    Setting("tls", "ciphers", Str(_check_ciphers, "OpenSSL cipher list"), "",
            "Ciphers for TLS 1.2 and older, in OpenSSL syntax (empty = OpenSSL's defaults)."),
    Setting("tls", "cafile", FilePath(), "",
            "CA bundle for verifying client certificates; needed by verify_client."),
    Setting("tls", "verify_client", Choice("none", "optional", "required"), "none",
            "Ask clients for a certificate: not at all, checking one if sent, or insisting on one."),

    Setting("demo", "backends", Int(0, 16), "0",
            "Start this many demo backends in-process; they register over the control channel."),

    Setting("admin", "token", Str(_check_token, secret=True), "",
            "When set, admin calls may send `Authorization: Bearer <token>` from any address."),
    Setting("admin", "allow", List(Network(), name="network list"), "127.0.0.0/8, ::1/128",
            "Networks whose admin calls need no token (empty = the token is always needed)."),
    Setting("glb.handlers.access_log", "format", Choice("text", "json"), "text",
            "`text`: one readable line each; `json`: one JSON object per line (JSON lines), same fields."),
    Setting("glb.handlers.access_log", "file", OutputPath(), "",
            "Append the lines, and nothing else, to this file (reopened when rotated away); "
            "empty = the `glb.access` logger."),
    Setting("glb.handlers.access_log", "http", Bool(), "true",
            "Write a line per plain HTTP request too."),

    Setting(PATTERN, "url", Url("ws", "wss", root_only=True), REQUIRED,
            "WebSocket URL that sessions are relayed to.", example="ws://127.0.0.1:9001/"),
    Setting(PATTERN, "http", Url("http", "https"), "",
            "Base URL for plain HTTP requests (empty = derived from `url`: ws→http, wss→https).", example="http://127.0.0.1:9001"),
    Setting(PATTERN, "weight", Int(min=1, max=100), "1",
            "Share of new sessions under `weighted` balancing."),
    Setting(PATTERN, "max_clients", Int(min=0), "0",
            "Most concurrent sessions on this backend (0 = no cap)."),
    Setting(PATTERN, "check", Str(_check_health_check, "tcp, ws or http /path"), "",
            "Active health check: a TCP connect, a WebSocket handshake to `url`, or an HTTP GET that "
            "must answer 2xx/3xx (empty = no active checks).", example="http /health"),
    Setting(PATTERN, "check_interval", Seconds(positive=True), "2",
            "Time between two active checks (also each check's timeout)."),
    Setting(PATTERN, "rise", Int(min=1), "2",
            "Passed checks in a row that bring a down backend back."),
    Setting(PATTERN, "fall", Int(min=1), "3",
            "Failed checks in a row that take a backend out."),
    Setting(PATTERN, "max_fails", Inherit(Int(min=0), "backends"), "",
            "As `[backends] max_fails`, for this backend."),
    Setting(PATTERN, "fail_timeout", Inherit(Seconds(positive=True), "backends"), "",
            "As `[backends] fail_timeout`, for this backend."),
    Setting(PATTERN, "slow_start", Inherit(Seconds(), "backends"), "",
            "As `[backends] slow_start`, for this backend."),
)

DECLARED = {section: {} for section in SECTIONS}
for _setting in SETTINGS:
    assert _setting.key.isidentifier() and _setting.key not in DECLARED[_setting.section], _setting
    DECLARED[_setting.section][_setting.key] = _setting
del _setting


# Policies that send a reconnecting client to the emptiest backend, as rebalancing needs. The
# others would send a moved client back (hash) or anywhere (random, round robin): churn.
REBALANCE_POLICIES = ("least_connections", "p2c")


def rebalance_policy_reason(balancing):
    return (f"needs balancing = {' or '.join(REBALANCE_POLICIES)}: with {balancing}, "
            "moved clients would not be sent to the emptier backends")


def cross_checks(settings):
    """Problems no single value shows, as (section, key, reason); the first one found is raised."""
    tls, backends = settings.tls, settings.backends
    if not settings.glb.listen and not tls.listen:
        yield "glb", "listen", "empty, and so is [tls] listen: glb would accept no clients"
    if tls.listen:
        for key in ("certfile", "keyfile"):
            if not getattr(tls, key):
                yield "tls", key, "required when [tls] listen is set"
    for section, values in (("tls", tls), ("backends", backends)):
        if bool(values.certfile) != bool(values.keyfile):
            missing = "keyfile" if values.certfile else "certfile"
            yield section, missing, f"required when {'certfile' if values.certfile else 'keyfile'} is set"
    if tls.verify_client != "none" and not tls.cafile:
        yield "tls", "cafile", f"required when verify_client = {tls.verify_client}"
    both = {address for address in settings.glb.listen if address[1]} & set(tls.listen)
    if both:
        host, port = sorted(both)[0]
        yield "tls", "listen", f"{host}:{port} is also in [glb] listen"
    for section, values in (("tls", tls), ("backends", backends)):
        if values.certfile and values.keyfile:
            try:
                context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                # A callable password stops OpenSSL prompting on the terminal for an encrypted key.
                password = getattr(values, "password", "")
                context.load_cert_chain(values.certfile, values.keyfile, password=lambda: password)
            except (ssl.SSLError, OSError) as exc:
                yield section, "certfile", f"cannot load certificate and key: {_ssl_reason(exc)}"
        if values.cafile:
            try:
                ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(values.cafile)
            except (ssl.SSLError, OSError) as exc:
                yield section, "cafile", f"not a usable CA bundle: {_ssl_reason(exc)}"
    if settings.glb.rebalance and settings.glb.balancing not in REBALANCE_POLICIES:
        yield "glb", "rebalance", rebalance_policy_reason(settings.glb.balancing)
    seen_urls = {}
    for backend in settings.backends_static:
        if backend.url in seen_urls:
            yield f"backend:{backend.name}", "url", f"same URL as [backend:{seen_urls[backend.url]}]"
        seen_urls.setdefault(backend.url, backend.name)


def _ssl_reason(exc):
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or str(exc)
    if "PEM lib" in str(exc):  # OpenSSL says only this for both of its usual causes
        reason += " (not PEM, or an encrypted key with a wrong or missing [tls] password)"
    return reason


# --------------------------------------------------------------------------- settings objects


class Section:
    """One section's values as plain attributes, so reading them on hot paths costs nothing.

    Treat as read-only; build variants with ``from_dict``.
    """

    def __init__(self, section, values):
        self.__dict__.update(values)
        self._section = section

    def __repr__(self):
        declared = DECLARED.get(self._section) or DECLARED[PATTERN]
        shown = []
        for key, value in self.__dict__.items():
            if key.startswith("_"):
                continue
            setting = declared.get(key)
            if setting and getattr(setting.type, "secret", False) and value:
                value = "***"
            shown.append(f"{key}={value!r}")
        return f"<[{self._section}] {' '.join(shown)}>"


class Settings:
    """Every setting, typed: ``settings.<section>.<key>``.

    ``backends_static`` lists the ``[backend:NAME]`` sections in file order, each a
    ``Section`` with ``name, url, http, weight, max_clients``. ``path`` is the
    file the settings came from, None when built from a dict or the defaults.
    """

    glb: Section
    handlers: Section
    backends: Section
    http: Section
    tls: Section
    demo: Section
    admin: Section

    def handler_settings(self, module_name):
        """The section named after a handler module, or None when glb declares none for it."""
        return self.__dict__.get(module_name)

    def __init__(self, sections, backends_static=(), path=None):
        for name, values in sections.items():
            setattr(self, name, Section(name, values))
        self.backends_static = list(backends_static)
        self.path = path

    @classmethod
    def defaults(cls):
        """Every default, no file: for tests and embedding."""
        return from_dict({})

    def __repr__(self):
        return f"<Settings from {self.path or '<dict>'}>"


assert set(Settings.__annotations__) == {name for name in SECTIONS if name != PATTERN and "." not in name}


# --------------------------------------------------------------------------- loading


def _parser():
    return configparser.ConfigParser(
        interpolation=None,
        delimiters=("=",),  # "key: value" is not INI-style enough; and values hold colons
        comment_prefixes=("#", ";"),
        inline_comment_prefixes=("#", ";"),
        empty_lines_in_values=False,
        # No section may leak keys into the others; "[DEFAULT]" is just an unknown section.
        default_section="\0",
        strict=True,
    )


def _syntax_error(exc, file):
    """configparser's exceptions, in glb's one-line form."""
    if isinstance(exc, configparser.DuplicateOptionError):
        return ConfigError(f"line {exc.lineno}: key given twice" if exc.lineno else "key given twice",
                           file, exc.section, exc.option)
    if isinstance(exc, configparser.DuplicateSectionError):
        return ConfigError(f"line {exc.lineno}: section given twice" if exc.lineno else "section given twice",
                           file, exc.section)
    if isinstance(exc, configparser.MissingSectionHeaderError):
        return ConfigError(f"line {exc.lineno}: {exc.line.strip()!r} comes before any [section] header", file)
    if isinstance(exc, configparser.ParsingError):
        lineno, line = exc.errors[0]
        return ConfigError(f"line {lineno}: cannot parse {line} (expected 'key = value' or a [section] header)",
                           file)
    return ConfigError(f"syntax error: {exc}", file)


def load(path):
    """Read and check the INI file at ``path``; raises ConfigError on any problem."""
    file = os.fspath(path)
    parser = _parser()
    try:
        with open(file, encoding="utf-8") as stream:
            parser.read_file(stream, source=file)
    except FileNotFoundError:
        raise ConfigError("file not found", file) from None
    except IsADirectoryError:
        raise ConfigError("is a directory, not a file", file) from None
    except PermissionError:
        raise ConfigError("cannot read: permission denied", file) from None
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror or exc}", file) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"not UTF-8 text (bad byte at offset {exc.start})", file) from None
    except configparser.Error as exc:
        raise _syntax_error(exc, file) from None
    return _build(parser, file, os.path.dirname(os.path.abspath(file)), path=file)


def from_dict(data):
    """Settings from ``{section: {key: value}}``, checked exactly like a file (shown as ``<dict>``).

    Values may be INI text or plain Python values: numbers, booleans, None (empty)
    and lists (joined with commas).
    """
    file = "<dict>"
    parser = _parser()
    sections = {}
    for section, values in data.items():
        if not isinstance(values, dict):
            raise ConfigError("expected a dict of key: value", file, str(section))
        sections[str(section)] = {str(key): _as_text(value) for key, value in values.items()}
    try:
        parser.read_dict(sections, source=file)
    except configparser.Error as exc:
        raise _syntax_error(exc, file) from None
    return _build(parser, file, os.getcwd(), path=None)


def _as_text(value):
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ", ".join(_as_text(item) for item in value)
    return str(value)


def _build(parser, file, base_dir, path):
    sections = {name: None for name in SECTIONS if name != PATTERN}
    static, names = [], {}
    for section in parser.sections():
        raw = {key: parser.get(section, key) for key in parser.options(section)}
        if section in sections:
            sections[section] = _parse_section(section, DECLARED[section], raw, file, base_dir)
            continue
        kind, colon, name = section.partition(":")
        if "." in section and not colon:  # a handler module's own settings
            declared = _declared_by_module(section, parser, file)
            sections[section] = _parse_section(section, declared, raw, file, base_dir)
            continue
        if not (colon and kind + ":NAME" == PATTERN):
            raise ConfigError(_unknown_section(section), file, section)
        name = name.strip()
        if not _BACKEND_NAME.fullmatch(name):
            raise ConfigError(f"bad backend name {name!r}: use [{kind}:NAME] where NAME is letters, digits, "
                              "'.', '_' or '-'", file, section)
        if name in names:
            raise ConfigError(f"backend name {name!r} is also used by [{names[name]}]", file, section)
        names[name] = section
        values = _parse_section(section, DECLARED[PATTERN], raw, file, base_dir)
        static.append(Section(f"{kind}:{name}", {"name": name, **values}))
    for section, values in sections.items():
        if values is None:
            sections[section] = _parse_section(section, DECLARED[section], {}, file, base_dir)
    for backend in static:
        for key, setting in DECLARED[PATTERN].items():
            if isinstance(setting.type, Inherit) and getattr(backend, key) is None:
                setattr(backend, key, sections[setting.type.section][key])
    settings = Settings(sections, static, path)
    for section in parser.sections():
        if "." in section and section in SECTIONS and section not in settings.handlers.modules:
            raise ConfigError(f"settings of handler module {section}, which [handlers] modules does not list",
                              file, section)
    for section, key, reason in cross_checks(settings):
        raise ConfigError(reason, file, section, key)
    return settings


def module_settings(module):
    """The settings a handler module outside glb declares in its ``SETTINGS`` tuple, by key.

    Each row is a ``Setting`` whose section is the module's own name. ValueError when malformed.
    """
    declared = {}
    for setting in getattr(module, "SETTINGS", ()):
        if not (isinstance(setting, Setting) and setting.section == module.__name__
                and setting.key.isidentifier() and setting.key not in declared):
            raise ValueError(f"SETTINGS must hold Setting({module.__name__!r}, key, type, default, doc) rows "
                             f"with distinct keys; got {setting!r}")
        declared[setting.key] = setting
    return declared


def module_defaults(module):
    """A handler module's declared settings at their defaults, as a Section (None if it declares none)."""
    declared = module_settings(module)
    if not declared:
        return None
    return Section(module.__name__, _parse_section(module.__name__, declared, {}, "<defaults>", os.getcwd()))


def _declared_by_module(section, parser, file):
    """The declarations for ``[section]``, a handler module's name: listed, importable, declaring SETTINGS."""
    modules_setting = DECLARED["handlers"]["modules"]
    text = parser.get("handlers", "modules", fallback=modules_setting.default)
    try:
        listed = modules_setting.type.parse(text.strip(), "")
    except ValueError:
        listed = ()  # [handlers] modules itself is reported when it is parsed
    if section not in listed:
        raise ConfigError(f"settings of handler module {section}, which [handlers] modules does not list", file, section)
    try:
        module = importlib.import_module(section)
    except Exception as exc:
        raise ConfigError(f"handler module {section} cannot be imported: {type(exc).__name__}: {exc}",
                          file, "handlers", "modules") from None
    try:
        declared = module_settings(module)
    except ValueError as exc:
        raise ConfigError(str(exc), file, section) from None
    if not declared:
        raise ConfigError(f"handler module {section} declares no settings (no SETTINGS in it)", file, section)
    return declared


def _parse_section(section, declared, raw, file, base_dir):
    for key in raw:
        if key not in declared:
            raise ConfigError(_unknown_key(key, declared), file, section, key)
    values = {}
    for key, setting in declared.items():
        text = raw.get(key, setting.default)
        if text is REQUIRED:
            raise ConfigError("required key is missing", file, section, key)
        if setting.default is REQUIRED and not text.strip():
            raise ConfigError("required, must not be empty", file, section, key)
        try:
            values[key] = setting.type.parse(text.strip(), base_dir)
        except ValueError as exc:
            raise ConfigError(str(exc), file, section, key) from None
    return values


def _unknown_key(key, declared):
    close = difflib.get_close_matches(key, declared, n=1)
    if close:
        return f"unknown key (did you mean {close[0]!r}?)"
    elsewhere = [f"[{section}]" for section, keys in DECLARED.items() if key in keys]
    if elsewhere:
        return f"unknown key here (it belongs in {' or '.join(elsewhere)})"
    return "unknown key"


def _unknown_section(section):
    known = [name for name in SECTIONS if name != PATTERN]
    if ":" in section:
        kind = section.partition(":")[0]
        if difflib.get_close_matches(kind, [PATTERN.partition(":")[0]], n=1):
            return f"unknown section (did you mean [{PATTERN}]?)"
    close = difflib.get_close_matches(section, known + [PATTERN], n=1)
    hint = f" (did you mean [{close[0]}]?)" if close else ""
    return f"unknown section{hint}; known: {', '.join(f'[{name}]' for name in SECTIONS)}"


# --------------------------------------------------------------------------- rendering

README_START = "<!-- settings:start -->"
README_END = "<!-- settings:end -->"


def _default_text(setting):
    if setting.default is REQUIRED:
        return "**required**"
    return f"`{setting.default}`" if setting.default else "*empty*"


def _cell(text):
    return text.replace("|", "\\|").replace("\n", " ")


def render_reference():
    """The Markdown settings reference: one table per section, from SETTINGS."""
    lines = [
        "<!-- Generated from glb/config.py by `python -m glb.config --write-readme README.md`;"
        " edit the declarations there, not this block. -->",
    ]
    for section, doc in SECTIONS.items():
        lines += ["", f"### `[{section}]`", "", doc, "",
                  "| key | type | default | description |", "|---|---|---|---|"]
        for setting in DECLARED[section].values():
            lines.append("| " + " | ".join(_cell(cell) for cell in (
                f"`{setting.key}`", setting.type.name, _default_text(setting), setting.doc)) + " |")
    return "\n".join(lines) + "\n"


def render_sample():
    """A sample INI with every setting commented out at its default (so it loads as the defaults)."""
    lines = [
        "# glb sample configuration, generated by `python -m glb.config --sample`.",
        "# Commented-out keys show their defaults; README.md has the settings reference.",
    ]
    for section, doc in SECTIONS.items():
        pattern = section == PATTERN
        lines += [""] + [f"# {line}" for line in textwrap.wrap(doc, 77)]
        lines.append(f"#[{section.replace('NAME', 'example')}]" if pattern else f"[{section}]")
        for setting in DECLARED[section].values():
            lines += [f"# {line}" for line in textwrap.wrap(f"{setting.doc} Type: {setting.type.name}.", 77)]
            value = setting.example if setting.example is not None else setting.default
            lines.append(f"#{setting.key} = {value}".rstrip())
    return "\n".join(lines) + "\n"


def readme_block(text):
    """The text between the README markers (stripped), or None when they are missing."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return None
    return text[start + len(README_START):end].strip()


def update_readme(path):
    """Rewrite the settings block of the README at ``path``; True when it changed.

    Raises ValueError when the file lacks the markers (in order).
    """
    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{path}: no {README_START} ... {README_END} block")
    new = text[:start] + README_START + "\n" + render_reference() + README_END + text[end + len(README_END):]
    if new == text:
        return False
    with open(path, "w", encoding="utf-8") as stream:
        stream.write(new)
    return True


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m glb.config", description="glb settings tools")
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--reference", action="store_true", help="print the Markdown settings reference")
    action.add_argument("--sample", action="store_true", help="print a sample config with every default")
    action.add_argument("--write-readme", metavar="README", help="rewrite the settings block of README")
    action.add_argument("--check", metavar="FILE", help="load FILE and report the first problem")
    args = parser.parse_args(argv)
    if args.reference:
        sys.stdout.write(render_reference())
    elif args.sample:
        sys.stdout.write(render_sample())
    elif args.write_readme:
        try:
            changed = update_readme(args.write_readme)
        except (OSError, ValueError) as exc:
            print(exc, file=sys.stderr)
            return 1
        print(f"{args.write_readme}: {'updated' if changed else 'already up to date'}")
    else:
        try:
            load(args.check)
        except ConfigError as exc:
            print(exc, file=sys.stderr)
            return 2
        print(f"{args.check}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
