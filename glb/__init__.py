"""glb: a WebSocket and HTTP load balancer built on gevent.

Backends register themselves over a control WebSocket, clients are paired with
a backend by a balancing policy, and each session relays frames both ways.
See README.md for the settings and the handler API.
"""

__version__ = "0.1.0"
