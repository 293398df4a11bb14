"""Autobahn cases (kosoku) against real glb processes; run by ``tox -e autobahn``.

    python -m tests.autobahn            # every suite below
    python -m tests.autobahn own        # one suite

Suites:
  own   sections 1-7, 9, 10 against glb's own /glb/echo endpoint.

Every case must pass (OK, NON-STRICT or INFORMATIONAL); the exit status is 1
otherwise, with the failing cases listed. Everything runs on 127.0.0.1.
"""

import asyncio
import contextlib
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from kosoku import FailureError, run_fuzzingclient

SECTIONS = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def glb_process(extra_ini=""):
    """A ``python -m glb`` on an ephemeral port; yields its port."""
    with tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False) as ini:
        ini.write("[glb]\nlisten = 127.0.0.1:0\nmax_message_size = 67108864\n"
                  "log_level = info\n[handlers]\nmodules =\n" + extra_ini)
    proc = subprocess.Popen([sys.executable, "-m", "glb", ini.name], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = _wait_for_port(proc)
        # keep draining glb's log so it never blocks on a full pipe
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        os.unlink(ini.name)


def _wait_for_port(proc, timeout=20):
    deadline = time.monotonic() + timeout
    for line in proc.stderr:
        match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
        if match:
            return int(match.group(1))
        if time.monotonic() > deadline:
            break
    raise RuntimeError("glb did not start")


def run_cases(url, cases=SECTIONS):
    try:
        return asyncio.run(run_fuzzingclient(url, cases, concurrency=4))
    except FailureError as failure:
        return failure.results


def summarise(name, results):
    verdicts = {}
    for result in results:
        verdicts[result.behavior.value] = verdicts.get(result.behavior.value, 0) + 1
    failed = [r for r in results if not r.passed]
    print(f"{name}: {len(results)} cases, verdicts {verdicts}, not passed {len(failed)}")
    for result in failed:
        print(f"  {result.case_id}: {result.behavior.value} / {result.behavior_close.value} "
              f"{result.description[:80]}")
    return not failed and bool(results)


def suite_own():
    with glb_process() as port:
        return summarise("own /glb/echo", run_cases(f"ws://127.0.0.1:{port}/glb/echo"))


SUITES = {"own": suite_own}


def main(argv):
    names = argv or list(SUITES)
    ok = True
    for name in names:
        ok = SUITES[name]() and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
