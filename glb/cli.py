"""Command line: run glb in the foreground, or ``--check`` a config and its handler modules.

Exit status: 0 on a clean stop or a good check, 2 for a bad config or handler
module (one line naming the file, section, key and reason), 1 for anything else.
"""

import argparse
import logging
import sys

from glb import __version__, config, handover
from glb.errors import ConfigError, HandlerLoadError
from glb.handlers import inspect_module

log = logging.getLogger("glb")

EXIT_BAD_CONFIG = 2


def build_parser():
    parser = argparse.ArgumentParser(
        prog="glb",
        description="WebSocket and HTTP load balancer. Runs in the foreground until SIGINT or "
                    "SIGTERM, then closes open sessions with 1001 \"going away\".",
        epilog="Settings reference: README.md. Example: python -m glb conf/lb.ini")
    parser.add_argument("config", help="path of the INI config file (for example conf/lb.ini)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config and handler modules, then exit 0 (good) or 2 (bad)")
    parser.add_argument("--version", action="version", version=f"glb {__version__}")
    return parser


def setup_logging(level):
    logging.basicConfig(level=getattr(logging, level.upper()), stream=sys.stderr,
                        # the pid tells the old glb's lines from the new one's during an upgrade
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s %(message)s")


def check(settings):
    """Import every handler module and report unknown ``on_*`` names; raise on failure."""
    warnings = []
    for name in settings.handlers.modules:
        warnings.extend(inspect_module(name, settings)[2])
    return warnings


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        settings = config.load(args.config)
        setup_logging(settings.glb.log_level)
        warnings = check(settings)
    except (ConfigError, HandlerLoadError) as exc:
        handover.announce_failure(f"glb: {exc}")  # when a running glb started this one (SIGUSR2)
        print(f"glb: {exc}", file=sys.stderr)
        sys.exit(EXIT_BAD_CONFIG)
    for warning in warnings:
        log.warning("%s", warning)
    if args.check:
        print(f"glb: {args.config} is valid")
        sys.exit(0)
    sys.exit(run(settings))


def run(settings):
    from glb.process import Process, StartFailed

    process = Process(settings, start_demo=start_demo)
    try:
        process.start()
    except StartFailed as exc:
        handover.announce_failure(exc)
        print(exc, file=sys.stderr)
        return exc.exit_code
    return process.run()


def start_demo(settings, balancer):
    """Start the ``[demo]`` backends, if the config asks for them."""
    if not settings.demo.backends:
        return None
    if not balancer.addresses:
        log.warning("[demo] backends need a plain [glb] listen address to register on; none started")
        return None
    from glb.demo_backend import DemoFleet

    fleet = DemoFleet(settings.demo.backends, balancer.addresses[0], token=settings.backends.token or None)
    fleet.start()
    return fleet
