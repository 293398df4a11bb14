"""``python -m glb.ctl``: a real child process against a real glb with registered backends."""

import json
import subprocess
import sys

import pytest

from glb.registry import DRAINING, READY
from tests.support import base_url
from tests.test_admin import TOKEN, two_backends


def ctl(balancer, *args, token=None):
    command = [sys.executable, "-m", "glb.ctl", base_url(balancer, "http")]
    if token:
        command += ["--token", token]
    return subprocess.run(command + list(args), capture_output=True, text=True, timeout=30)


@pytest.mark.timeout(60)
def test_ctl_drives_the_admin_api():
    with two_backends(sessions=4, admin={"token": TOKEN, "allow": ""}) as (balancer, _, fleet, _r):
        refused = ctl(balancer, "drain", "blue")
        assert refused.returncode == 1 and "401" in refused.stderr
        assert balancer.registry.get("blue").state == READY

        listed = ctl(balancer, "backends", token=TOKEN)
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split() == ["NAME", "STATE", "HEALTH", "WEIGHT", "SESSIONS", "ADDRESS"]
        assert sorted(line.split()[0] for line in lines[1:]) == ["blue", "green"]

        drained = ctl(balancer, "drain", "blue", "--spread", "0", token=TOKEN)
        assert drained.returncode == 0 and drained.stdout.startswith("blue: draining")
        assert balancer.registry.get("blue").state == DRAINING
        fleet.wait_for(lambda: fleet.by_backend() == {"green": 4}, 10, "every client on green")

        weight = ctl(balancer, "--json", "weight", "green", "7", token=TOKEN)
        assert json.loads(weight.stdout)["weight"] == 7

        sessions = ctl(balancer, "sessions", "--backend", "green", token=TOKEN)
        assert sessions.stdout.splitlines()[-1] == "4 of 4 session(s) from offset 0"

        unknown = ctl(balancer, "undrain", "nobody", token=TOKEN)
        assert unknown.returncode == 1 and "404" in unknown.stderr and "nobody" in unknown.stderr


def test_ctl_says_when_glb_cannot_be_reached():
    result = subprocess.run([sys.executable, "-m", "glb.ctl", "http://127.0.0.1:9", "--timeout", "2", "backends"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3 and "cannot reach" in result.stderr
