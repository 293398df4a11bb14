"""The bundled access log: a line per ended session and per HTTP request, with the metrics' figures."""

import json
import logging
import urllib.error
import urllib.request

import pytest

from glb.config import from_dict
from glb.errors import ConfigError
from tests.backends import ScriptedBackend, started
from tests.support import base_url, Recorder, running_glb, scrape, value, wait_for, ws_connect
from tests.control_peer import register

ACCESS_LOG = ["glb.handlers.access_log"]


def read_lines(path):
    try:
        with open(path, encoding="utf-8") as stream:
            return [json.loads(line) for line in stream.read().splitlines()]
    except FileNotFoundError:
        return []


def test_json_lines_carry_the_figures_the_metrics_count(tmp_path):
    path = tmp_path / "access.jsonl"
    backend = ScriptedBackend()
    with started(backend), running_glb(
            handlers={"modules": ACCESS_LOG},
            **{"glb.handlers.access_log": {"format": "json", "file": str(path)},
               "backend:one": backend.static_section()}) as glb:
        ws = ws_connect(base_url(glb) + "/room?id=7")
        for _ in range(3):
            ws.send("hello")
            assert ws.recv() == "hello"
        ws.close(status=4001, reason=b"bye")
        (line,) = wait_for(lambda: read_lines(path))
        samples = scrape(glb)
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base_url(glb, "http") + "/missing", timeout=5)  # the echo backend: 404
        lines = wait_for(lambda: (found := read_lines(path)) and len(found) == 2 and found)
    assert line["type"] == "session" and line["kind"] == "client" and line["path"] == "/room?id=7"
    assert line["backend"] == "one" and line["client"].startswith("127.0.0.1:")
    assert (line["code"], line["reason"], line["closed_by"]) == (4001, "bye", "client")
    assert line["messages_to_backend"] == line["messages_to_client"] == 3
    for direction in ("to_backend", "to_client"):
        assert line[f"bytes_{direction}"] == value(samples, "glb_ws_bytes_total", backend="one",
                                                   direction=direction)
    http = lines[1]
    assert (http["type"], http["method"], http["path"], http["status"], http["backend"]) == \
        ("http", "GET", "/missing", 404, "one")
    assert http["bytes"] >= 0 and http["duration"] >= 0


def test_text_lines_go_to_the_glb_access_logger(caplog):
    caplog.set_level(logging.INFO, logger="glb.access")
    with running_glb(handlers={"modules": ACCESS_LOG},
                     **{"glb.handlers.access_log": {"http": "false"}}) as glb:
        ws = ws_connect(base_url(glb) + "/glb/echo")
        ws.send("x")
        assert ws.recv() == "x"
        ws.close(status=1000)
        wait_for(lambda: any(r.name == "glb.access" for r in caplog.records))
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base_url(glb, "http") + "/page", timeout=5)  # 503: no backend
    lines = [r.getMessage() for r in caplog.records if r.name == "glb.access"]
    (line,) = lines  # http = false: no line for the request
    assert " own /glb/echo " in line and "code=1000" in line


def test_a_control_channel_line_names_its_backend(caplog):

    caplog.set_level(logging.INFO, logger="glb.access")
    with running_glb(handlers={"modules": ACCESS_LOG}) as glb:
        channel = register(glb, "b1", 9001, Recorder(glb, "server_ready"))
        channel.close(1000, "bye")
        line = wait_for(lambda: next((r.getMessage() for r in caplog.records if r.name == "glb.access"), None))
    assert " control /glb/control backend=b1 " in line and "code=1000" in line


def test_settings_of_an_unlisted_handler_module_stop_start_up():
    with pytest.raises(ConfigError) as error:
        from_dict({"handlers": {"modules": ""}, "glb.handlers.access_log": {"format": "json"}})
    assert "section [glb.handlers.access_log]" in str(error.value)
    with pytest.raises(ConfigError) as error:
        from_dict({"glb.handlers.access_log": {"format": "yaml"}})
    assert "key 'format'" in str(error.value)
