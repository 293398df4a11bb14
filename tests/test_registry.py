"""The backend registry: state table, registration sequence, counts, candidates. No sockets."""
import pytest

from glb.control_records import (
    READY as READY_TEXT, Binding, ClientRecord, RecordError, ServerData, encode_binding,
    encode_client, encode_server_data, encode_text_envelope,
)
from glb.errors import CloseCode
from glb.registry import (
    ACCEPTED, CONNECTING, DRAINING, GONE, READY, TRANSITIONS, Backend, Outcome, RegistrationError,
    Registry, RegistryError, TransitionError, binding_from_url, check_transition,
)

STATES = (CONNECTING, READY, DRAINING, GONE)
LEGAL = {
    (CONNECTING, READY), (CONNECTING, GONE),
    (READY, DRAINING), (READY, GONE),
    (DRAINING, READY), (DRAINING, GONE),
}


def register(registry, guid="b1", *, host="10.0.0.5", port=8000, ready=True, peer=None, **extra):
    reg = registry.begin(peer)
    assert reg.receive(encode_server_data(guid, **extra)) == Outcome.REGISTERED
    if host:
        assert reg.receive(encode_binding(host, port)) == Outcome.BINDING
    if ready:
        assert reg.receive(READY_TEXT) == Outcome.READY
    return reg


# -- the transition table ------------------------------------------------------------------

@pytest.mark.parametrize("old", STATES)
@pytest.mark.parametrize("new", STATES)
def test_transition_table(old, new):
    if (old, new) in LEGAL:
        check_transition(old, new)
        assert new in TRANSITIONS[old]
    else:
        with pytest.raises(TransitionError, match=f"{old} -> {new}"):
            check_transition(old, new)


def test_every_state_has_rows_in_both_tables():
    assert set(TRANSITIONS) == set(STATES)
    assert set(ACCEPTED) == set(STATES) | {None}


def test_drain_and_resume_follow_the_table():
    registry = Registry()
    reg = register(registry, ready=False)
    with pytest.raises(TransitionError):
        registry.drain("b1")  # connecting -> draining is not allowed
    reg.receive(READY_TEXT)
    assert registry.drain("b1").state == DRAINING
    assert registry.resume("b1").state == READY
    with pytest.raises(TransitionError):
        registry.resume("b1")  # ready -> ready
    with pytest.raises(RegistryError, match="no backend"):
        registry.drain("nope")


# -- registration sequence ------------------------------------------------------------------

def test_full_registration():
    registry = Registry()
    reg = registry.begin(("10.0.0.5", 50000))
    assert reg.state is None
    assert reg.receive(encode_server_data("b1", weight=2, max_clients=10, tags=["eu"])) == \
        Outcome.REGISTERED
    backend = registry.get("b1")
    assert reg.backend is backend
    assert (backend.state, backend.weight, backend.max_clients, backend.tags) == \
        (CONNECTING, 2, 10, ("eu",))
    assert backend.peer == ("10.0.0.5", 50000) and not backend.static
    assert registry.candidates() == ()
    assert reg.receive(encode_binding("10.0.0.5", 8000)) == Outcome.BINDING
    assert reg.receive(encode_client(True, "c1", "1.2.3.4")) == Outcome.CLIENT
    assert registry.candidates() == ()  # not ready yet
    assert reg.receive(READY_TEXT) == Outcome.READY
    assert backend.state == READY
    assert backend.bindings == [Binding("10.0.0.5", 8000)]
    assert backend.clients == 1
    assert registry.candidates() == (backend,)


@pytest.mark.parametrize("first", [
    encode_binding("h", 80), encode_client(True, "c"), READY_TEXT,
    encode_text_envelope("hello"), "plain text",
])
def test_anything_before_server_data_is_refused_with_1008(first):
    registry = Registry()
    with pytest.raises(RegistrationError) as info:
        registry.begin().receive(first)
    assert info.value.close_code == CloseCode.POLICY_VIOLATION
    assert "before server data" in info.value.reason
    assert len(registry) == 0


