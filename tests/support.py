"""Test helpers: real glb instances on 127.0.0.1 port 0, real clients, raw sockets."""

import contextlib
import os
import re
import signal
import socket
import struct
import sys
import time
import urllib.request

import gevent
import gevent.event
import gevent.queue
import gevent.select
import gevent.subprocess
import websocket  # websocket-client
from prometheus_client.parser import text_string_to_metric_families

from glb import config
from glb.server import Balancer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_settings(**sections):
    """Settings from a dict of sections; listens on an ephemeral loopback port by default."""
    data = {name: dict(values) for name, values in sections.items()}
    data.setdefault("glb", {}).setdefault("listen", "127.0.0.1:0")
    data.setdefault("handlers", {}).setdefault("modules", "")
    return config.from_dict(data)


@contextlib.contextmanager
def running_glb(handler_modules=None, **sections):
    """A started Balancer; yields it and stops it (1 s grace) afterwards."""
    balancer = Balancer(make_settings(**sections), handler_modules=handler_modules)
    balancer.start()
    try:
        yield balancer
    finally:
        balancer.stop(timeout=1)


def base_url(balancer, scheme="ws"):
    host, port = balancer.addresses[0]
    return f"{scheme}://{host}:{port}"


def ws_connect(url, timeout=5, **kwargs):
    """A websocket-client connection that does not validate UTF-8 itself (we test glb's)."""
    return websocket.create_connection(url, timeout=timeout, skip_utf8_validation=True,
                                       enable_multithread=True, **kwargs)


def recv_close(ws):
    """Receive until a close frame; return (code, reason)."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            if len(data) >= 2:
                return struct.unpack("!H", data[:2])[0], data[2:].decode("utf-8")
            return None, ""


def raw_http(address, request: bytes, timeout=5):
    """Send raw bytes, return everything the server sends until it closes (bounded)."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while sum(map(len, chunks)) < 1 << 20:
            data = sock.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def send_byte_by_byte(address, data, step=0.2, timeout=5):
    """A slowloris client: ``data`` one byte per ``step`` seconds until the server answers or closes.

    Bounded: at most ``len(data)`` steps. Returns (bytes sent, everything the server sent).
    """
    with socket.create_connection(address, timeout=timeout) as sock:
        sent = 0
        for byte in data:
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sent += 1
            if gevent.select.select([sock], [], [], step)[0]:
                break
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
        except OSError:
            pass
    return sent, reply


def upgrade_request(path="/glb/echo", host="127.0.0.1", version="13",
                    key="dGhlIHNhbXBsZSBub25jZQ==", http_version="HTTP/1.1", extra=""):
    return (f"GET {path} {http_version}\r\nHost: {host}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: {version}\r\n{extra}\r\n").encode("latin-1")


def slow_mask(data, key):
    """The obvious masking, byte by byte: a reference independent of glb's apply_mask."""
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def hand_frame(opcode, payload=b"", fin=True, rsv=0, key=None, length=None):
    """A frame built by hand, independently of glb's encoder; masked with ``key`` when given.

    ``length`` may claim another payload length than ``payload`` has.
    """
    length = len(payload) if length is None else length
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    mask_bit = 0x80 if key else 0
    if length < 126:
        header = struct.pack("!BB", first, mask_bit | length)
    elif length < 65536:
        header = struct.pack("!BBH", first, mask_bit | 126, length)
    else:
        header = struct.pack("!BBQ", first, mask_bit | 127, length)
    return header + key + slow_mask(payload, key) if key else header + payload


class RawClient:
    """A WebSocket client on a raw socket, for sending what a good client never would."""

    def __init__(self, address, path="/glb/echo", timeout=5):
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.sendall(upgrade_request(path))
        head = b""
        while b"\r\n\r\n" not in head:
            data = self.sock.recv(1)
            if not data:
                raise ConnectionError("closed during handshake")
            head += data
        self.status = int(head.split(b" ", 2)[1])
        self.buffer = b""

    def send_frame(self, opcode, payload, fin=True, mask=True, rsv=0):
        self.sock.sendall(hand_frame(opcode, payload, fin, rsv, key=b"\x01\x02\x03\x04" if mask else None))

    def _read(self, n):
        while len(self.buffer) < n:
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.buffer += data
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def read_frame(self):
        """(opcode, payload) of the next frame from the server (servers never mask)."""
        first, second = self._read(2)
        length = second & 0x7F
        if length == 126:
            length = struct.unpack("!H", self._read(2))[0]
        elif length == 127:
            length = struct.unpack("!Q", self._read(8))[0]
        return first & 0x0F, self._read(length)

    def read_close(self):
        """Skip data frames; return the (code, reason) of the server's close frame."""
        while True:
            opcode, payload = self.read_frame()
            if opcode == 8:
                if len(payload) < 2:
                    return None, ""
                return struct.unpack("!H", payload[:2])[0], payload[2:].decode("utf-8")

    def close(self):
        self.sock.close()


class GlbProcess:
    """A real ``python -m glb CONFIG`` process; its log lines are read as they come.

    ``wait_for(pattern)`` returns the regex match of the first log line after the
    previous wait that matches, or fails after ``timeout`` seconds.
    """

    ROOT = ROOT

    def __init__(self, config_path, env=None, pass_fds=(), argv=None):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.ROOT, full_env.get("PYTHONPATH", "")]))
        self.proc = gevent.subprocess.Popen(argv or [sys.executable, "-m", "glb", str(config_path)],
                                            cwd=self.ROOT, env=full_env, stderr=gevent.subprocess.PIPE,
                                            text=True, pass_fds=pass_fds)
        self.lines = []
        self._queue = gevent.queue.Queue()
        self._reader = gevent.spawn(self._read)
        self.port = int(self.wait_for(r"listening on http://127\.0\.0\.1:(\d+)").group(1))
        self.wait_for(r"glb \S+ ready")

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern, timeout=20):
        with gevent.Timeout(timeout, AssertionError(f"no log line matching {pattern!r}:\n" + self.log)):
            while True:
                line = self._queue.get()
                if line is None:
                    raise AssertionError(f"glb exited before logging {pattern!r}:\n" + self.log)
                match = re.search(pattern, line)
                if match:
                    return match

    @property
    def log(self):
        return "".join(self.lines)

    @property
    def url(self):
        return f"ws://127.0.0.1:{self.port}"

    def signal(self, signum):
        self.proc.send_signal(signum)

    def stop(self, timeout=20):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
            self._reader.join(timeout=5)


