"""A handler module that does nothing, for bench/relay_bench.py.

Connecting a ``client_message`` handler switches the client-to-backend direction
of every session from raw pass-through to decoded frames, so loading this module
measures what that switch costs by itself: frame parsing, unmasking, UTF-8
decoding, the event, and re-encoding (masking) for the backend.
"""


def on_client_message(event):
    pass