def test_server_data_twice_is_refused():
    reg = register(Registry(), ready=False)
    with pytest.raises(RegistrationError, match="server data sent twice") as info:
        reg.receive(encode_server_data("b2"))
    assert info.value.close_code == 1008


def test_ready_twice_is_refused():
    reg = register(Registry())
    with pytest.raises(RegistrationError, match="ready sent twice"):
        reg.receive(READY_TEXT)


def test_after_ready_client_records_and_envelopes_are_valid():
    registry = Registry()
    reg = register(registry)
    assert reg.receive(encode_client(True, "c1")) == Outcome.CLIENT
    assert reg.receive(encode_text_envelope("news")) == Outcome.ENVELOPE
    assert reg.receive("000garbage") == Outcome.ENVELOPE  # the caller's parse will reject it
    assert registry.get("b1").clients == 1


def test_binding_after_ready_is_added_once():
    registry = Registry()
    reg = register(registry)
    version = registry.version
    assert reg.receive(encode_binding("10.0.0.5", 8443)) == Outcome.BINDING
    assert reg.receive(encode_binding("10.0.0.5", 8443)) == Outcome.BINDING
    assert registry.get("b1").bindings == [Binding("10.0.0.5", 8000), Binding("10.0.0.5", 8443)]
    assert registry.version == version + 1


def test_duplicate_guid_among_live_backends_is_refused():
    registry = Registry()
    register(registry, "b1")
    with pytest.raises(RegistrationError) as info:
        registry.begin().receive(encode_server_data("b1"))
    assert (info.value.close_code, info.value.reason) == (1008, "duplicate guid")
    assert len(registry) == 1


def test_guid_is_free_again_after_the_backend_left():
    registry = Registry()
    old = register(registry, "b1")
    assert old.close() is old.backend
    assert old.backend.state == GONE
    new = register(registry, "b1")
    assert registry.get("b1") is new.backend is not old.backend


def test_old_channel_closing_late_does_not_remove_the_new_backend():
    registry = Registry()
    old = register(registry, "b1")
    registry.remove("b1")  # e.g. an operator removed it; the old channel is still closing
    new = register(registry, "b1")
    old.close()
    assert registry.get("b1") is new.backend
    assert new.backend.state == READY


def test_frames_after_removal_are_refused_with_going_away():
    registry = Registry()
    reg = register(registry)
    registry.remove("b1")
    with pytest.raises(RegistrationError, match="removed") as info:
        reg.receive(encode_client(True, "c"))
    assert info.value.close_code == CloseCode.GOING_AWAY


@pytest.mark.parametrize("text", [
    '{"method":"sgc@lb@server@binding","host":"bad host","port":80}',
    '{"method":"sgc@lb@server@binding","host":"h","port":70000}',
])
def test_invalid_binding_closes_with_1008(text):
    registry = Registry()
    reg = register(registry, ready=False, host=None)
    with pytest.raises(RegistrationError) as info:
        reg.receive(text)
    assert info.value.close_code == 1008
    assert "binding" in info.value.reason
    assert registry.get("b1").bindings == []


def test_invalid_server_data_closes_with_1008():
    with pytest.raises(RegistrationError, match="weight") as info:
        Registry().begin().receive('{"method":"sgc@lb@server@data","guid":"g","weight":0}')
    assert info.value.close_code == 1008


def test_malformed_client_record_is_an_error_not_a_close():
    reg = register(Registry())
    with pytest.raises(RecordError, match="active"):
        reg.receive('{"method":"sgc@lb@client@connection","guid":"c"}')
    assert reg.receive(encode_client(True, "c")) == Outcome.CLIENT  # the channel goes on


