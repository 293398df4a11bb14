"""``python -m glb.ctl URL COMMAND ...``: the admin API from a shell, no curl lines needed.

::

    python -m glb.ctl http://127.0.0.1:8080 backends
    python -m glb.ctl http://127.0.0.1:8080 drain web-3 --spread 30
    python -m glb.ctl http://127.0.0.1:8080 --token "$GLB_ADMIN_TOKEN" rebalance

The token comes from ``--token`` or the ``GLB_ADMIN_TOKEN`` environment variable.
Tables for people by default, the API's JSON with ``--json``. Exit status: 0 done,
1 the API refused (its error is printed), 2 bad usage, 3 glb could not be reached.
"""

import argparse
import json
import os
import sys
from urllib.parse import quote, urlencode

import requests

EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 1, 2, 3


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m glb.ctl", description="Control a running glb over its admin API.")
    parser.add_argument("url", help="glb's address, e.g. http://127.0.0.1:8080")
    parser.add_argument("--token", default=os.environ.get("GLB_ADMIN_TOKEN"),
                        help="[admin] token (default: $GLB_ADMIN_TOKEN)")
    parser.add_argument("--prefix", default="/glb/", help="glb's [glb] prefix (default /glb/)")
    parser.add_argument("--json", action="store_true", help="print the API's JSON answer")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for glb (default 10)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    commands.add_parser("backends", help="list backends: state, health, weight, sessions")
    one = commands.add_parser("backend", help="show one backend")
    one.add_argument("name")
    drain = commands.add_parser("drain", help="no new sessions for a backend; --spread closes its sessions")
    drain.add_argument("name")
    drain.add_argument("--spread", type=float, help="close its sessions (1012) at random moments within SECONDS")
    undrain = commands.add_parser("undrain", help="a drained backend takes new sessions again")
    undrain.add_argument("name")
    weight = commands.add_parser("weight", help="set a backend's weight (1..100)")
    weight.add_argument("name")
    weight.add_argument("weight", type=int)
    close = commands.add_parser("close", help="close every session of a backend")
    close.add_argument("name")
    _close_options(close)
    close.add_argument("--spread", type=float, default=0.0, help="within this many seconds (default 0)")
    commands.add_parser("rebalance", help="move sessions off backends above their share, now")
    commands.add_parser("reload", help="read the config file again and apply it, as SIGHUP does")
    sessions = commands.add_parser("sessions", help="list client sessions, oldest first")
    sessions.add_argument("--backend", help="only this backend's")
    sessions.add_argument("--offset", type=int, default=0)
    sessions.add_argument("--limit", type=int, default=100)
    close_session = commands.add_parser("close-session", help="close one client session by id")
    close_session.add_argument("id")
    _close_options(close_session)
    return parser


def _close_options(parser):
    parser.add_argument("--code", type=int, default=1012, help="close code (default 1012)")
    parser.add_argument("--reason", default="service restart", help='close reason (default "service restart")')


def request_for(args):
    """(method, path under admin/, JSON body or None) for the parsed command line."""
    name = quote(getattr(args, "name", "") or "", safe="")
    command = args.command
    if command == "backends":
        return "GET", "backends", None
    if command == "backend":
        return "GET", f"backends/{name}", None
    if command == "drain":
        return "POST", f"backends/{name}/drain", {} if args.spread is None else {"spread": args.spread}
    if command == "undrain":
        return "POST", f"backends/{name}/undrain", None
    if command == "weight":
        return "POST", f"backends/{name}/weight", {"weight": args.weight}
    if command == "close":
        return "POST", f"backends/{name}/close", {"code": args.code, "reason": args.reason,
                                                  "spread": args.spread}
    if command == "rebalance":
        return "POST", "rebalance", None
    if command == "reload":
        return "POST", "reload", None
    if command == "sessions":
        query = {"offset": args.offset, "limit": args.limit}
        if args.backend:
            query["backend"] = args.backend
        return "GET", "sessions?" + urlencode(query), None
    return "POST", f"sessions/{quote(args.id, safe='')}/close", {"code": args.code, "reason": args.reason}


def render(command, answer):
    """The answer as lines for a person."""
    if command == "backends":
        rows: list[tuple[str, ...]] = [("NAME", "STATE", "HEALTH", "WEIGHT", "SESSIONS", "ADDRESS")]
        for b in answer["backends"]:
            address = ", ".join(f"{x['host']}:{x['port']}" for x in b["bindings"])
            weight = str(b["weight"]) if b["effective_weight"] == b["weight"] else \
                f"{b['effective_weight']:g}/{b['weight']}"
            rows.append((b["name"], b["state"], b["health"], weight, str(b["sessions"]), address))
        return _table(rows)
    if command == "sessions":
        rows = [("ID", "BACKEND", "PEER", "AGE", "PATH")]
        rows += [(s["id"], s["backend"], s["peer"], f"{s['age']:.0f}s", s["path"]) for s in answer["sessions"]]
        shown = len(answer["sessions"])
        return _table(rows) + [f"{shown} of {answer['total']} session(s) from offset {answer['offset']}"]
    if command == "rebalance":
        moves = ", ".join(f"{name} {n}" for name, n in answer["from"].items()) or "nothing to move"
        return [f"moving {answer['moving']} session(s): {moves}"
                + (f" ({answer['too_young']} more once old enough)" if answer["too_young"] else "")]
    if command == "reload":
        return [f"reloaded {answer['reloaded']}: {answer['changes']}"]
    if "state" in answer:
        closing = f", closing {answer['closing']} session(s)" if answer.get("closing") else ""
        return [f"{answer['name']}: {answer['state']}, {answer['health']}, weight {answer['weight']}, "
                f"{answer['sessions']} session(s){closing}"]
    return [json.dumps(answer)]


def _table(rows):
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]


def main(argv=None):
    args = build_parser().parse_args(argv)
    method, path, body = request_for(args)
    url = args.url.rstrip("/") + "/" + args.prefix.strip("/") + "/admin/" + path
    headers = {"Authorization": f"Bearer {args.token}"} if args.token else {}
    try:
        response = requests.request(method, url, json=body, headers=headers, timeout=args.timeout)
    except requests.RequestException as exc:
        print(f"glb.ctl: cannot reach {args.url}: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    try:
        answer = response.json()
    except ValueError:
        print(f"glb.ctl: {url} answered {response.status_code} without JSON "
              "(is this glb, and is --prefix right?)", file=sys.stderr)
        return EXIT_REFUSED
    if response.status_code != 200:
        print(f"glb.ctl: {response.status_code}: {answer.get('error', answer)}", file=sys.stderr)
        return EXIT_REFUSED
    lines = [json.dumps(answer, indent=2)] if args.json else render(args.command, answer)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
