"""The closing handshake of a relayed session, without sockets: who ended it and what each leg is owed.

The relay engine reports what happened (a close frame passed, a peer vanished,
a write failed, a peer broke the protocol, glb itself closes) and gets back the
close frames it still has to send. Rules, applied everywhere the same:

* the first cause to end the session wins (``outcome``: code, reason, closed_by);
* a close frame goes to a leg at most once (``LegClose.close_out``);
* after a leg's own close frame, nothing more it sends is relayed;
* glb is the server on the client leg: once a close frame went each way there,
  glb closes the client's TCP connection first (RFC 6455 §7.1.1);
* what each cause owes the other leg::

    cause                               outcome (code, reason, closed_by)   the other leg gets
    client sends close (c, r)           c, r, client                        (c, r) forwarded
    backend sends close (c, r)          c, r, backend                       (c, r) forwarded
    client vanishes (EOF, no close)     1006 "client went away", client     1001 "client went away"
    backend vanishes (EOF, no close)    1014 "backend went away", backend   1014 "backend went away"
    client does not read (send_timeout) 1008 "... slow reader", glb         1001 "client went away"
    a write to the client fails         1006, client                        1001 "client went away"
    a write to the backend fails        1014 "backend lost: ...", backend   1014 "backend went away"
    client breaks the protocol / limit  its code, glb                       1001 "client protocol error"
    backend breaks the protocol / limit its code, glb                       1014 "backend protocol error"
    glb closes (shutdown, idle, ping)   its code, glb                       the same, both legs
"""
from glb.errors import CloseCode

ENDED_UNKNOWN = (CloseCode.ABNORMAL, "session ended", "glb")
CLIENT_GONE = (CloseCode.GOING_AWAY, "client went away")
BACKEND_GONE = (CloseCode.BAD_GATEWAY, "backend went away")


class LegClose:
    """What the closing handshake has done on one leg."""

    __slots__ = ("close_in", "close_out")

    def __init__(self) -> None:
        self.close_in: tuple[int, str] | None = None  # (code, reason) of the close frame this peer sent
        self.close_out = False  # a close frame was written (or is owed no more) to this peer

    @property
    def complete(self):
        """A close frame went each way on this leg."""
        return self.close_in is not None and self.close_out


Owed = tuple[LegClose, int, str]  # a close frame still to send: to that leg, this code and reason


class ClosingHandshake:
    """The closing state of one session: ``client`` and ``backend`` legs, and the outcome.

    The legs are ``LegClose`` objects (the relay's ``glb.legs.Leg`` is one); the
    closes owed come back as ``[(leg, code, reason)]`` for the caller to send.
    """

    __slots__ = ("client", "backend", "outcome")

    def __init__(self, client: LegClose | None = None, backend: LegClose | None = None) -> None:
        self.client = LegClose() if client is None else client
        self.backend = LegClose() if backend is None else backend
        self.outcome: tuple[int, str, str] | None = None  # (code, reason, closed_by) once the session is ending

    @property
    def status(self) -> tuple[int, str, str]:
        """``(code, reason, closed_by)``; 1006 "session ended" by glb if nothing was recorded."""
        return self.outcome or ENDED_UNKNOWN

    def end(self, code: int, reason: str, closed_by: str) -> None:
        """Record why the session ends; the first cause wins."""
        if self.outcome is None:
            self.outcome = (code, reason, closed_by)

    def other(self, leg: LegClose) -> LegClose:
        return self.backend if leg is self.client else self.client

    def name(self, leg: LegClose) -> str:
        return "client" if leg is self.client else "backend"

    def take_close_out(self, leg: LegClose) -> bool:
        """True (once) when a close frame may still go to ``leg``; from then on it counts as sent."""
        if leg.close_out:
            return False
        leg.close_out = True
        return True

    # -- what happened: each returns the closes still owed, as [(leg, code, reason)] ----------

    def peer_closed(self, leg: LegClose, code: int, reason: str) -> bool:
        """``leg``'s peer sent a close frame; True if it is to be forwarded to the other leg.

        Not forwarded when glb already closed the other leg: then this close answers glb's.
        """
        leg.close_in = (code, reason)
        self.end(code, reason, self.name(leg))
        return self.take_close_out(self.other(leg))

    def peer_vanished(self, leg: LegClose) -> list[Owed]:
        """``leg``'s peer ended TCP; nothing is owed if it had sent its close frame first."""
        if leg.close_in is not None:
            return []
        if leg is self.client:
            self.end(CloseCode.ABNORMAL, "client went away", "client")
            return [(self.backend, *CLIENT_GONE)]
        self.end(CloseCode.BAD_GATEWAY, "backend went away", "backend")
        return [(self.client, *BACKEND_GONE)]

    def write_failed(self, leg: LegClose, reason: str) -> list[Owed]:
        """Writing to ``leg`` failed: its peer is gone or did not read within send_timeout."""
        if leg is self.client:
            if "slow reader" in reason:
                self.end(CloseCode.POLICY_VIOLATION, reason, "glb")
            else:
                self.end(CloseCode.ABNORMAL, reason, "client")
            return [(self.backend, *CLIENT_GONE)]
        self.end(CloseCode.BAD_GATEWAY, f"backend lost: {reason}", "backend")
        return [(self.client, *BACKEND_GONE)]

    def violated(self, leg: LegClose, code: int, reason: str, told: bool = False) -> list[Owed]:
        """``leg``'s peer broke the protocol or a limit; ``told`` when it already got its close."""
        self.end(code, reason, "glb")
        owed = [] if told else [(leg, code, reason)]
        if leg is self.client:
            owed.append((self.backend, CloseCode.GOING_AWAY, "client protocol error"))
        else:
            owed.append((self.client, CloseCode.BAD_GATEWAY, "backend protocol error"))
        return owed

    def glb_closes(self, code: int, reason: str, cause: str | None = None) -> list[Owed]:
        """glb ends the session itself: both legs get its close (``cause``: the reason recorded instead)."""
        self.end(code, cause or reason, "glb")
        return [(self.client, code, reason), (self.backend, code, reason)]