def test_unspecified_binding_host_means_the_peer_address():
    registry = Registry()
    register(registry, "b1", host="0.0.0.0", peer=("192.168.1.7", 40000))
    register(registry, "b2", host="::", peer="fd00::7")
    register(registry, "b3", host="0.0.0.0", peer=None)
    assert registry.get("b1").bindings == [Binding("192.168.1.7", 8000)]
    assert registry.get("b2").bindings == [Binding("fd00::7", 8000)]
    assert registry.get("b3").bindings == [Binding("0.0.0.0", 8000)]


def test_apply_takes_parsed_records_too():
    registry = Registry()
    reg = registry.begin()
    assert reg.apply(ServerData("g")) == Outcome.REGISTERED
    assert reg.apply(Binding("h", 1)) == Outcome.BINDING
    assert reg.apply(ClientRecord(True, "c")) == Outcome.CLIENT


def test_close_before_server_data_returns_none():
    registry = Registry()
    assert registry.begin().close() is None


# -- client counts and capacity -----------------------------------------------------------

def test_client_records_update_the_count():
    registry = Registry()
    reg = register(registry)
    backend = reg.backend
    for guid in ("c1", "c2", "c3"):
        reg.receive(encode_client(True, guid))
    reg.receive(encode_client(True, "c2"))  # re-announced: counted once
    assert backend.clients == 3
    reg.receive(encode_client(False, "c1"))
    reg.receive(encode_client(False, "unknown"))
    assert backend.clients == 2
    assert set(backend.reported_clients) == {"c2", "c3"}


def test_relayed_sessions_count_with_reported_clients():
    registry = Registry()
    reg = register(registry)
    reg.receive(encode_client(True, "direct"))
    backend = reg.backend
    registry.session_started(backend)
    registry.session_started(backend)
    assert (backend.relayed, backend.clients) == (2, 3)
    registry.session_ended(backend)
    registry.session_ended(backend)
    registry.session_ended(backend)  # never below zero
    assert (backend.relayed, backend.clients) == (0, 1)


def test_max_clients_respected_by_candidates():
    registry = Registry()
    reg = register(registry, max_clients=2)
    backend = reg.backend
    registry.session_started(backend)
    assert registry.candidates() == (backend,)
    reg.receive(encode_client(True, "c1"))
    assert backend.full and registry.candidates() == ()
    registry.session_ended(backend)
    assert registry.candidates() == (backend,)
    registry.session_started(backend)
    assert registry.candidates() == ()
    reg.receive(encode_client(False, "c1"))
    assert registry.candidates() == (backend,)


def test_no_cap_when_max_clients_is_zero():
    registry = Registry()
    backend = register(registry).backend
    for _ in range(1000):
        registry.session_started(backend)
    assert registry.candidates() == (backend,)


# -- candidates -----------------------------------------------------------------------------

def test_candidates_exclude_draining_connecting_and_bindingless():
    registry = Registry()
    a = register(registry, "a").backend
    b = register(registry, "b").backend
    register(registry, "c", ready=False)
    register(registry, "d", host=None)
    assert registry.candidates() == (a, b)
    registry.drain("a")
    assert registry.candidates() == (b,)
    registry.resume("a")
    assert set(registry.candidates()) == {a, b}
    assert len(registry.all()) == 4


def test_candidates_are_cached_until_a_change():
    registry = Registry()
    a = register(registry, "a").backend
    first = registry.candidates()
    assert registry.candidates() is first
    version = registry.version
    registry.session_started(a)  # no cap: not a change for candidates
    assert registry.candidates() is first and registry.version == version
    register(registry, "b")
    second = registry.candidates()
    assert second is not first and len(second) == 2
    registry.drain("b")
    assert registry.candidates() == (a,)
    registry.remove("a")
    assert registry.candidates() == ()
    assert registry.version > version
    assert isinstance(second, tuple)


def test_remove():
    registry = Registry()
    backend = register(registry).backend
    assert registry.remove("b1") is backend
    assert backend.state == GONE and registry.get("b1") is None
    with pytest.raises(RegistryError):
        registry.remove("b1")