def shipped_config(tmp_path):
    """The shipped conf/lb.ini, written to ``tmp_path`` listening on a free port instead of 8080."""
    with open(os.path.join(GlbProcess.ROOT, "conf", "lb.ini"), encoding="utf-8") as shipped:
        text = shipped.read()
    assert "listen = 127.0.0.1:8080" in text
    path = tmp_path / "lb.ini"
    path.write_text(text.replace("listen = 127.0.0.1:8080", "listen = 127.0.0.1:0"))
    return path


@contextlib.contextmanager
def shipped_glb(tmp_path, backends=2):
    """``python -m glb`` with the shipped config; yields the GlbProcess once its demo backends are ready."""
    glb = GlbProcess(shipped_config(tmp_path))
    try:
        registered = r"ready: .*glb\.control|glb\.control.*ready:"
        while sum(bool(re.search(registered, line)) for line in glb.lines) < backends:
            glb.wait_for(registered)
        yield glb
    finally:
        glb.stop()


class Traffic:
    """Sessions that each send numbered messages and check every echo, round and round."""

    def __init__(self, sessions):
        self.sessions = sessions
        self.sent = self.received = 0
        self.errors = []
        self.rounds = 0
        self.stopping = False
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        while not self.stopping:
            for index, ws in enumerate(self.sessions):
                text = f"{index}:{self.rounds}"
                try:
                    ws.send(text)
                    self.sent += 1
                    answer = ws.recv()
                except Exception as exc:  # noqa: BLE001 (any failure is what we count)
                    self.errors.append(f"session {index}: {exc!r}")
                    return
                if answer != text:
                    self.errors.append(f"session {index}: sent {text!r}, got {answer!r}")
                    return
                self.received += 1
            self.rounds += 1

    def wait_rounds(self, count, timeout=20):
        target = self.rounds + count
        with gevent.Timeout(timeout, AssertionError(f"traffic stalled: {self.errors}")):
            while self.rounds < target and not self.greenlet.dead:
                gevent.sleep(0.01)
        assert not self.errors, self.errors

    def stop(self):
        """Finish the current round and stop."""
        self.stopping = True
        self.greenlet.join(timeout=20)
        assert self.greenlet.dead


def open_session_pid(url):
    """A session through glb, and the pid of the glb process that accepted it (from an
    ``X-Glb-Pid`` response header, added by a handler module the test configures)."""
    ws = ws_connect(url + "/app")
    return ws, int(ws.getheaders()["x-glb-pid"])


class Connector:
    """Opens a session every ``interval`` s, checks one echo on it and closes it; counts failures."""

    def __init__(self, url, interval=0.05):
        self.url, self.interval = url, interval
        self.pids = []
        self.failures = []
        self.greenlet = gevent.spawn(self._run)

    def _run(self):
        next_at = time.monotonic()
        while True:
            next_at += self.interval  # a fixed rate, whatever each connection took
            try:
                ws, pid = open_session_pid(self.url)
                ws.send("hello")
                assert ws.recv() == "hello"
                ws.close()
                self.pids.append(pid)
            except Exception as exc:  # noqa: BLE001 (refused, reset, anything: counted)
                self.failures.append(repr(exc))
            gevent.sleep(max(0.0, next_at - time.monotonic()))

    def wait_for_pid(self, pid, timeout=20):
        with gevent.Timeout(timeout, AssertionError(f"no connection reached pid {pid}: {self.pids[-5:]}")):
            while pid not in self.pids:
                gevent.sleep(0.02)

    def stop(self):
        self.greenlet.kill()


# -- waiting and counting --------------------------------------------------------------------------

class Recorder:
    """Records events in firing order; ``wait`` blocks (bounded) until enough have fired."""

    def __init__(self, balancer, *names):
        self.events = []
        self._changed = gevent.event.Event()
        for name in names:
            balancer.bus.add_handler(name, self._record, origin="test")

    def _record(self, event):
        self.events.append(event)
        self._changed.set()

    def of(self, name, match=None):
        return [e for e in self.events if e.name == name and (match is None or match(e))]

    def wait(self, name, count=1, timeout=5, match=None):
        deadline = time.monotonic() + timeout
        while True:
            found = self.of(name, match)
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{count} {name} event(s) expected, got {len(found)}: {self.events}")
            self._changed.clear()
            self._changed.wait(remaining)

    def names(self, conn=None):
        return [e.name for e in self.events if conn is None or getattr(e, "connection", None) is conn]


def scrape(glb, token=None):
    """{(name, frozenset(labels.items())): value} of every sample glb exposes."""
    request = urllib.request.Request(base_url(glb, "http") + "/glb/metrics")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=5) as answer:
        assert answer.headers["Content-Type"].startswith("text/plain; version=")
        text = answer.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, frozenset(labels.items())))


def wait_for(condition, timeout=5.0):
    """Poll ``condition()`` until it is truthy (returned) or the deadline passes (AssertionError)."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        gevent.sleep(0.02)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
