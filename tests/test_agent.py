"""The backend agent against real glb instances: registration, client records, leaving, reconnecting."""

import random
import time

import gevent
import gevent.event
import gevent.queue
import pytest
import requests

from glb import control_records as records
from glb.agent import Agent, Backoff, control_url
from glb.control_records import RecordError
from glb.errors import CloseCode
from tests.support import base_url, free_port, Recorder, running_glb
from tests.control_peer import get_binding


@pytest.fixture
def agents():
    """Agents made here are stopped after the test, even a failing one."""
    made = []

    def make(*args, **kwargs):
        agent = Agent(*args, **kwargs)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop(timeout=2)


def client_record_applied(seen, conn_id, active):
    """Wait until glb has handled the client record (handled in the same step as raw_message)."""
    seen.wait("raw_message", match=lambda e: e.text == records.encode_client(active, conn_id))


def test_two_agents_register_with_events_in_order(agents):
    with running_glb() as glb:
        seen = Recorder(glb, "server_connect", "server_ready")
        a = agents(base_url(glb), guid="a", bindings=[("127.0.0.1", 9001)], weight=2).start()
        b = agents(base_url(glb), guid="b", bindings=[("127.0.0.1", 9002, False)]).start()
        ready = seen.wait("server_ready", count=2)
        assert {e.backend.guid for e in ready} == {"a", "b"}
        for event in ready:
            names = seen.names(event.connection)
            assert names == ["server_connect", "server_ready"]
        backend = glb.registry.get("a")
        assert backend.weight == 2 and [x.port for x in backend.bindings] == [9001]
        assert a.links[0].registrations == 1 and b.links[0].url.endswith("/glb/control")


def test_a_stopped_agent_leaves_at_once_and_is_never_offered_again(agents):
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "server_disconnect")
        agents(base_url(glb), guid="stays", bindings=[("127.0.0.1", 9001)]).start()
        leaver = agents(base_url(glb), guid="leaves", bindings=[("127.0.0.1", 9002)]).start()
        seen.wait("server_ready", count=2)

        started = time.monotonic()
        leaver.stop(timeout=2)
        assert time.monotonic() - started < 2
        gone = seen.wait("server_disconnect")[0]
        assert (gone.backend.guid, gone.code) == ("leaves", CloseCode.NORMAL)
        assert len(leaver.group) == 0

        ports, deadline = [], time.monotonic() + 1.0
        while time.monotonic() < deadline:
            answer = get_binding(glb)
            assert answer.status_code == 200
            ports.append(answer.json()["port"])
        assert len(ports) > 10 and set(ports) == {9001}


def test_client_records_reach_glb_and_are_repeated_after_glb_restarts(agents):
    port = free_port()
    listen = {"listen": f"127.0.0.1:{port}"}
    with running_glb(glb=listen) as first:
        seen = Recorder(first, "server_ready", "raw_message", "server_disconnect")
        agent = agents(f"ws://127.0.0.1:{port}", guid="b1", bindings=[("127.0.0.1", 9001)]).start()
        seen.wait("server_ready")
        agent.client_connected("c1", ip="10.0.0.7", channel="news")
        agent.client_connected("c2")
        agent.client_disconnected("c2")
        agent.client_disconnected("never-connected")  # ignored
        client_record_applied(seen, "c2", False)
        backend = first.registry.get("b1")
        assert backend.clients == 1 and backend.reported_clients["c1"].ip == "10.0.0.7"

    with running_glb(glb=listen) as second:  # same port, brand-new glb: the agent comes back by itself
        seen = Recorder(second, "server_ready")
        ready = seen.wait("server_ready", timeout=10)[0]
        assert ready.backend.guid == "b1"
        assert ready.backend.clients == 1  # the client record was repeated before ready
        assert list(ready.backend.reported_clients) == ["c1"]
        assert agent.links[0].registrations == 2


