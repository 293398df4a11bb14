"""The event table, the bus and handler-module loading, without sockets."""

import os
import sys
import types

import pytest

from glb.errors import HandlerLoadError
from glb.events import EVENT_NAMES, EVENT_TABLE, EventBus, render_reference
from glb.handlers import inspect_module, load_handlers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_twenty_two_events_declared_once():
    names = [spec.name for spec in EVENT_TABLE]
    assert len(names) == 22 == len(set(names))
    assert {"connect", "disconnect", "handshake", "error", "exception", "message", "binary",
            "fragmented", "raw_message", "client_connect", "client_disconnect", "client_message",
            "client_binary", "client_fragmented", "server_connect", "server_disconnect",
            "server_ready", "before_send_server_binding", "http_request", "http_response",
            "ssl_get_handler", "ssl_after_create_handler"} == EVENT_NAMES


def test_unknown_signal_is_an_attribute_error_not_a_new_signal():
    bus = EventBus()
    with pytest.raises(AttributeError):
        bus.client_mesage  # noqa: B018  (the typo is the point)


def test_fire_without_receivers_returns_none():
    bus = EventBus()
    assert bus.fire(bus.message, text="x") is None


def test_handler_can_change_and_mark_handled():
    bus = EventBus()

    def upper(event):
        event.text = event.text.upper()
        event.handled = True
    bus.add_handler("client_message", upper)
    event = bus.fire(bus.client_message, text="hi")
    assert (event.text, event.handled) == ("HI", True)


def test_raising_handler_is_contained_and_fires_exception_once():
    bus = EventBus()
    seen = []

    def broken(event):
        raise ValueError("bug")

    def broken_too(event):
        seen.append(event.exception)
        raise ValueError("bug in the exception handler")
    bus.add_handler("message", broken)
    bus.add_handler("exception", broken_too)
    event = bus.fire(bus.message, text="x")
    assert event.text == "x"
    assert len(seen) == 1 and isinstance(seen[0], ValueError)


def test_reject_and_respond_are_recorded():
    bus = EventBus()
    bus.add_handler("handshake", lambda event: event.reject(403, "no"))
    bus.add_handler("http_request", lambda event: event.respond(200, {"A": "b"}, "ok"))
    assert bus.fire(bus.handshake).rejection == (403, "no")
    assert bus.fire(bus.http_request).response == (200, {"A": "b"}, b"ok")


def make_module(name, **functions):
    module = types.ModuleType(name)
    module.__dict__.update(functions)
    sys.modules[name] = module
    return module


def test_unknown_on_function_is_a_warning_naming_it():
    make_module("fake_handlers_typo", on_client_mesage=lambda event: None,
                on_connect=lambda event: None)
    _, functions, warnings = inspect_module("fake_handlers_typo")
    assert list(functions) == ["connect"]
    assert len(warnings) == 1 and "on_client_mesage" in warnings[0]


def test_non_callable_handler_is_an_error():
    make_module("fake_handlers_noncallable", on_connect=42)
    with pytest.raises(HandlerLoadError, match="on_connect"):
        inspect_module("fake_handlers_noncallable")


def test_missing_module_is_an_error_naming_it():
    with pytest.raises(HandlerLoadError, match="no_such_handlers_here"):
        load_handlers(["no_such_handlers_here"], EventBus())


def test_loaded_handlers_receive_events():
    seen = []
    make_module("fake_handlers_ok", on_message=seen.append)
    bus = EventBus()
    load_handlers(["fake_handlers_ok"], bus)
    bus.fire(bus.message, text="x")
    assert [event.text for event in seen] == ["x"]


def test_readme_event_table_is_generated_from_the_declarations():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as readme:
        text = readme.read()
    block = text.split("<!-- events:start -->\n", 1)[1].split("<!-- events:end -->", 1)[0]
    assert block.strip() == render_reference().strip()
