"""GET /glb/status: what glb holds, for operators; only for peers allowed to run backends."""

import json
import urllib.error
import urllib.request

import pytest

from tests.backends import ScriptedBackend, started
from tests.support import base_url, running_glb, ws_connect


def get(balancer, token=None):
    request = urllib.request.Request(base_url(balancer, "http") + "/glb/status")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as answer:
        return answer.status, json.loads(answer.read())


def test_status_lists_backends_and_open_connections():
    backend = ScriptedBackend()
    with started(backend), running_glb(**{"backend:one": backend.static_section()}) as glb:
        ws = ws_connect(base_url(glb) + "/app")
        ws.send("x")
        assert ws.recv() == "x"
        status, body = get(glb)
        assert status == 200
        assert body["connections"]["client"] == 1
        (entry,) = body["backends"]
        assert (entry["guid"], entry["state"], entry["static"], entry["relayed"]) == ("one", "ready", True, 1)
        assert entry["accepts_clients"] is True
        assert entry["bindings"] == [{"host": "127.0.0.1", "port": backend.port, "ssl": False}]
        assert body["listeners"] == ["http://%s:%s" % glb.addresses[0]]
        ws.close()


def test_status_is_refused_outside_the_allow_list_without_the_token():
    with running_glb(backends={"allow": "10.0.0.0/8", "token": "s3cret"}) as glb:
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(glb)
        assert refused.value.code == 401
        status, body = get(glb, token="s3cret")
        assert status == 200 and body["backends"] == []
