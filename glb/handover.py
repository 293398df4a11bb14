"""Zero-downtime upgrade (SIGUSR2): hand the listening sockets to a new glb, then drain.

The old process's side, in order::

    start_new()   run the same command line again, passing every listening socket
                  (GLB_LISTENERS, see glb.listeners) and the write end of a pipe
                  (GLB_READY_FD); wait up to [glb] upgrade_timeout for one line on it:
                    "READY <pid>"    the new glb accepts on the same sockets
                    "FAILED <why>"   it could not start (bad config, ...): UpgradeFailed
                    end of pipe      it died first: UpgradeFailed with its exit status
                  a new glb that stays silent is stopped; the old one carries on either way
    hand_over()   stop accepting (the sockets stay open in the new process, so no client
                  is refused), close control channels with 1012 so backends register
                  with the new glb at once
    drain()       keep relaying until the sessions end, at most [glb] drain_timeout, then
                  close what is left with 1001 spread over [glb] drain_spread (glb.spread)

The new process's side is ``announce_ready`` / ``announce_failure``: one line on
the pipe, and ``MAINPID`` + ``READY=1`` to systemd, whose main process it now is.
"""

import logging
import os
import sys
import time

import gevent
import gevent.os
import gevent.subprocess

from glb import listeners, spread, systemd
from glb.connection import CONTROL
from glb.errors import CloseCode, GlbError

log = logging.getLogger("glb.handover")

READY_FD_ENV = "GLB_READY_FD"
_MAX_LINE = 4096


class UpgradeFailed(GlbError):
    """The new glb did not start; the reason is for the log."""


def command_line():
    """The command line this process was started with, with this very interpreter."""
    return [sys.executable, *sys.orig_argv[1:]]


def start_new(balancer, timeout):
    """Start a new glb on this glb's listening sockets; its pid once it is ready, else UpgradeFailed."""
    named_fds = [(listeners.listener_name(server.scheme, server.configured), server.socket.fileno())
                 for server in balancer.servers]
    read_fd, write_fd = os.pipe()
    env = dict(os.environ, **{listeners.ENV: listeners.encode(named_fds), READY_FD_ENV: str(write_fd)})
    try:
        proc = gevent.subprocess.Popen(command_line(), env=env, close_fds=True,
                                       pass_fds=[write_fd, *(fd for _, fd in named_fds)])
    except OSError as exc:
        os.close(read_fd)
        raise UpgradeFailed(f"cannot start {command_line()[0]}: {exc}") from None
    finally:
        os.close(write_fd)
    log.info("= upgrade: started new glb, pid %d; waiting up to %.0f s for it to be ready", proc.pid, timeout)
    try:
        with gevent.Timeout(timeout, False):
            line = _read_line(read_fd)
            if line.startswith("READY"):
                return proc.pid
            if line.startswith("FAILED "):
                raise UpgradeFailed(f"new glb (pid {proc.pid}) did not start: {line[len('FAILED '):]}")
            raise UpgradeFailed(f"new glb (pid {proc.pid}) exited with status {_exit_status(proc)} "
                                "before it was ready")
        _stop(proc)
        raise UpgradeFailed(f"new glb (pid {proc.pid}) was not ready within {timeout:.0f} s; stopped it")
    except gevent.GreenletExit:  # this glb is stopping: so does the one it was starting
        _stop(proc)
        raise
    finally:
        os.close(read_fd)


def _read_line(fd):
    """The first line written to the pipe ``fd`` ("" if it closed first), without blocking the hub."""
    os.set_blocking(fd, False)
    data = b""
    while b"\n" not in data and len(data) < _MAX_LINE:
        chunk = gevent.os.nb_read(fd, _MAX_LINE)
        if not chunk:
            break
        data += chunk
    return data.partition(b"\n")[0].decode("utf-8", "replace").strip()


def _exit_status(proc):
    try:
        return proc.wait(timeout=5)
    except gevent.subprocess.TimeoutExpired:
        _stop(proc)
        return "unknown (it closed the pipe but kept running; stopped it)"


def _stop(proc):
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except gevent.subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


def hand_over(balancer):
    """Stop accepting and send the control channels to the new glb; sessions keep relaying."""
    for server in list(balancer.servers):
        server.close()  # only this process's descriptor: the new glb accepts on the same socket
    balancer.servers = []
    for part in (balancer.health, balancer.rebalancer):  # the pool is the new glb's to watch and balance
        part.stop()
    # HTTP clients' next requests go to the new glb: each kept-alive connection ends after its
    # current response, an idle one now (the backends that registered here are leaving)
    balancer.handed_over = True
    balancer.http_proxy.end_idle_clients()
    channels = [conn for conn in balancer.connections.values() if conn.kind == CONTROL]
    for conn in channels:
        try:
            conn.close(CloseCode.SERVICE_RESTART, "glb restarting: register again")
        except Exception:  # a channel already broken is closed as far as we care
            log.debug("= %s close failed", conn.id, exc_info=True)
    return len(channels)


def drain(balancer, timeout, window):
    """Let the open sessions end by themselves for up to ``timeout`` s, then close the rest with
    1001 spread over ``window`` s (run it in a greenlet you own: it takes that long). Returns
    how many were closed by glb."""
    deadline = time.monotonic() + timeout
    while balancer.connections and time.monotonic() < deadline:
        gevent.sleep(min(0.25, max(0.0, deadline - time.monotonic())))
    remaining = list(balancer.connections.values())
    if not remaining:
        return 0
    log.info("= drain: closing %d remaining session(s) with 1001 over %.1f s", len(remaining), window)
    return spread.close_spread(remaining, CloseCode.GOING_AWAY, "going away", window,
                               is_open=lambda conn: not conn.websocket.closed)


# -- the new process's side ------------------------------------------------------------------------

def announce_ready():
    """Tell the glb that started this one (if any) and systemd that this process now serves."""
    handed_over = _write_parent(f"READY {os.getpid()}")
    if handed_over:
        systemd.notify(f"MAINPID={os.getpid()}", "READY=1")
    else:
        systemd.notify("READY=1")
    return handed_over


def announce_failure(reason):
    """Tell the glb that started this one (if any) why this one could not start."""
    return _write_parent("FAILED " + " ".join(str(reason).split()))


def _write_parent(line):
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return False
    try:
        os.write(int(fd), (line + "\n").encode("utf-8"))
        os.close(int(fd))
    except (OSError, ValueError):
        return False
    return True
