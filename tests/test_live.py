"""The status page and its live feed, over real sockets (the browser test drives the page itself)."""

import json
import urllib.error
import urllib.request

import pytest

from tests.backends import ScriptedBackend, started
from tests.support import RawClient, base_url, running_glb, ws_connect


def test_page_is_served_with_the_status_access_rule():
    with running_glb() as glb:
        with urllib.request.urlopen(base_url(glb, "http") + "/glb/", timeout=5) as answer:
            assert answer.headers["Content-Type"] == "text/html; charset=utf-8"
            page = answer.read()
        assert b"status/live" in page and b"<svg" in page
        assert b" src=" not in page and b"<link" not in page and b"@import" not in page  # nothing from elsewhere
    with running_glb(backends={"allow": "10.0.0.0/8", "token": "s3cret"}) as glb:
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(base_url(glb, "http") + "/glb/", timeout=5)
        assert refused.value.code == 401
        assert RawClient(glb.addresses[0], path="/glb/status/live").status == 401


def test_feed_sends_hello_then_deltas_every_second():
    backend = ScriptedBackend()
    with started(backend), running_glb(**{"backend:one": backend.static_section()}) as glb:
        live = ws_connect(base_url(glb) + "/glb/status/live")
        hello = json.loads(live.recv())
        assert hello["type"] == "hello" and hello["listeners"] == ["http://%s:%s" % glb.addresses[0]]
        assert hello["backends"]["one"]["state"] == "ready" and hello["backends"]["one"]["sessions"] == 0
        client = ws_connect(base_url(glb) + "/app")
        for _ in range(5):
            client.send("hi")
            assert client.recv() == "hi"
        for _ in range(5):  # bounded: the first tick sampled after the five messages (normally the first)
            tick = json.loads(live.recv())
            row = tick["backends"].get("one")
            if row and row["figures"]["messages_to_backend"] == 5:
                break
        assert tick["type"] == "tick" and tick["totals"]["connections"]["client"] == 1
        assert row["sessions"] == 1 and row["figures"]["messages_to_backend"] == 5
        assert row["rates"]["messages_to_backend"] > 0
        assert tick["point"][1] == 1  # [time, client sessions, messages/s] for the chart
        for _ in range(3):  # nothing happens any more: once the rates are back at 0 the row is not resent
            quiet = json.loads(live.recv())
            if not quiet["backends"]:
                break
        assert quiet["backends"] == {} and quiet["gone"] == []
        client.close()
        live.close()
