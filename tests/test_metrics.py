"""GET /glb/metrics: what real clients did through a real glb, counted exactly, in both relay modes."""

import os
import urllib.error
import urllib.request

import pytest

from glb.metrics import METRICS, render_names
from glb.stats import Histogram
from tests.backends import ScriptedBackend, started
from tests.support import base_url, RawClient, Recorder, running_glb, scrape, value, wait_for, ws_connect
from tests.control_peer import received, register

K = 25  # messages each way per test
PAYLOAD = "m" * 40  # one short frame: 2 header bytes (+4 mask from a client)


def echo_k_messages(glb):
    ws = ws_connect(base_url(glb) + "/app")
    for i in range(K):
        ws.send(PAYLOAD)
        assert ws.recv() == PAYLOAD
    return ws


@pytest.mark.parametrize("handlers", [None, ["tests.handler_passthrough"]], ids=["raw", "decoded"])
def test_messages_bytes_and_closes_match_what_the_client_did(handlers):
    backend = ScriptedBackend()
    with started(backend), running_glb(handler_modules=handlers,
                                       **{"backend:one": backend.static_section()}) as glb:
        ws = echo_k_messages(glb)
        live = scrape(glb)  # while the session is open: read from the session itself
        assert value(live, "glb_ws_messages_total", backend="one", direction="to_backend") == K
        assert value(live, "glb_ws_messages_total", backend="one", direction="to_client") == K
        assert value(live, "glb_ws_bytes_total", backend="one", direction="to_backend") == K * (6 + len(PAYLOAD))
        assert value(live, "glb_ws_bytes_total", backend="one", direction="to_client") == K * (2 + len(PAYLOAD))
        assert value(live, "glb_connections", kind="client") == 1
        assert value(live, "glb_backend_sessions", backend="one") == 1
        ws.close(status=4001, reason=b"bye")  # masked close: 6 + 2 + 3 bytes; echoed unmasked: 2 + 2 + 3
        ended = wait_for(lambda: (s := scrape(glb)) and value(s, "glb_backend_sessions_total", backend="one")
                         and s)
        # the session's figures were folded into the backend's totals when it ended
        assert value(ended, "glb_ws_messages_total", backend="one", direction="to_backend") == K
        assert value(ended, "glb_ws_messages_total", backend="one", direction="to_client") == K
        assert value(ended, "glb_ws_bytes_total", backend="one", direction="to_backend") == K * (6 + 40) + 11
        assert value(ended, "glb_ws_bytes_total", backend="one", direction="to_client") == K * (2 + 40) + 7
        assert value(ended, "glb_ws_closes_total", code="4001", closed_by="client") == 1
        assert value(ended, "glb_session_duration_seconds_count") == 1
        assert value(ended, "glb_connections", kind="client") == 0
        assert value(ended, "glb_connections_total", kind="client") == 1


def test_closes_by_backend_and_by_glb_are_counted_apart():
    def close_at_once(ws, environ):
        ws.receive()
        ws.close(4100, "done")

    closing, echoing = ScriptedBackend(serve=close_at_once), ScriptedBackend()
    with started(closing, echoing), running_glb(
            glb={"max_message_size": 1000, "balancing": "round_robin"},
            **{"backend:closing": closing.static_section(), "backend:echo": echoing.static_section()}) as glb:
        for _ in range(2):  # round robin: one session on each backend
            ws = ws_connect(base_url(glb) + "/app")
            ws.send("x")
            if ws.recv() == "x":  # the echo backend: now a message over the limit
                ws.send_binary(b"y" * 2000)
                with pytest.raises(Exception):
                    while True:
                        ws.recv()
            ws.close()
        samples = wait_for(lambda: (s := scrape(glb))
                           and value(s, "glb_session_duration_seconds_count") == 2 and s)
        assert value(samples, "glb_ws_closes_total", code="4100", closed_by="backend") == 1
        assert value(samples, "glb_ws_closes_total", code="1009", closed_by="glb") == 1


def test_backends_and_failures_are_exposed():
    backend = ScriptedBackend()
    with started(backend), running_glb(glb={"backend_retries": 0, "balancing": "round_robin"},
                                       backends={"max_fails": 1}, **{
            "backend:up": backend.static_section(),
            "backend:down": {"url": "ws://127.0.0.1:9", "weight": 3}}) as glb:
        statuses = []
        for _ in range(4):  # round robin: "down" is picked within two; it refuses TCP, so that client gets 502
            client = RawClient(glb.addresses[0], path="/app")
            statuses.append(client.status)
            client.close()
        assert statuses.count(502) == 1  # then passive health checks took "down" out of the pool
        samples = scrape(glb)
        assert value(samples, "glb_backend_up", backend="up") == 1
        assert value(samples, "glb_backend_state", backend="up", state="ready") == 1
        assert value(samples, "glb_backend_state", backend="up", state="draining") == 0
        assert value(samples, "glb_backend_weight", backend="down") == 3
        assert value(samples, "glb_backend_healthy", backend="down") == value(samples, "glb_backend_up",
                                                                              backend="down") == 0
        assert value(samples, "glb_backend_healthy", backend="up") == 1
        failures = value(samples, "glb_backend_connect_failures_total", backend="down")
        refused = value(samples, "glb_handshake_rejections_total", status="502")
        assert failures == refused == statuses.count(502)


