"""Listening sockets glb did not bind itself: handed over by the glb it replaces, or passed by systemd.

A listener is named by its scheme and the address as configured
(``http://127.0.0.1:8080``, ``https://[::1]:8443``; port 0 stays 0), so a new
process finds the very socket the old one bound for the same line of the
config, even one the system gave a free port. The hand-over names them in one
environment variable::

    GLB_LISTENERS=http://127.0.0.1:0=5,https://[::1]:8443=6

Sockets from systemd carry no name: one is taken by a listener whose configured
address is the socket's bound address. A socket no listener takes is closed
with a warning (a listener removed from the config, or a ``ListenStream`` that
matches no ``listen``).
"""

import logging
import os
import socket

from glb import systemd

log = logging.getLogger("glb.listeners")

ENV = "GLB_LISTENERS"


def listener_name(scheme, address):
    host, port = address[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def encode(named_fds):
    """``GLB_LISTENERS`` text for ``[(name, fd), ...]``."""
    return ",".join(f"{name}={fd}" for name, fd in named_fds)


def decode(text):
    """``{name: fd}`` from ``GLB_LISTENERS`` text; ValueError for anything malformed."""
    named = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, fd = item.rpartition("=")
        if not sep or "://" not in name or not fd.isdigit():
            raise ValueError(f"{ENV}: expected scheme://host:port=fd, got {item!r}")
        named[name] = int(fd)
    return named


class InheritedListeners:
    """The sockets this process inherited; ``take`` hands each to the listener it belongs to."""

    def __init__(self, named=None, unnamed=()):
        self.named = dict(named or {})  # listener name -> socket (from the previous glb)
        self.unnamed = list(unnamed)  # sockets from systemd, matched by bound address

    @classmethod
    def from_environ(cls, environ=None):
        """What the previous glb (``GLB_LISTENERS``) and systemd (``LISTEN_FDS``) passed; unsets both."""
        environ = os.environ if environ is None else environ
        text = environ.pop(ENV, "")
        named = {}
        for name, fd in decode(text).items():
            sock = socket.socket(fileno=fd)
            sock.set_inheritable(False)  # until a hand-over passes it on again
            named[name] = sock
        return cls(named, systemd.listen_fds(environ))

    def __bool__(self):
        return bool(self.named or self.unnamed)

    def take(self, scheme, address):
        """The inherited socket for the listener ``scheme`` on configured ``address``, or None."""
        sock = self.named.pop(listener_name(scheme, address), None)
        if sock is not None:
            return sock
        for sock in self.unnamed:
            if _same_address(sock.getsockname(), address):
                self.unnamed.remove(sock)
                return sock
        return None

    def close_rest(self):
        """Close every socket no listener took, saying which."""
        for name, sock in self.named.items():
            log.warning("= inherited listener %s is not in the config any more; closed", name)
            sock.close()
        for sock in self.unnamed:
            log.warning("= socket %s from systemd matches no listen address in the config; closed",
                        listener_name("tcp", sock.getsockname()))
            sock.close()
        self.named, self.unnamed = {}, []


def _same_address(bound, configured):
    host, port = configured[:2]
    return port != 0 and bound[1] == port and bound[0] == host
