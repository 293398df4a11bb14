"""GET /glb/status: what glb holds, for operators; only for peers allowed to run backends."""

import json
import re
import urllib.error
import urllib.request

import pytest

from tests.backends import ScriptedBackend, started
from tests.support import base_url, raw_http, running_glb, ws_connect


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


@pytest.mark.parametrize("path", ["/glb/status", "/glb/metrics", "/glb/"])
def test_operator_views_answer_head_like_get_and_refuse_other_methods(path):
    with running_glb() as glb:
        address = glb.addresses[0]
        got = raw_http(address, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and body
        length = re.search(rb"(?im)^content-length: *(\d+)", head).group(1)
        headed = raw_http(address, f"HEAD {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head_only, _, nothing = headed.partition(b"\r\n\r\n")
        assert head_only.startswith(b"HTTP/1.1 200") and nothing == b""
        # the metrics body changes as it is read (request counts), the others do not
        if path != "/glb/metrics":
            assert re.search(rb"(?im)^content-length: *(\d+)", head_only).group(1) == length
        else:
            assert int(re.search(rb"(?im)^content-length: *(\d+)", head_only).group(1)) > 0
        posted = raw_http(address, f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n"
                                   "Connection: close\r\n\r\n".encode())
        assert posted.startswith(b"HTTP/1.1 405") and re.search(rb"(?im)^allow: GET, HEAD\r$", posted)
