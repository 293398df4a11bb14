"""The closing handshake state, without sockets: outcomes and the closes each leg is owed."""
import pytest

from glb.closing import ClosingHandshake, LegClose
from glb.errors import CloseCode

pytestmark = pytest.mark.timeout(5)


def names(closing, owed):
    return [(closing.name(leg), code, reason) for leg, code, reason in owed]


def test_a_close_frame_from_either_peer_is_forwarded_once_and_decides_the_outcome():
    closing = ClosingHandshake()
    assert closing.peer_closed(closing.client, 4000, "bye") is True
    assert closing.outcome == (4000, "bye", "client")
    assert closing.backend.close_out and not closing.client.complete
    # the backend answers: its close is owed to the client, which already sent one
    assert closing.peer_closed(closing.backend, 4000, "bye") is True
    assert closing.client.complete and closing.backend.complete
    assert closing.outcome == (4000, "bye", "client")  # the first cause stays


def test_a_close_answering_glbs_own_is_not_forwarded():
    closing = ClosingHandshake()
    owed = closing.glb_closes(CloseCode.GOING_AWAY, "idle timeout")
    assert names(closing, owed) == [("client", 1001, "idle timeout"), ("backend", 1001, "idle timeout")]
    for leg, _, _ in owed:
        assert closing.take_close_out(leg) is True
    assert closing.peer_closed(closing.backend, 1001, "idle timeout") is False
    assert closing.outcome == (1001, "idle timeout", "glb")


@pytest.mark.parametrize("side, outcome, owed", [
    ("client", (1006, "client went away", "client"), [("backend", 1001, "client went away")]),
    ("backend", (1014, "backend went away", "backend"), [("client", 1014, "backend went away")]),
])
def test_a_peer_vanishing_without_a_close(side, outcome, owed):
    closing = ClosingHandshake()
    got = closing.peer_vanished(getattr(closing, side))
    assert closing.outcome == outcome and names(closing, got) == owed


def test_eof_after_a_close_frame_owes_nothing_and_keeps_the_outcome():
    closing = ClosingHandshake()
    closing.peer_closed(closing.backend, 1000, "done")
    assert closing.peer_vanished(closing.backend) == []
    assert closing.outcome == (1000, "done", "backend")


@pytest.mark.parametrize("side, reason, outcome, owed", [
    ("client", "send blocked over 2 s (slow reader)", (1008, "send blocked over 2 s (slow reader)", "glb"),
     [("backend", 1001, "client went away")]),
    ("client", "send failed: reset", (1006, "send failed: reset", "client"), [("backend", 1001, "client went away")]),
    ("backend", "send failed: reset", (1014, "backend lost: send failed: reset", "backend"),
     [("client", 1014, "backend went away")]),
])
def test_a_failed_write(side, reason, outcome, owed):
    closing = ClosingHandshake()
    got = closing.write_failed(getattr(closing, side), reason)
    assert closing.outcome == outcome and names(closing, got) == owed


def test_a_violation_tells_the_offender_unless_told_and_closes_the_other_leg():
    closing = ClosingHandshake()
    got = closing.violated(closing.client, CloseCode.MESSAGE_TOO_BIG, "too big")
    assert names(closing, got) == [("client", 1009, "too big"), ("backend", 1001, "client protocol error")]
    assert closing.outcome == (1009, "too big", "glb")
    closing = ClosingHandshake()
    got = closing.violated(closing.backend, CloseCode.PROTOCOL_ERROR, "bad frame", told=True)
    assert names(closing, got) == [("client", 1014, "backend protocol error")]


def test_a_close_goes_to_a_leg_once_and_status_has_a_default():
    closing = ClosingHandshake(client=LegClose(), backend=LegClose())
    assert closing.status == (CloseCode.ABNORMAL, "session ended", "glb")
    assert closing.take_close_out(closing.client) is True
    assert closing.take_close_out(closing.client) is False
