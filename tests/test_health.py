"""Backend health: rise/fall, passive ejection and slow start without sockets, then end to end."""

import socket
import time

import gevent
import pytest
import requests

from glb import control_records as records
from glb.balancing import slow_start_weight
from glb.demo_backend import DemoBackend, lb_url_for
from glb.health import RiseFall, parse_check
from glb.registry import DOWN, UP, Registry
from tests.backends import started
from tests.fleet import Fleet
from tests.support import base_url, Recorder, running_glb, scrape, value
from tests.control_peer import open_channel

# -- socket-free -----------------------------------------------------------------------------------


def test_rise_and_fall_need_results_in_a_row():
    counter = RiseFall(rise=2, fall=3)
    assert [counter.observe(False, up=True) for _ in range(2)] == [None, None]
    assert counter.observe(True, up=True) is None  # a pass resets the failures
    assert [counter.observe(False, up=True) for _ in range(3)] == [None, None, "down"]
    assert counter.observe(True, up=False) is None
    assert counter.observe(False, up=False) is None  # ... and a failure resets the passes
    assert [counter.observe(True, up=False) for _ in range(2)] == [None, "up"]


def test_slow_start_ramps_from_a_tenth_to_full():
    assert slow_start_weight(10, 0, 30) == pytest.approx(1.0)
    assert slow_start_weight(10, 15, 30) == pytest.approx(5.0)
    assert slow_start_weight(10, 30, 30) == 10
    assert slow_start_weight(10, 5, 0) == 10


def test_parse_check():
    assert parse_check("") == ("", "")
    assert parse_check("tcp") == ("tcp", "")
    assert parse_check("http /health") == ("http", "/health")


def test_passive_failures_within_the_window_eject():
    registry = Registry(max_fails=3, fail_timeout=10)
    registry.add_static("a", "ws://10.0.0.1:80")
    registry.add_static("b", "ws://10.0.0.2:80")
    backend, other = registry.get("a"), registry.get("b")
    assert not registry.connect_failed(backend, now=100.0)
    assert not registry.connect_failed(backend, now=105.0)
    assert not registry.connect_failed(backend, now=111.0)  # the one at 100 is out of the window
    assert registry.connect_failed(backend, now=112.0)
    assert registry.mark_down(backend, "3 failed", until=122.0)
    assert backend.health == DOWN and registry.candidates() == (other,)
    assert registry.ejections_over(now=121.0) == [] and registry.ejections_over(now=122.0) == [backend]
    assert registry.mark_up(backend) and backend.health == UP and backend in registry.candidates()
    assert backend.failures == []


def test_the_last_candidate_is_never_ejected():
    registry = Registry(max_fails=1)
    registry.add_static("a", "ws://10.0.0.1:80")
    assert not registry.connect_failed(registry.get("a"), now=1.0)
    registry.add_static("b", "ws://10.0.0.2:80")
    assert registry.connect_failed(registry.get("a"), now=2.0)


def test_max_fails_zero_never_ejects_and_an_own_setting_wins():
    registry = Registry(max_fails=0)
    registry.add_static("a", "ws://10.0.0.1:80")
    registry.add_static("b", "ws://10.0.0.2:80", max_fails=1)
    assert not any(registry.connect_failed(registry.get("a"), now=float(t)) for t in range(10))
    assert registry.connect_failed(registry.get("b"), now=1.0)


def test_a_returning_backend_ramps_up_again():
    registry = Registry(slow_start=30)
    registry.add_static("a", "ws://10.0.0.1:80", weight=10)
    backend = registry.get("a")
    assert backend.effective_weight == pytest.approx(1.0, abs=0.1)  # new: ramping
    backend.ramp_start = None
    assert backend.effective_weight == 10
    registry.mark_down(backend, "checks failed")
    registry.mark_up(backend)
    assert backend.effective_weight < 2


# -- end to end ------------------------------------------------------------------------------------