def test_the_agent_reports_to_every_glb(agents):
    with running_glb() as one, running_glb() as two:
        seen_one = Recorder(one, "server_ready", "raw_message")
        seen_two = Recorder(two, "server_ready", "raw_message")
        agent = agents([base_url(one), base_url(two) + "/sgc@load_balancer_client"], guid="b1",
                       bindings=[("127.0.0.1", 9001)]).start()
        seen_one.wait("server_ready")
        seen_two.wait("server_ready")
        agent.client_connected("c1")
        client_record_applied(seen_one, "c1", True)
        client_record_applied(seen_two, "c1", True)
        assert one.registry.get("b1").clients == two.registry.get("b1").clients == 1


def test_token_lets_an_agent_in_where_its_address_is_not_allowed(agents):
    with running_glb(backends={"allow": "10.0.0.0/8", "token": "s3cret"}) as glb:
        seen = Recorder(glb, "handshake", "server_connect", "server_ready")
        refused = agents(base_url(glb), guid="no-token", bindings=[("127.0.0.1", 9001)]).start()
        seen.wait("handshake", count=2)  # refused, and trying again
        assert seen.of("server_connect") == []
        assert "401" in refused.links[0].last_error
        refused.stop(timeout=2)

        agents(base_url(glb), guid="with-token", bindings=[("127.0.0.1", 9002)], token="s3cret").start()
        assert seen.wait("server_ready")[0].backend.guid == "with-token"


def test_a_refused_agent_backs_off_instead_of_hammering(agents):
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready", "server_connect")
        agents(base_url(glb), guid="same", bindings=[("127.0.0.1", 9001)]).start()
        seen.wait("server_ready")
        twin = agents(base_url(glb), guid="same", bindings=[("127.0.0.1", 9002)]).start()
        seen.wait("server_connect", count=4)  # the twin's third attempt
        link = twin.links[0]
        assert link.last_close_code == CloseCode.POLICY_VIOLATION
        assert link.backoff.failures >= 2
        assert glb.registry.get("same").bindings[0].port == 9001


def test_envelopes_from_glb_reach_on_envelope(agents):
    with running_glb() as glb:
        seen = Recorder(glb, "server_ready")
        got = {"a": gevent.event.AsyncResult(), "b": gevent.event.AsyncResult()}
        a = agents(base_url(glb), guid="a", bindings=[("127.0.0.1", 9001)], on_envelope=got["a"].set).start()
        agents(base_url(glb), guid="b", bindings=[("127.0.0.1", 9002)], on_envelope=got["b"].set).start()
        seen.wait("server_ready", count=2)
        assert a.send_envelope(records.encode_text_envelope("hello all", exclude=["x", "y"]))
        for name in ("a", "b"):
            envelope = got[name].get(timeout=5)
            assert envelope.payload == "hello all" and envelope.exclude_ids == ("x", "y")


def test_stop_is_bounded_when_glb_is_unreachable():
    agent = Agent(f"ws://127.0.0.1:{free_port()}", bindings=[("127.0.0.1", 9001)]).start()
    gevent.sleep(0)  # let the link try once
    started = time.monotonic()
    agent.stop(timeout=2)
    assert time.monotonic() - started < 1
    assert len(agent.group) == 0 and "cannot open control channel" in agent.links[0].last_error


def test_agent_checks_its_registration_up_front():
    with pytest.raises(RecordError, match="port"):
        Agent("ws://127.0.0.1:1", bindings=[("127.0.0.1", 70000)])
    with pytest.raises(RecordError, match="weight"):
        Agent("ws://127.0.0.1:1", weight=0)
    with pytest.raises(ValueError):
        Agent("ftp://127.0.0.1:1")
    with pytest.raises(ValueError):
        Agent([])
    agent = Agent("ws://127.0.0.1:1", bindings=[("127.0.0.1", 9001)], max_clients=5)
    assert len(agent.guid) == 36  # a uuid4 by default
    assert agent.registration_texts()[-1] == records.READY


