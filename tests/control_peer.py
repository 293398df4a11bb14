"""A backend's side of glb's control channel, raw, for tests: open, register, read, get a binding."""

import gevent
import requests

from glb import control_records as records
from glb.control import SGC_BINDING_PATH
from glb.websocket import connect
from tests.support import base_url


def control_url(balancer, path="/glb/control"):
    return base_url(balancer) + path


def open_channel(balancer, token=None, path="/glb/control"):
    headers = [("Authorization", f"Bearer {token}")] if token else []
    ws, _, _ = connect(control_url(balancer, path), headers=headers, timeout=5)
    return ws


def register(balancer, guid, port, recorder, host="127.0.0.1", clients=(), **extra):
    """Open a raw control channel and register fully; returns it once server_ready fired."""
    ws = open_channel(balancer)
    ws.send(records.encode_server_data(guid, **extra))
    ws.send(records.encode_binding(host, port))
    for client in clients:
        ws.send(records.encode_client(True, client))
    ws.send(records.READY)
    recorder.wait("server_ready", match=lambda e: e.backend.guid == guid)
    return ws


def received(ws, timeout=5):
    """The next message on a client WebSocket, failing the test instead of hanging."""
    with gevent.Timeout(timeout, AssertionError("nothing received")):
        return ws.receive()


def closed_with(ws, timeout=5):
    """Receive until glb closes the channel; (code, reason)."""
    with gevent.Timeout(timeout):
        while ws.receive() is not None:
            pass
    return ws.close_code, ws.close_reason


def get_binding(balancer, path=SGC_BINDING_PATH):
    return requests.get(base_url(balancer, "http") + path, timeout=5)
