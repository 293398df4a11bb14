"""A backend that floods glb's control channel with client records, as fast as the socket takes them.

    python -m tests.control_flood HOST PORT COUNT [--write-size BYTES] [--guid GUID]

Registers (server data, one binding, then COUNT ``sgc@lb@client@connection``
records, then ready) over ``/glb/control``, in writes of ``--write-size`` bytes
(default 64 KiB), prints ``sent`` once everything is written and then waits for
glb to close the channel (or for stdin to close). Stdlib only, so it runs as a
separate process that keeps glb's receive buffer full while glb works.
"""
import argparse
import base64
import json
import os
import socket
import struct
import sys
import threading

MASK = b"\0\0\0\0"  # a client must mask; a zero key leaves the payload as it is


def text_frame(text):
    payload = text.encode("utf-8")
    size = len(payload)
    if size < 126:
        head = struct.pack("!BB", 0x81, 0x80 | size)
    elif size < 65536:
        head = struct.pack("!BBH", 0x81, 0x80 | 126, size)
    else:
        head = struct.pack("!BBQ", 0x81, 0x80 | 127, size)
    return head + MASK + payload


def registration(count, guid):
    """Every frame of the registration, as one bytes object."""
    frames = [text_frame(json.dumps({"method": "sgc@lb@server@data", "guid": guid})),
              text_frame(json.dumps({"method": "sgc@lb@server@binding", "host": "127.0.0.1", "port": 9,
                                     "ssl": False}))]
    frames += [text_frame(json.dumps({"method": "sgc@lb@client@connection", "active": True,
                                      "guid": f"client-{index}", "ip": "10.0.0.1", "channel": "",
                                      "protocol": ""}))
               for index in range(count)]
    frames.append(text_frame("sgc@lb@server@ready"))
    return b"".join(frames)


def open_channel(host, port):
    sock = socket.create_connection((host, port), timeout=30)
    key = base64.b64encode(os.urandom(16)).decode("ascii")
    sock.sendall((f"GET /glb/control HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                  "Sec-WebSocket-Version: 13\r\n\r\n").encode("ascii"))
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(1)
        if not data:
            raise ConnectionError("glb closed the control channel during the handshake")
        head += data
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"glb refused the control channel: {head.splitlines()[0]!r}")
    return sock


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("count", type=int)
    parser.add_argument("--write-size", type=int, default=65536)
    parser.add_argument("--guid", default="flood")
    args = parser.parse_args(argv)
    data = registration(args.count, args.guid)
    sock = open_channel(args.host, args.port)
    view = memoryview(data)
    for start in range(0, len(data), args.write_size):
        sock.sendall(view[start:start + args.write_size])
    print("sent", flush=True)
    # Until glb closes the channel or our parent closes stdin, whichever comes first.
    threading.Thread(target=lambda: (sys.stdin.read(), sock.shutdown(socket.SHUT_RDWR)), daemon=True).start()
    try:
        while sock.recv(65536):
            pass
    except OSError:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
