"""One glb process: its Balancer, what signals do to it, and how it ends.

    SIGINT, SIGTERM   stop: no new connections, open sessions closed with 1001
    SIGHUP            reload the config in place (glb.reload); a bad one is refused
    SIGUSR2           upgrade: start a new glb on the same sockets, then drain (glb.handover)

Signal handlers only queue a command; the main greenlet carries them out one at
a time, so the hub never runs glb code from a signal and two reloads never
overlap. The upgrade runs in a greenlet this object owns (it waits for the new
process, then drains), so SIGTERM still stops at once while it runs.
"""

import logging
import signal

import gevent
from gevent.queue import Queue

from glb import __version__, handover, reload, systemd
from glb.errors import ConfigError, HandlerLoadError
from glb.listeners import InheritedListeners

log = logging.getLogger("glb")

STOP, RELOAD, UPGRADE, DRAINED = "stop", "reload", "upgrade", "drained"
SIGNALS = ((signal.SIGINT, STOP), (signal.SIGTERM, STOP), (signal.SIGHUP, RELOAD), (signal.SIGUSR2, UPGRADE))


class StartFailed(Exception):
    """glb could not start; ``exit_code`` and the one-line ``message`` say why."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class Process:
    """A running glb process; ``run`` returns its exit status."""

    def __init__(self, settings, start_demo=None):
        self.settings = settings
        self.start_demo = start_demo
        self.commands = Queue()
        self.balancer = None
        self.demo = None
        self.upgrade = None         # the greenlet starting a new glb and then draining, while it runs
        self.handed_over_to = None  # pid of the glb that took over the listeners

    def start(self):
        """Build and start the Balancer on inherited or new sockets; StartFailed on failure."""
        from glb.server import Balancer  # after the config is known to be good

        for signum, command in SIGNALS:  # from now on: a SIGHUP during start-up is queued, not fatal
            gevent.signal_handler(signum, self.commands.put, command)
        try:
            inherited = InheritedListeners.from_environ()
            self.balancer = Balancer(self.settings)
            self.balancer.start(inherited)
        except (ConfigError, HandlerLoadError) as exc:
            raise StartFailed(f"glb: {exc}", 2) from None
        except (OSError, ValueError) as exc:
            raise StartFailed(f"glb: cannot listen: {exc}", 1) from None
        if self.start_demo is not None:
            self.demo = self.start_demo(self.settings, self.balancer)

    def run(self):
        handed_over = handover.announce_ready()
        log.info("= glb %s ready (%d listener(s)%s); stop with Ctrl-C, reload with SIGHUP, upgrade with SIGUSR2",
                 __version__, len(self.balancer.servers), ", taken over from the previous glb" if handed_over else "")
        while True:
            command = self.commands.get()
            if command in (STOP, DRAINED):
                break
            if command == RELOAD:
                self.reload()
            elif command == UPGRADE:
                self.start_upgrade()
        self.stop()
        return 0

    # -- SIGHUP ------------------------------------------------------------------------------

    def reload(self):
        if self.handed_over_to is not None:
            log.warning("! reload ignored: this glb has handed over to pid %d (reload that one)",
                        self.handed_over_to)
            return
        systemd.reloading()
        try:
            reload.reload_and_log(self.balancer)
        except Exception:  # a glb bug: say so, keep serving
            log.exception("! reload failed; still running")
        systemd.notify("READY=1")

    # -- SIGUSR2 -----------------------------------------------------------------------------

    def start_upgrade(self):
        if self.upgrade is not None:
            log.warning("! upgrade ignored: one is already under way")
            return
        self.upgrade = gevent.spawn(self._upgrade)

    def _upgrade(self):
        balancer = self.balancer
        glb = balancer.settings.glb
        try:
            pid = handover.start_new(balancer, glb.upgrade_timeout)
        except handover.UpgradeFailed as exc:
            log.error("! upgrade failed; this glb keeps serving: %s", exc)
            self.upgrade = None
            return
        self.handed_over_to = pid
        if self.demo is not None:  # its backends keep serving this glb's sessions, registered nowhere else
            for backend in self.demo.backends:
                backend.agent.stop()
        channels = handover.hand_over(balancer)
        log.info("= upgrade: pid %d took over the listeners; %d control channel(s) sent there; "
                 "draining %d session(s) for up to %.0f s", pid, channels, len(balancer.connections),
                 glb.drain_timeout)
        closed = handover.drain(balancer, glb.drain_timeout, glb.drain_spread)
        log.info("= upgrade: drained (%d session(s) closed with 1001)", closed)
        self.commands.put(DRAINED)

    # -- stopping ----------------------------------------------------------------------------

    def stop(self):
        if self.upgrade is not None:
            self.upgrade.kill()
        if self.handed_over_to is None:
            systemd.notify("STOPPING=1")  # after a hand-over, the new process is the service
        log.info("= stopping: no new connections; closing open sessions with 1001")
        if self.demo is not None:
            self.demo.stop()
        self.balancer.stop()
        log.info("= stopped")