# -- static backends and URLs -----------------------------------------------------------------

def test_static_backend_is_ready_at_once():
    registry = Registry()
    backend = registry.add_static("app1", "ws://10.0.0.9:9000", weight=3, max_clients=5)
    assert (backend.guid, backend.name, backend.static, backend.state) == \
        ("app1", "app1", True, READY)
    assert backend.bindings == [Binding("10.0.0.9", 9000, False)]
    assert (backend.weight, backend.max_clients) == (3, 5)
    assert registry.candidates() == (backend,)
    with pytest.raises(RegistrationError, match="duplicate guid"):
        registry.add_static("app1", "ws://10.0.0.10:9000")
    with pytest.raises(RegistrationError, match="duplicate guid"):
        registry.begin().receive(encode_server_data("app1"))


@pytest.mark.parametrize("url, binding", [
    ("ws://h:1", Binding("h", 1, False)),
    ("wss://h", Binding("h", 443, True)),
    ("ws://h/", Binding("h", 80, False)),
    ("http://[::1]:8080", Binding("::1", 8080, False)),
    ("https://h:8443", Binding("h", 8443, True)),
])
def test_binding_from_url(url, binding):
    assert binding_from_url(url) == binding


@pytest.mark.parametrize("url, words", [
    ("ftp://h:1", "scheme"),
    ("h:1", "scheme"),
    ("ws://h:1/app", "path"),
    ("ws://h:1?x=1", "query"),
    ("ws://:1", "no host"),
    ("ws://h:99999", "not a URL"),
    ("ws://bad host:1", "host"),
])
def test_bad_static_urls(url, words):
    with pytest.raises(RecordError, match=words):
        Registry().add_static("s", url)


def test_bad_static_weight():
    with pytest.raises(RecordError, match="weight"):
        Registry().add_static("s", "ws://h:1", weight=0)


def test_binding_url_and_http_base():
    backend = Backend("g")
    with pytest.raises(RegistryError, match="no binding"):
        backend.binding_url()
    with pytest.raises(RegistryError, match="no binding"):
        backend.http_base()
    backend.bindings.append(Binding("10.0.0.5", 8000, False))
    assert backend.binding_url() == "ws://10.0.0.5:8000/"
    assert backend.binding_url("/chat?room=1") == "ws://10.0.0.5:8000/chat?room=1"
    assert backend.binding_url("chat") == "ws://10.0.0.5:8000/chat"
    assert backend.http_base() == "http://10.0.0.5:8000"
    v6 = Backend("v6")
    v6.bindings.append(Binding("2001:db8::1", 443, True))
    assert v6.binding_url("/x") == "wss://[2001:db8::1]:443/x"
    assert v6.http_base() == "https://[2001:db8::1]:443"
    v6.http = "http://api.internal:81/base/"
    assert v6.http_base() == "http://api.internal:81/base"


def test_http_opt_out_and_http_candidates():
    registry = Registry()
    derived = registry.add_static("derived", "ws://10.0.0.1:80")
    explicit = registry.add_static("explicit", "ws://10.0.0.2:80", http="http://api:81")
    none = registry.add_static("none", "ws://10.0.0.3:80", http="")  # the config's default
    reg = register(registry, "dyn", host=None)  # ready but no binding: no HTTP either
    assert (derived.takes_http, explicit.takes_http, none.takes_http) == (True, True, False)
    assert not reg.backend.takes_http
    assert derived.http_base() == "http://10.0.0.1:80"
    with pytest.raises(RegistryError, match="takes no HTTP"):
        none.http_base()
    assert registry.candidates() == (derived, explicit, none)
    first = registry.http_candidates()
    assert first == (derived, explicit) and registry.http_candidates() is first
    registry.drain("derived")
    assert registry.http_candidates() == (explicit,)