@pytest.mark.parametrize("given,url", [
    ("ws://127.0.0.1:8080", "ws://127.0.0.1:8080/glb/control"),
    ("ws://127.0.0.1:8080/", "ws://127.0.0.1:8080/glb/control"),
    ("http://lb:80", "ws://lb:80/glb/control"),
    ("https://lb", "wss://lb/glb/control"),
    ("ws://[::1]:8080/sgc@load_balancer_client", "ws://[::1]:8080/sgc@load_balancer_client"),
    ("wss://lb/edge/control", "wss://lb/edge/control"),
])
def test_control_url(given, url):
    assert control_url(given) == url


def test_backoff_doubles_to_the_cap_with_jitter_and_resets():
    backoff = Backoff(0.1, 5.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(12)]
    for step, delay in enumerate(delays):
        nominal = min(5.0, 0.1 * 2 ** step)
        assert 0.5 * nominal <= delay <= 1.5 * nominal
    assert len(set(delays)) == len(delays)  # jittered
    backoff.reset()
    assert backoff.next_delay() <= 0.15


def test_binding_endpoint_spreads_clients_over_agents(agents):
    with running_glb(glb={"balancing": "round_robin"}) as glb:
        seen = Recorder(glb, "server_ready")
        for i in (1, 2, 3):
            agents(base_url(glb), guid=f"b{i}", bindings=[("127.0.0.1", 9000 + i)]).start()
        seen.wait("server_ready", count=3)
        url = base_url(glb, "http") + "/sgc@lb@client@get@binding"
        ports = {requests.get(url, timeout=5).json()["port"] for _ in range(6)}
        assert ports == {9001, 9002, 9003}


def test_a_silent_glb_is_noticed_by_the_heartbeat_and_the_agent_reconnects():
    """A 'glb' that completes the handshake, then never sends anything (not even pongs)."""
    from gevent.server import StreamServer

    from glb.handshake import switching_protocols

    accepted = []
    second = gevent.event.Event()

    def silent(sock, address):
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(4096)
            if not data:
                return
            head += data
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        sock.sendall(switching_protocols(key.decode()))
        accepted.append(address)
        if len(accepted) == 2:
            second.set()
        while sock.recv(65536):  # swallow registration and pings, answer nothing
            pass

    server = StreamServer(("127.0.0.1", 0), silent)
    server.start()
    agent = Agent(f"ws://127.0.0.1:{server.server_port}", bindings=[("127.0.0.1", 9001)], heartbeat=0.1)
    try:
        agent.start()
        assert second.wait(5)
        assert "closed by local: 1006" in agent.links[0].last_error
        started = time.monotonic()
        agent.stop(timeout=1)  # glb never answers the close either: stop is still bounded
        assert time.monotonic() - started < 1.5
    finally:
        agent.stop(timeout=1)
        server.stop(timeout=1)


def test_a_broadcast_while_a_restarted_glb_is_refilling_reaches_the_backends_it_lacks(agents):
    """Two glbs; after A restarts, Y is back on A but X is not yet: Y's broadcasts must go
    through B, which holds everyone, not through A, the first in Y's list."""
    with running_glb() as a, running_glb() as b:
        got = gevent.queue.Queue()
        x = agents([base_url(a), base_url(b)], guid="x", bindings=[("127.0.0.1", 9001)],
                   on_envelope=got.put, backoff_base=0.05)
        y = agents([base_url(a), base_url(b)], guid="y", bindings=[("127.0.0.1", 9002)],
                   backoff_base=0.05)
        x.start()
        y.start()
        deadline = gevent.Timeout(10, AssertionError("agents did not register with both glbs"))
        with deadline:
            while not (x.registered and y.registered):
                gevent.sleep(0.01)
        host, port = a.addresses[0]
        x.links[0].backoff.base = x.links[0].backoff.cap = 60  # X will not be back on A in this test
        a.stop(timeout=1)
        with running_glb(glb={"listen": f"{host}:{port}"}) as restarted:
            with gevent.Timeout(10, AssertionError("y did not register with the restarted glb")):
                while y.links[0].registrations < 2 or restarted.registry.get("y") is None:
                    gevent.sleep(0.01)
            assert restarted.registry.get("x") is None  # A lacks X; B holds both
            assert y.broadcast("to everyone")
            assert got.get(timeout=5).payload == "to everyone"
