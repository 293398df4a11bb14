"""A handler that raises on every connect: glb must log it, count it and carry on."""


def on_connect(event):
    raise RuntimeError("a handler bug")