@pytest.mark.timeout(40)
@pytest.mark.parametrize("slow_start", [0, 30])
def test_a_killed_static_backend_goes_out_after_fall_and_back_after_rise(slow_start):
    steady, flaky = DemoBackend(guid="steady"), DemoBackend(guid="flaky")
    with started(steady, flaky):
        check = {"check": "ws", "check_interval": 0.05, "rise": 2, "fall": 2}
        with running_glb(**{"backend:steady": {"url": f"ws://127.0.0.1:{steady.port}"},
                            "backend:flaky": {"url": f"ws://127.0.0.1:{flaky.port}", **check,
                                              "slow_start": slow_start}}) as balancer:
            recorder = Recorder(balancer, "server_disconnect", "server_ready")
            registered = balancer.registry.get("flaky")
            registered.ramp_start = None  # it was at full weight before it died
            port = flaky.port
            flaky.stop(timeout=1)
            down = recorder.wait("server_disconnect", timeout=10)[0]
            assert down.backend is registered and registered.health == DOWN
            assert "2 checks failed" in registered.down_reason
            assert [b.name for b in balancer.registry.candidates()] == ["steady"]
            balancer.live_feed._sample()  # what the status page shows
            assert balancer.live_feed.rows["flaky"]["health"] == DOWN
            assert balancer.live_feed.totals["backends_ready"] == 1
            samples = scrape(balancer)
            assert value(samples, "glb_backend_healthy", backend="flaky") == 0
            assert value(samples, "glb_backend_up", backend="flaky") == 0
            assert value(samples, "glb_backend_up", backend="steady") == 1
            fleet = Fleet(base_url(balancer) + "/app", 10).start()  # meanwhile all go to steady
            try:
                assert fleet.by_backend() == {"steady": 10}
                revived = DemoBackend(port=port, guid="flaky")
                with started(revived):
                    up = recorder.wait("server_ready", timeout=10)[0]
                    assert up.backend is registered and registered.health == UP
                    assert len(recorder.of("server_disconnect")) == 1
                    more = Fleet(base_url(balancer) + "/app", 10).start()
                    try:
                        arrived = more.by_backend().get("flaky", 0)
                    finally:
                        more.stop()
            finally:
                fleet.stop()
            print(f"slow_start={slow_start}: 10 new sessions after the return, {arrived} went to flaky")
            if slow_start:
                assert 1 <= arrived <= 3  # ramping from a tenth of its weight: a trickle
            else:
                assert arrived == 10  # least-loaded: the empty backend takes every new session


def closed_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


@pytest.mark.timeout(30)
def test_failed_connects_eject_a_backend_for_fail_timeout():
    good = DemoBackend(guid="good")
    with started(good):
        with running_glb(glb={"balancing": "round_robin", "backend_retries": 1},
                         **{"backend:dead": {"url": f"ws://127.0.0.1:{closed_port()}",
                                             "max_fails": 2, "fail_timeout": 0.5},
                            "backend:good": {"url": f"ws://127.0.0.1:{good.port}"}}) as balancer:
            recorder = Recorder(balancer, "server_disconnect", "server_ready")
            fleet = Fleet(base_url(balancer) + "/app", 6).start()  # each pick of dead fails over to good
            try:
                assert fleet.by_backend() == {"good": 6}
                down = recorder.wait("server_disconnect")[0]
                assert down.backend.name == "dead" and "2 failed connects" in down.backend.down_reason
                up = recorder.wait("server_ready", timeout=10)[0]  # fail_timeout later it is tried again
                assert up.backend.name == "dead"
            finally:
                fleet.stop()


@pytest.mark.timeout(30)
def test_a_hung_registered_backend_is_evicted_and_its_clients_move():
    hung_server = DemoBackend(guid="hung")  # serves clients; its control channel is a raw one that hangs
    with running_glb(backends={"heartbeat_interval": 0.1, "heartbeat_timeout": 0.3}) as balancer:
        recorder = Recorder(balancer, "server_ready", "server_disconnect", "client_disconnect")
        healthy = DemoBackend(lb_urls=[lb_url_for(balancer.addresses[0])], guid="healthy")
        with started(hung_server, healthy):
            channel = open_channel(balancer)
            channel.auto_pong = False  # and nobody reads it: glb's heartbeat pings go unanswered
            channel.send(records.encode_server_data("hung"))
            channel.send(records.encode_binding("127.0.0.1", hung_server.port))
            channel.send(records.READY)
            recorder.wait("server_ready", 2)
            balancer.registry.get("healthy").relayed = 100  # so every client lands on "hung" first
            fleet = Fleet(base_url(balancer) + "/app", 6).start()
            try:
                assert fleet.by_backend() == {"hung": 6}
                balancer.registry.get("healthy").relayed = 0
                gone = recorder.wait("server_disconnect", timeout=10)[0]
                assert gone.backend.guid == "hung" and balancer.registry.get("hung") is None
                assert balancer.health.evictions == 1
                assert value(scrape(balancer), "glb_heartbeat_evictions_total") == 1
                fleet.wait_for(lambda: fleet.by_backend() == {"healthy": 6}, 10, "clients on healthy")
                assert {(c.code, c.backend) for c in fleet.closes()} == {(1014, "hung")}
                assert len(recorder.of("client_disconnect", lambda e: e.code == 1014)) == 6
            finally:
                fleet.stop()
                channel.abort()


