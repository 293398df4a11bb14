"""Autobahn cases (kosoku) against real glb processes; run by ``tox -e autobahn``.

    python -m tests.autobahn            # every suite below
    python -m tests.autobahn own        # one suite

Suites:
  own     sections 1-7, 9, 10 against glb's own /glb/echo endpoint.
  relay   the same cases through glb to the demo backend, and to the same backend
          directly: glb must add no failure (every verdict the same as direct), and
          no case may fail through glb.
  server  kosoku as a fuzzing *server* behind glb (a static backend), driven by a
          websocket-client echo client through glb: tests the backend leg.

Every case must pass (OK, NON-STRICT or INFORMATIONAL); the exit status is 1
otherwise, with the failing cases listed. Everything runs on 127.0.0.1.
"""

import asyncio
import contextlib
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time

from kosoku import FailureError, run_fuzzingclient, run_fuzzingserver

SECTIONS = ["1.*", "2.*", "3.*", "4.*", "5.*", "6.*", "7.*", "9.*", "10.*"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@contextlib.contextmanager
def glb_process(extra_ini="", handlers=""):
    """A ``python -m glb`` on an ephemeral port; yields its port."""
    with tempfile.NamedTemporaryFile("w", suffix=".ini", delete=False) as ini:
        ini.write("[glb]\nlisten = 127.0.0.1:0\nmax_message_size = 67108864\n"
                  f"log_level = info\n[handlers]\nmodules = {handlers}\n" + extra_ini)
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


TOTALS = {"passed": 0, "failed": 0}


def summarise(name, results):
    TOTALS["passed"] += sum(1 for r in results if r.passed)
    TOTALS["failed"] += sum(1 for r in results if not r.passed)
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


@contextlib.contextmanager
def demo_backend():
    """``python -m glb.demo_backend`` on a free port, registering nowhere; yields its port."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "glb.demo_backend", "--port", str(port)], cwd=ROOT,
                            stderr=subprocess.DEVNULL)
    try:
        wait_listening(port)
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_listening(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def suite_relay():
    with demo_backend() as backend_port:
        direct = {r.case_id: r for r in run_cases(f"ws://127.0.0.1:{backend_port}/")}
        static = f"[backend:demo]\nurl = ws://127.0.0.1:{backend_port}\n"
        with glb_process(static) as port:
            relayed = run_cases(f"ws://127.0.0.1:{port}/")
    ok = summarise("through glb to the demo backend", relayed)
    summarise("the demo backend directly", list(direct.values()))
    changed = [(r.case_id, direct[r.case_id].behavior.value, r.behavior.value) for r in relayed
               if r.case_id in direct and r.behavior.value != direct[r.case_id].behavior.value]
    for case_id, before, after in changed:
        print(f"  {case_id}: direct {before}, through glb {after}")
    print(f"verdicts changed by glb: {len(changed)}")
    return ok and not changed and len(relayed) == len(direct)


def suite_server(handlers=""):
    """kosoku fuzzing server as glb's backend; an echo client drives every case through glb."""
    async def run():
        backend_port = free_port()
        async with run_fuzzingserver(SECTIONS, None, host="127.0.0.1", port=backend_port) as server:
            extra = f"[backend:fuzzer]\nurl = ws://127.0.0.1:{backend_port}\n"
            with glb_process(extra, handlers=handlers) as port:
                driver = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "tests.autobahn", "--drive", str(port), cwd=ROOT)
                await asyncio.wait_for(driver.wait(), timeout=600)
                return await server.get_result()
    try:
        results = asyncio.run(run())
    except FailureError as failure:
        results = failure.results
    mode = "decoded (handlers on both directions)" if handlers else "raw"
    return summarise(f"kosoku fuzzing server behind glb, {mode} relay", results)


def suite_server_decoded():
    return suite_server(handlers="tests.handler_passthrough")


def drive_echo_client(port, agent="glb"):
    """The Autobahn client protocol with glb's own client WebSocket: count, echo each case, report."""
    from gevent import monkey

    monkey.patch_all()
    from glb.websocket import connect

    base = f"ws://127.0.0.1:{port}"
    ws, _, _ = connect(f"{base}/getCaseCount", timeout=30)
    count = int(ws.receive())
    ws.close()
    for case in range(1, count + 1):
        try:
            ws, _, _ = connect(f"{base}/runCase?case={case}&agent={agent}", timeout=60,
                               max_message_size=64 << 20)
        except Exception as exc:  # the case's verdict records what went wrong
            print(f"  case {case}: could not connect: {exc}")
            continue
        while True:
            message = ws.receive()
            if message is None:
                break
            ws.send(message)
    ws, _, _ = connect(f"{base}/updateReports?agent={agent}", timeout=30)
    ws.close()


SUITES = {"own": suite_own, "relay": suite_relay, "server": suite_server,
          "server-decoded": suite_server_decoded}


def main(argv):
    if argv[:1] == ["--drive"]:
        return drive_echo_client(int(argv[1]))
    names = argv or list(SUITES)
    ok = True
    for name in names:
        ok = SUITES[name]() and ok
    print(f"autobahn: {TOTALS['passed']} passed, {TOTALS['failed']} failed")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
