"""A handler module as a user would write one: used by the end-to-end handler tests."""


def on_handshake(event):
    if event.connection.path.endswith("/forbidden"):
        event.reject(403, "this path is closed")
        return
    event.response_headers["X-Served-By"] = "glb-test"


def on_message(event):
    if event.text == "swallow":
        event.handled = True


def on_binary(event):
    if event.data == b"boom":
        raise RuntimeError("handler bug on purpose")


def on_nothing_at_all(event):
    """Matches no event: start-up must warn about it."""
