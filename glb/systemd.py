"""systemd: socket activation (``LISTEN_FDS``) and readiness notifications (``sd_notify``).

Both follow the documented protocol, in a few lines and without libsystemd:

- ``listen_fds()`` returns the listening sockets systemd passed (fds 3, 4, ...
  when ``LISTEN_PID`` is this process) and removes the variables, so a process
  glb starts never takes them for its own.
- ``notify("READY=1")`` sends one datagram to ``NOTIFY_SOCKET`` (a path, or an
  abstract name starting with ``@``); without that variable it does nothing.
  glb sends ``READY=1`` when its listeners accept, ``RELOADING=1`` (with
  ``MONOTONIC_USEC``) then ``READY=1`` around a reload, ``STOPPING=1`` when it
  stops, and ``MAINPID=<pid>`` + ``READY=1`` from a new process that took over
  (SIGUSR2), which needs ``NotifyAccess=all`` in the unit.
"""

import logging
import os
import socket
import time

log = logging.getLogger("glb.systemd")

LISTEN_FDS_START = 3  # SD_LISTEN_FDS_START
_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds(environ=None):
    """The sockets systemd passed to this process (empty when it passed none); unsets the variables."""
    environ = os.environ if environ is None else environ
    try:
        pid, count = int(environ.get("LISTEN_PID", "")), int(environ.get("LISTEN_FDS", ""))
    except ValueError:
        return []
    for name in _LISTEN_VARIABLES:
        environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        sock.set_inheritable(False)
        sockets.append(sock)
    return sockets


def notify(*states, environ=None):
    """Send ``states`` (``"READY=1"``, ...) to systemd; False when not run by systemd or on failure."""
    address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall("\n".join(states).encode("utf-8"))
    except OSError as exc:
        log.warning("! cannot notify systemd at %s: %s", address.replace("\0", "@"), exc)
        return False
    return True


def reloading():
    """``RELOADING=1`` with the ``MONOTONIC_USEC`` that ``Type=notify-reload`` asks for."""
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")