def test_handshake_rejections_and_http_requests_by_status():
    with running_glb() as glb:
        assert RawClient(glb.addresses[0], path="/glb/nothing").status == 404
        assert RawClient(glb.addresses[0], path="/app").status == 503  # no backend
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base_url(glb, "http") + "/page", timeout=5)  # 503, answered by glb
        samples = scrape(glb)
        assert value(samples, "glb_handshake_rejections_total", status="404") == 1
        assert value(samples, "glb_handshake_rejections_total", status="503") == 1
        assert value(samples, "glb_http_requests_total", backend="-", code="503") == 1
        assert value(samples, "glb_http_request_duration_seconds_count") == 1
        assert value(samples, "process_open_fds") > 0


def test_connections_refused_by_a_limit_are_counted():
    with running_glb(glb={"max_connections_per_ip": "1"}) as glb:
        ws = ws_connect(base_url(glb) + "/glb/echo")
        assert RawClient(glb.addresses[0], path="/glb/echo").status == 503
        ws.close()
        samples = wait_for(lambda: (s := scrape(glb)) and value(s, "glb_connections", kind="own") == 0 and s)
        assert value(samples, "glb_connections_refused_total", limit="max_connections_per_ip") == 1


def test_broadcast_envelopes_are_counted():
    from glb import control_records as records

    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        sender, other = register(glb, "sender", 9001, seen), register(glb, "other", 9002, seen)
        envelope = records.encode_text_envelope("hello all")
        sender.send(envelope)
        assert received(other) == envelope and received(sender) == envelope
        glb.broadcast("from glb")
        assert received(other) == received(sender)
        samples = scrape(glb)
        assert value(samples, "glb_broadcast_envelopes_total") == 2
        assert value(samples, "glb_broadcast_dropped_total") == 0
        assert value(samples, "glb_connections", kind="control") == 2
        sender.close()
        other.close()


def test_handler_errors_are_counted_by_event():
    with running_glb(handler_modules=["tests.handler_failing_connect"]) as glb:
        ws = ws_connect(base_url(glb) + "/glb/echo")
        ws.send("hi")
        assert ws.recv() == "hi"
        ws.close()
        samples = scrape(glb)
        assert value(samples, "glb_event_handler_errors_total", event="connect") == 1


def test_metrics_follow_the_status_access_rule():
    with running_glb(backends={"allow": "10.0.0.0/8", "token": "s3cret"}) as glb:
        with pytest.raises(urllib.error.HTTPError) as refused:
            scrape(glb)
        assert refused.value.code == 401
        assert value(scrape(glb, token="s3cret"), "glb_connections", kind="client") == 0


def test_histogram_buckets_are_cumulative():
    histogram = Histogram((1, 10))
    for seconds in (0.5, 1, 5, 100):
        histogram.observe(seconds)
    assert histogram.cumulative() == [("1.0", 2), ("10.0", 3), ("+Inf", 4)]
    assert histogram.sum == 106.5


def test_readme_lists_every_metric():
    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme, encoding="utf-8") as stream:
        text = stream.read()
    block = text[text.index("<!-- metrics:start -->") + len("<!-- metrics:start -->"):text.index("<!-- metrics:end -->")]
    assert block.strip() == render_names(), "README metric list is stale: paste glb.metrics.render_names()"


def test_every_declared_metric_is_exposed():
    with running_glb() as glb:
        names = {name for name, _ in scrape(glb)}
    for metric in METRICS:
        if metric.type == "histogram":
            assert metric.name + "_count" in names, metric.name
        elif not metric.labels or metric.type in ("info",):
            assert metric.name in names, metric.name


def test_a_departed_backends_figures_are_forgotten_after_a_while():
    from glb.stats import FORGET_AFTER, Figures, Stats

    stats = Stats()
    stats.session_ended("old", Figures(1, 10, 1, 10), 1000, "client", 1.0)
    stats.http_request("old", 200, 0.01, 5)
    stats.session_ended("kept", Figures(2, 20, 2, 20), 1000, "client", 1.0)
    stats.forget_departed({"kept"}, now=100.0)  # "old" left: still shown for a while
    assert set(stats.backends) == {"old", "kept"}
    stats.forget_departed({"kept"}, now=100.0 + FORGET_AFTER / 2)
    assert "old" in stats.backends
    stats.forget_departed({"kept"}, now=101.0 + FORGET_AFTER)
    assert set(stats.backends) == {"kept"} and ("old", 200) not in stats.http_requests
    stats.session_ended("old", Figures(1, 1, 1, 1), 1000, "client", 1.0)
    assert stats.backends["old"].messages_to_backend == 1
