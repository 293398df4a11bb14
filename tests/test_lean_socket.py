"""LeanSocket on real sockets: it waits like a gevent socket, and holds a watcher only while waiting."""
import errno
import gc
import socket

import gevent
import pytest

from glb.lean_socket import LeanSocket
from tests.backends import ScriptedBackend, started
from tests.support import base_url, running_glb, wait_for, ws_connect


@pytest.fixture
def lean_pair():
    ours, theirs = socket.socketpair()
    lean = LeanSocket.take_over(ours)
    yield lean, theirs
    lean.close()
    theirs.close()


def io_watchers_on(fds):
    """Every libev io watcher in this process that watches one of ``fds``."""
    gc.collect()
    return [w for w in gc.get_objects() if type(w).__name__ == "io" and getattr(w, "fd", None) in fds]


def test_take_over_leaves_no_watcher_on_the_descriptor(lean_pair):
    lean, _ = lean_pair
    assert io_watchers_on({lean.fileno()}) == []


def test_sendall_waits_for_a_slow_reader_and_delivers_every_byte_in_order(lean_pair):
    lean, theirs = lean_pair
    data = bytes(range(256)) * 16384  # 4 MiB: far more than the socket buffers hold
    sender = gevent.spawn(lean.sendall, data)
    received = bytearray()
    with gevent.Timeout(20):
        while len(received) < len(data):
            received += theirs.recv(65536)
    sender.get(timeout=5)
    assert received == data
    assert io_watchers_on({lean.fileno()}) == []  # the write watcher went with the wait


def test_recv_waits_for_bytes_then_returns_them(lean_pair):
    lean, theirs = lean_pair
    reader = gevent.spawn(lean.recv, 100)
    gevent.sleep(0)  # let it block
    assert not reader.ready()
    theirs.sendall(b"late")
    assert reader.get(timeout=5) == b"late"


def test_closing_wakes_a_greenlet_blocked_in_recv_with_ebadf(lean_pair):
    lean, _ = lean_pair
    reader = gevent.spawn(lean.recv, 100)
    wait_for(lambda: io_watchers_on({lean.fileno()}))  # the reader is waiting on its watcher
    lean.close()
    with pytest.raises(OSError) as failed:
        reader.get(timeout=5)
    assert failed.value.errno == errno.EBADF


def test_an_idle_relayed_session_holds_one_watcher_per_leg():
    backend = ScriptedBackend()
    with started(backend), running_glb(**{"backend:b0": backend.static_section()}) as glb:
        clients = [ws_connect(base_url(glb) + "/") for _ in range(3)]
        for index, ws in enumerate(clients):
            ws.send(f"hello {index}")
            assert ws.recv() == f"hello {index}"
        wait_for(lambda: len(glb.client_sessions) == 3)
        for session in glb.client_sessions:
            fds = {session.client.sock.fileno(), session.backend_leg.sock.fileno()}
            watchers = io_watchers_on(fds)
            assert sorted(w.fd for w in watchers) == sorted(fds)  # the engine's read watcher, one each
            assert all(w.active for w in watchers)
        for ws in clients:
            ws.close()
