"""Handler modules that take settings: a section named after the module, checked when the config loads."""

import pytest

from glb.config import from_dict
from glb.errors import ConfigError
from tests.support import base_url, running_glb, ws_connect

MODULE = "tests.handler_with_settings"


def config_error(data):
    with pytest.raises(ConfigError) as error:
        from_dict(data)
    return str(error.value)


def test_a_module_gets_its_section_and_each_balancer_its_own_object():
    with running_glb(handlers={"modules": MODULE}, **{MODULE: {"greeting": "hi", "times": "2"}}) as glb, \
            running_glb(handlers={"modules": MODULE}) as other:
        ws = ws_connect(base_url(glb) + "/glb/echo")
        ws.send("?")
        assert (ws.recv(), ws.recv()) == ("hi", "hi")
        ws.close()
        ws = ws_connect(base_url(other) + "/glb/echo")  # no section: the module's defaults
        ws.send("?")
        assert ws.recv() == "hello"
        ws.close()


def test_bad_values_name_the_file_section_and_key():
    data = {"handlers": {"modules": MODULE}, MODULE: {"times": "9"}}
    assert config_error(data) == f"file <dict>, section [{MODULE}], key 'times': must be at most 3, got 9"
    data[MODULE] = {"volume": "loud"}
    assert config_error(data).startswith(f"file <dict>, section [{MODULE}], key 'volume': unknown key")


def test_sections_for_modules_not_listed_or_without_settings_stop_start_up():
    assert "which [handlers] modules does not list" in config_error({MODULE: {"times": "2"}})
    assert "declares no settings" in config_error(
        {"handlers": {"modules": "tests.handler_passthrough"}, "tests.handler_passthrough": {"x": "1"}})
    assert config_error({"handlers": {"modules": "no_such.module"}, "no_such.module": {"x": "1"}}).startswith(
        "file <dict>, section [handlers], key 'modules': handler module no_such.module cannot be imported")
