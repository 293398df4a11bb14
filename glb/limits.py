"""Connection limits as plain decisions, no sockets: counts per client address and token buckets.

``ConnectionLimits`` answers "may one more connection from this address open?"
(``[glb] max_connections``, ``max_connections_per_ip``) and counts it if so;
``HandshakeRate`` answers "may this address start another WebSocket handshake
now?" (``[glb] handshake_rate_per_ip`` with ``handshake_burst_per_ip``);
``origin_allowed`` checks a browser's ``Origin`` against ``[glb] allowed_origins``.
``glb.admission`` applies them at the server's accept seam and upgrade path.
"""

import ipaddress
import time
from urllib.parse import urlsplit

TOO_MANY = "max_connections reached"
TOO_MANY_FROM_IP = "max_connections_per_ip reached"


def client_key(ip):
    """The address a limit counts by: an IPv4-mapped IPv6 address as IPv4, any scope id dropped."""
    text = (ip or "").split("%", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return text
    if address.version == 6 and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class ConnectionLimits:
    """Open connections, in all and per address; 0 means no cap."""

    def __init__(self, max_total=0, max_per_ip=0):
        self.max_total, self.max_per_ip = max_total, max_per_ip
        self.total = 0
        self.per_ip = {}  # address -> open connections (addresses with none are removed)

    def admit(self, ip):
        """Count one more connection from ``ip`` and return None, or return why it may not open."""
        if self.max_total and self.total >= self.max_total:
            return TOO_MANY
        count = self.per_ip.get(ip, 0)
        if self.max_per_ip and count >= self.max_per_ip:
            return TOO_MANY_FROM_IP
        self.per_ip[ip] = count + 1
        self.total += 1
        return None

    def release(self, ip):
        """A connection counted by ``admit`` has closed."""
        count = self.per_ip.get(ip, 0)
        if count <= 0:
            return
        if count == 1:
            del self.per_ip[ip]
        else:
            self.per_ip[ip] = count - 1
        self.total -= 1


class HandshakeRate:
    """A token bucket per address: ``rate`` handshakes a second on average, ``burst`` at once.

    Buckets that have filled up again are forgotten whenever the table doubles,
    so memory follows the addresses active in the last ``burst / rate`` seconds.
    """

    def __init__(self, rate, burst, clock=time.monotonic):
        self.rate, self.burst, self.clock = rate, max(1, burst), clock
        self.buckets = {}  # address -> [tokens, when they were counted]
        self._prune_at = 1024

    def allow(self, ip):
        """True (and one token taken) if ``ip`` may start a handshake now; always True with rate 0."""
        if not self.rate:
            return True
        now = self.clock()
        bucket = self.buckets.get(ip)
        if bucket is None:
            if len(self.buckets) >= self._prune_at:
                self._prune(now)
            bucket = self.buckets[ip] = [float(self.burst), now]
        else:
            bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] < 1:
            return False
        bucket[0] -= 1
        return True

    def _prune(self, now):
        full = [ip for ip, (tokens, when) in self.buckets.items()
                if tokens + (now - when) * self.rate >= self.burst]
        for ip in full:
            del self.buckets[ip]
        self._prune_at = max(1024, 2 * len(self.buckets))


def normalise_origin(origin):
    """``scheme://host[:port]`` in lower case with the scheme's default port dropped; None if not an origin."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except (ValueError, AttributeError):
        return None
    if not parts.scheme or not parts.hostname or parts.path not in ("", "/") or parts.query:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == {"http": 80, "https": 443, "ws": 80, "wss": 443}.get(scheme):
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def origin_allowed(origin, allowed):
    """Whether an upgrade with this ``Origin`` (None: the header is absent) may proceed.

    ``allowed`` holds normalised origins; empty allows every origin. A request
    without ``Origin`` does not come from a browser page (the only client the
    check protects: a page of another site cannot omit it), so it passes.
    """
    if not allowed or origin is None:
        return True
    return normalise_origin(origin) in allowed
