"""Handlers that read every message and change nothing: they make both relay directions decoded."""


def on_client_message(event):
    pass


def on_raw_message(event):
    pass
