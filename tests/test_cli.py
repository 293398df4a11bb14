"""The command line, run as users run it: a real ``python -m glb`` process."""

import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from tests.support import recv_close, shipped_glb, ws_connect

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_glb(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "glb", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_check_shipped_config_exits_0():
    result = run_glb("--check", "conf/lb.ini")
    assert result.returncode == 0, result.stderr
    assert "valid" in result.stdout


def test_unknown_key_exits_2_naming_file_section_and_key(tmp_path):
    path = tmp_path / "bad.ini"
    path.write_text("[glb]\nlisten = 127.0.0.1:0\nbalancng = random\n")
    result = run_glb("--check", str(path))
    assert result.returncode == 2
    line = result.stderr.strip()
    assert str(path) in line and "[glb]" in line and "balancng" in line
    assert len(line.splitlines()) == 1


def test_missing_file_exits_2(tmp_path):
    result = run_glb("--check", str(tmp_path / "nope.ini"))
    assert result.returncode == 2
    assert "nope.ini" in result.stderr


def test_bad_handler_module_exits_2(tmp_path):
    path = tmp_path / "h.ini"
    path.write_text("[handlers]\nmodules = no_such_module_anywhere\n")
    result = run_glb("--check", str(path))
    assert result.returncode == 2
    assert "no_such_module_anywhere" in result.stderr


def test_help_describes_usage():
    result = run_glb("--help")
    assert result.returncode == 0
    assert "--check" in result.stdout and "config" in result.stdout


@pytest.mark.timeout(60)
def test_runs_logs_listener_and_stops_cleanly_on_sigterm(tmp_path):
    path = tmp_path / "run.ini"
    path.write_text("[glb]\nlisten = 127.0.0.1:0\nshutdown_timeout = 5\n"
                    "[handlers]\nmodules = glb.handlers.access_log\n")
    proc = subprocess.Popen([sys.executable, "-m", "glb", str(path)], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True)
    try:
        port = None
        lines = []
        for line in proc.stderr:
            lines.append(line)
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            if match:
                port = int(match.group(1))
            if "ready" in line:
                break
        assert port, "".join(lines)
        ws = ws_connect(f"ws://127.0.0.1:{port}/glb/echo")
        ws.send("ping")
        assert ws.recv() == "ping"
        proc.send_signal(signal.SIGTERM)
        assert recv_close(ws) == (1001, "going away")
        ws.send_close(1001)
        ws.shutdown()
        assert proc.wait(timeout=20) == 0
        rest = proc.stderr.read()
        assert "stopped" in rest
        assert re.search(r"c\d+ 127\.0\.0\.1:\d+ own /glb/echo .*code=1001", "".join(lines) + rest)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


@pytest.mark.timeout(60)
def test_shipped_config_runs_two_demo_backends_behind_glb(tmp_path):
    """conf/lb.ini as shipped, but on a free port: both demo backends answer through glb."""
    with shipped_glb(tmp_path) as glb:
        answered = set()
        for _ in range(40):  # least_connections with random ties: both answer well within 40 sessions
            ws = ws_connect(f"{glb.url}/demo")
            ws.send("whoami")
            answered.add(ws.recv())
            ws.close()
            if len(answered) == 2:
                break
        assert len(answered) == 2
        page = urllib.request.urlopen(f"http://127.0.0.1:{glb.port}/", timeout=5).read()
        assert b"<title>glb demo" in page
