"""The admin API end to end: auth, drain with spread, weights, closing sessions, errors."""

import contextlib

import pytest
import requests

from glb.demo_backend import DemoBackend, lb_url_for
from glb.registry import DRAINING, READY
from tests.fleet import Fleet, demo_pool
from tests.support import base_url, Recorder, running_glb

TOKEN = "s3cret-admin"


def admin_url(balancer, path):
    return base_url(balancer, "http") + "/glb/admin/" + path


@contextlib.contextmanager
def two_backends(sessions=0, **sections):
    with running_glb(**sections) as balancer:
        with demo_pool(balancer, ["blue", "green"], sessions=sessions) as (backends, fleet, recorder):
            yield balancer, backends, fleet, recorder


# -- who may call ----------------------------------------------------------------------------------

EVERY_CALL = [
    ("GET", "backends", None),
    ("GET", "backends/blue", None),
    ("POST", "backends/blue/drain", {"spread": 0}),
    ("POST", "backends/blue/undrain", None),
    ("POST", "backends/blue/weight", {"weight": 5}),
    ("POST", "backends/blue/close", {"code": 1012}),
    ("POST", "rebalance", None),
    ("POST", "reload", None),
    ("GET", "sessions?backend=blue", None),
    ("POST", "sessions/c1/close", None),
]