@pytest.mark.timeout(30)
def test_failed_http_connects_count_too():
    good = DemoBackend(guid="good")
    with started(good):
        with running_glb(glb={"balancing": "round_robin"},
                         **{"backend:dead": {"url": f"ws://127.0.0.1:{closed_port()}", "max_fails": 2},
                            "backend:good": {"url": f"ws://127.0.0.1:{good.port}"}}) as balancer:
            recorder = Recorder(balancer, "server_disconnect")
            for _ in range(4):  # round robin: every other GET tries dead first, then good answers
                answer = requests.get(base_url(balancer, "http") + "/whoami", timeout=5)
                assert answer.text == "good"
            down = recorder.wait("server_disconnect")[0]
            assert down.backend.name == "dead" and balancer.registry.get("dead").health == DOWN


@pytest.mark.timeout(30)
def test_tcp_and_http_checks():
    server = DemoBackend(guid="server")  # answers GET /whoami with 200 and anything else with 404
    with started(server):
        fast = {"check_interval": 0.05, "rise": 1, "fall": 2}
        url = f"ws://127.0.0.1:{server.port}"
        with running_glb(**{"backend:fine": {"url": url, "check": "http /whoami", **fast},
                            "backend:missing": {"url": url + "/", "check": "http /nope", **fast},
                            "backend:dead": {"url": f"ws://127.0.0.1:{closed_port()}", "check": "tcp", **fast},
                            "backend:open": {"url": f"ws://localhost:{server.port}", "check": "tcp", **fast},
                            }) as balancer:
            recorder = Recorder(balancer, "server_disconnect")
            downs = recorder.wait("server_disconnect", 2, timeout=10)
            assert sorted(e.backend.name for e in downs) == ["dead", "missing"]
            assert "answered 404" in balancer.registry.get("missing").down_reason
            assert "tcp connect failed" in balancer.registry.get("dead").down_reason
            assert sorted(b.name for b in balancer.registry.candidates()) == ["fine", "open"]


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status, counted", [(503, True), (403, False)])
def test_refused_handshakes_count_when_the_backend_is_failing_not_when_it_judges(status, counted):
    from tests.backends import ScriptedBackend
    from tests.support import RawClient
    refusing, good = ScriptedBackend(refuse=(status, b"no")), DemoBackend(guid="good")
    with started(refusing, good):
        with running_glb(glb={"balancing": "round_robin", "backend_retries": 0},
                         **{"backend:refusing": {**refusing.static_section(), "max_fails": 2},
                            "backend:good": {"url": f"ws://127.0.0.1:{good.port}"}}) as balancer:
            statuses = []
            for _ in range(4):  # round robin: two of the four go to "refusing"
                client = RawClient(balancer.addresses[0], path="/app")
                statuses.append(client.status)
                client.close()
            assert sorted(statuses) == [101, 101, status, status]
            assert (balancer.registry.get("refusing").health == DOWN) is counted


@pytest.mark.timeout(30)
def test_a_backend_that_answers_heartbeats_stays():
    with running_glb(backends={"heartbeat_interval": 0.05, "heartbeat_timeout": 0.2}) as balancer:
        recorder = Recorder(balancer, "server_ready")
        backend = DemoBackend(lb_urls=[lb_url_for(balancer.addresses[0])], guid="alive")
        with started(backend):
            recorder.wait("server_ready")
            ws = balancer.control_channels["alive"].conn.websocket
            pongs, deadline = set(), time.monotonic() + 10
            while len(pongs) < 10 and time.monotonic() < deadline:  # ten answered heartbeats
                pongs.add(ws.last_pong)
                gevent.sleep(0.01)
            assert len(pongs - {0.0}) >= 9
            assert balancer.health.evictions == 0 and balancer.registry.get("alive").state == "ready"