def test_every_admin_call_is_refused_without_the_token_from_a_non_allowed_address():
    # 127.0.0.1 is outside [admin] allow here, so only the token lets a call through
    with two_backends(sessions=4, admin={"token": TOKEN, "allow": "10.0.0.0/8"}) as (balancer, _, fleet, _r):
        before = fleet.by_backend()
        for method, path, body in EVERY_CALL:
            url = admin_url(balancer, path)
            missing = requests.request(method, url, json=body, timeout=5)
            assert missing.status_code == 401, (path, missing.text)
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
            wrong = requests.request(method, url, json=body, timeout=5,
                                     headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 403, (path, wrong.text)
            assert "error" in wrong.json()
        # nothing changed: both backends ready at weight 1, every session where it was
        assert [(b.state, b.weight) for b in balancer.registry.all()] == [(READY, 1), (READY, 1)]
        assert fleet.by_backend() == before and fleet.closes() == []
        allowed = requests.get(admin_url(balancer, "backends"), timeout=5,
                               headers={"Authorization": f"Bearer {TOKEN}"})
        assert allowed.status_code == 200
        assert sorted(b["name"] for b in allowed.json()["backends"]) == ["blue", "green"]


def test_without_a_token_only_allowed_addresses_may_call():
    with running_glb(admin={"allow": "10.0.0.0/8"}) as balancer:
        refused = requests.get(admin_url(balancer, "backends"), timeout=5)
        assert refused.status_code == 403 and "not allowed" in refused.json()["error"]
    with running_glb() as balancer:  # loopback is allowed by default
        assert requests.get(admin_url(balancer, "backends"), timeout=5).json() == {"backends": []}


# -- drain -----------------------------------------------------------------------------------------

@pytest.mark.timeout(40)
def test_drain_with_spread_moves_every_session_and_no_new_one_arrives():
    with two_backends(sessions=20) as (balancer, (blue, green), fleet, recorder):
        on_blue = fleet.by_backend()["blue"]
        assert on_blue > 0
        answer = requests.post(admin_url(balancer, "backends/blue/drain"), json={"spread": 1}, timeout=5)
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == DRAINING and answer.json()["closing"] == on_blue
        assert balancer.registry.get("blue").state == DRAINING
        fleet.wait_for(lambda: fleet.by_backend() == {"green": 20}, 20, "every client on green")
        closes = fleet.closes()
        assert len(closes) == on_blue
        assert {(c.code, c.reason, c.backend) for c in closes} == {(1012, "service restart", "blue")}
        # a new client and the binding request both avoid the drained backend
        extra = Fleet(base_url(balancer) + "/app", 5).start()
        try:
            assert extra.by_backend() == {"green": 5}
        finally:
            extra.stop()
        binding = requests.get(base_url(balancer, "http") + "/glb/binding", timeout=5).json()
        assert binding["port"] == green.port
        assert len(blue.websockets) == 0
        # undrain: blue is a candidate again
        answer = requests.post(admin_url(balancer, "backends/blue/undrain"), timeout=5)
        assert answer.json()["state"] == READY and answer.json()["accepts_clients"] is True


def test_drain_without_spread_keeps_the_open_sessions():
    with two_backends(sessions=6) as (balancer, _, fleet, _r):
        before = fleet.by_backend()
        answer = requests.post(admin_url(balancer, "backends/blue/drain"), timeout=5)
        assert answer.json()["closing"] == 0 and answer.json()["accepts_clients"] is False
        assert fleet.by_backend() == before
        listed = requests.get(admin_url(balancer, "sessions?backend=blue"), timeout=5).json()
        assert listed["total"] == before["blue"]
        assert {s["backend"] for s in listed["sessions"]} == {"blue"}


# -- weights, closing, sessions ----------------------------------------------------------------------

def test_weight_close_and_sessions():
    with two_backends(sessions=6) as (balancer, _, fleet, recorder):
        answer = requests.post(admin_url(balancer, "backends/green/weight"), json={"weight": 3}, timeout=5)
        assert answer.status_code == 200 and answer.json()["weight"] == 3
        assert balancer.registry.get("green").weight == 3
        page = requests.get(admin_url(balancer, "sessions?offset=1&limit=2"), timeout=5).json()
        assert page["total"] == 6 and len(page["sessions"]) == 2
        ages = [s["age"] for s in requests.get(admin_url(balancer, "sessions"), timeout=5).json()["sessions"]]
        assert ages == sorted(ages, reverse=True)  # oldest first
        victim = page["sessions"][0]
        closed = requests.post(admin_url(balancer, f"sessions/{victim['id']}/close"),
                               json={"code": 4000, "reason": "bye"}, timeout=5)
        assert closed.status_code == 200
        recorder.wait("client_disconnect", match=lambda e: e.connection.id == victim["id"] and e.code == 4000)
        on_blue = fleet.by_backend().get("blue", 0)
        answer = requests.post(admin_url(balancer, "backends/blue/close"),
                               json={"code": 1012, "reason": "moving", "spread": 0}, timeout=5)
        assert answer.json()["closing"] == on_blue
        fleet.wait_for(lambda: len(fleet.closes(1012)) == on_blue, 10, "blue's sessions closed")
        assert {c.reason for c in fleet.closes(1012)} == {"moving"}


def test_a_backend_whose_guid_has_a_slash_is_addressed_with_percent_2f():
    with running_glb() as balancer:
        recorder = Recorder(balancer, "server_ready")
        backend = DemoBackend(0, lb_urls=[lb_url_for(balancer.addresses[0])], guid="team/blue")
        backend.start()
        try:
            recorder.wait("server_ready")
            shown = requests.get(admin_url(balancer, "backends/team%2Fblue"), timeout=5)
            assert shown.status_code == 200 and shown.json()["name"] == "team/blue"
            drained = requests.post(admin_url(balancer, "backends/team%2Fblue/drain"), timeout=5)
            assert drained.status_code == 200
            assert balancer.registry.get("team/blue").state == DRAINING
        finally:
            backend.stop(timeout=1)


@pytest.mark.parametrize("method, path, body, status", [
    ("GET", "backends/nobody", None, 404),
    ("POST", "backends/nobody/drain", {}, 404),
    ("POST", "sessions/c999999/close", {}, 404),
    ("GET", "elsewhere", None, 404),
    ("POST", "backends", None, 405),
    ("GET", "backends/blue/drain", None, 405),
    ("POST", "backends/blue/weight", {"weight": 0}, 400),
    ("POST", "backends/blue/weight", {"weight": "3"}, 400),
    ("POST", "backends/blue/weight", {}, 400),
    ("POST", "backends/blue/drain", {"spread": -1}, 400),
    ("POST", "backends/blue/close", {"code": 1006}, 400),
    ("POST", "backends/blue/close", {"reason": "x" * 200}, 400),
    ("GET", "sessions?limit=lots", None, 400),
])
def test_bad_calls_get_json_errors_and_change_nothing(method, path, body, status):
    with two_backends() as (balancer, _, _f, _r):
        answer = requests.request(method, admin_url(balancer, path), json=body, timeout=5)
        assert answer.status_code == status, answer.text
        assert answer.headers["Content-Type"] == "application/json" and answer.json()["error"]
        assert [(b.state, b.weight) for b in balancer.registry.all()] == [(READY, 1), (READY, 1)]


def test_browsers_cannot_drive_it_from_another_origin():
    with two_backends() as (balancer, _, _f, _r):
        url = admin_url(balancer, "backends/blue/drain")
        forged = requests.post(url, timeout=5, headers={"Origin": "http://evil.example"})
        assert forged.status_code == 403 and "origin" in forged.json()["error"]
        form = requests.post(url, data={"spread": "0"}, timeout=5)  # what an HTML form could send
        assert form.status_code == 415
        assert balancer.registry.get("blue").state == READY
        host, port = balancer.addresses[0]
        same = requests.get(admin_url(balancer, "backends/blue"), timeout=5,
                            headers={"Origin": f"http://{host}:{port}"})
        assert same.status_code == 200 and same.json()["name"] == "blue"


def test_a_body_that_is_not_json_is_400():
    with two_backends() as (balancer, _, _f, _r):
        for body in (b"{nope", b"[1, 2]"):
            answer = requests.post(admin_url(balancer, "backends/blue/drain"), data=body, timeout=5,
                                   headers={"Content-Type": "application/json"})
            assert answer.status_code == 400 and answer.json()["error"]
        assert balancer.registry.get("blue").state == READY


# -- a backend that drains itself ---------------------------------------------------------------------

@pytest.mark.timeout(30)
def test_a_backend_drains_itself_over_its_control_channel():
    with two_backends(sessions=10) as (balancer, (blue, green), fleet, recorder):
        on_blue = fleet.by_backend()["blue"]
        blue.agent.drain(spread=0.5)
        fleet.wait_for(lambda: fleet.by_backend() == {"green": 10}, 10, "every client on green")
        assert balancer.registry.get("blue").state == DRAINING
        assert {(c.code, c.reason, c.backend) for c in fleet.closes()} == {(1012, "service restart", "blue")}
        assert len(fleet.closes()) == on_blue
        blue.agent.undrain()
        fleet.wait_for(lambda: balancer.registry.get("blue").state == READY, 5, "blue ready again")
        assert len(recorder.of("server_ready")) == 2  # undraining is no new registration
