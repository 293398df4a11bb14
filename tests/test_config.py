"""glb.config: parsing, every kind of error message, defaults, and the generated docs."""
import ipaddress
import os
import re
import textwrap

import pytest

from glb import config
from glb.config import (
    DECLARED, PATTERN, README_END, README_START, SECTIONS, SETTINGS, Settings, from_dict, load,
    readme_block, render_reference, render_sample, update_readme,
)
from glb.errors import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, text, name="lb.ini"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return str(path)


def error(data):
    """The ConfigError message for a from_dict config (asserted to be one line)."""
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    message = str(info.value)
    assert "\n" not in message
    return message


def file_error(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path)
    message = str(info.value)
    assert "\n" not in message
    return path, message, info.value


# --------------------------------------------------------------------------- defaults


def test_defaults():
    s = Settings.defaults()
    assert s.path is None
    assert s.glb.listen == [("127.0.0.1", 8080)]
    assert s.glb.balancing == "least_connections"
    assert s.glb.hash_key == "ip"
    assert s.glb.max_message_size == 16777216
    assert s.glb.prefix == "/glb/"
    assert s.glb.protocols == ["websocket", "http"]
    assert (s.glb.handshake_timeout, s.glb.idle_timeout, s.glb.ping_interval) == (10.0, 0.0, 30.0)
    assert (s.glb.ping_timeout, s.glb.send_timeout, s.glb.backend_connect_timeout) == (10.0, 30.0, 5.0)
    assert (s.glb.backend_retries, s.glb.shutdown_timeout, s.glb.log_level) == (2, 10.0, "info")
    assert s.handlers.modules == ["glb.handlers.access_log"]
    assert s.backends.token == ""
    assert s.backends.allow == [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    assert s.backends.verify is True
    assert (s.backends.cafile, s.backends.certfile, s.backends.keyfile) == (None, None, None)
    assert (s.http.connect_timeout, s.http.read_timeout) == (5.0, 60.0)
    assert (s.http.pool_connections, s.http.pool_maxsize, s.http.retries) == (10, 100, 2)
    assert (s.http.host_header, s.http.chunk_size) == ("client", 65536)
    assert s.tls.listen == [] and s.tls.certfile is None and s.tls.keyfile is None
    assert (s.tls.password, s.tls.minimum_version, s.tls.ciphers) == ("", "TLSv1.2", "")
    assert (s.tls.cafile, s.tls.verify_client) == (None, "none")
    assert s.demo.backends == 0
    assert s.backends_static == []


def test_every_declared_key_is_an_attribute():
    s = Settings.defaults()
    for setting in SETTINGS:
        if setting.section != PATTERN:
            assert hasattr(getattr(s, setting.section), setting.key)


def test_defaults_are_fresh_objects():
    a, b = Settings.defaults(), Settings.defaults()
    a.glb.listen.append(("::1", 1))
    assert b.glb.listen == [("127.0.0.1", 8080)]


def test_secrets_hidden_in_repr():
    s = from_dict({"backends": {"token": "s3cret"}})
    assert "s3cret" not in repr(s.backends) and "***" in repr(s.backends)


# --------------------------------------------------------------------------- types


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:8080", [("127.0.0.1", 8080)]),
    ("127.0.0.1:0", [("127.0.0.1", 0)]),
    ("[::1]:8080", [("::1", 8080)]),
    ("[::]:443, 0.0.0.0:80", [("::", 443), ("0.0.0.0", 80)]),
    ("localhost:65535\nexample.com:1", [("localhost", 65535), ("example.com", 1)]),
])
def test_listen(text, expected):
    assert from_dict({"glb": {"listen": text}}).glb.listen == expected


@pytest.mark.parametrize("text, reason", [
    ("127.0.0.1", "no port"),
    ("::1:8080", "IPv6 addresses go in brackets"),
    ("[::1]8080", "expected [ipv6]:port"),
    ("[nope]:80", "not an IPv6 address"),
    (":80", "no host"),
    ("127.0.0.1:65536", "port must be 0..65535"),
    ("127.0.0.1:http", "port must be 0..65535"),
    ("bad_host:80", "not a host name or address"),
    ("127.0.0.1:80, 127.0.0.1:80", "listed twice"),
])
def test_listen_errors(text, reason):
    message = error({"glb": {"listen": text}})
    assert message.startswith("file <dict>, section [glb], key 'listen': ")
    assert reason in message


def test_int():
    assert from_dict({"glb": {"max_message_size": "125"}}).glb.max_message_size == 125
    assert from_dict({"glb": {"max_message_size": 1 << 20}}).glb.max_message_size == 1 << 20
    assert "expected an integer, got '1.5'" in error({"glb": {"max_message_size": "1.5"}})
    assert error({"glb": {"max_message_size": "124"}}) == \
        "file <dict>, section [glb], key 'max_message_size': must be at least 125, got 124"
    assert "must be at most 16, got 17" in error({"demo": {"backends": "17"}})
    assert "must be at least 0, got -1" in error({"glb": {"backend_retries": "-1"}})


def test_seconds():
    s = from_dict({"glb": {"idle_timeout": "0", "ping_timeout": "0.25", "shutdown_timeout": 3}})
    assert (s.glb.idle_timeout, s.glb.ping_timeout, s.glb.shutdown_timeout) == (0.0, 0.25, 3.0)
    assert "must be greater than 0, got 0" in error({"glb": {"ping_timeout": "0"}})
    assert "must not be negative" in error({"glb": {"idle_timeout": "-1"}})
    assert "expected a number of seconds, got '10s'" in error({"glb": {"send_timeout": "10s"}})
    assert "finite" in error({"http": {"read_timeout": "inf"}})


@pytest.mark.parametrize("text, value", [
    ("true", True), ("Yes", True), ("on", True), ("1", True),
    ("false", False), ("no", False), ("OFF", False), ("0", False), (False, False),
])
def test_bool(text, value):
    assert from_dict({"backends": {"verify": text}}).backends.verify is value


def test_bool_error():
    assert error({"backends": {"verify": "maybe"}}) == (
        "file <dict>, section [backends], key 'verify': "
        "expected true/false, yes/no, on/off or 1/0, got 'maybe'")


def test_choice():
    assert from_dict({"glb": {"balancing": "P2C"}}).glb.balancing == "p2c"
    assert from_dict({"tls": {"minimum_version": "tlsv1.3"}}).tls.minimum_version == "TLSv1.3"
    message = error({"glb": {"balancing": "round-robin"}})
    assert message.startswith("file <dict>, section [glb], key 'balancing': expected one of random, ")
    assert "did you mean 'round_robin'?" in message


def test_list_of_choices():
    assert from_dict({"glb": {"protocols": "http"}}).glb.protocols == ["http"]
    assert from_dict({"glb": {"protocols": ["websocket"]}}).glb.protocols == ["websocket"]
    assert "needs at least 1 item" in error({"glb": {"protocols": ""}})
    assert "got 'ftp'" in error({"glb": {"protocols": "http, ftp"}})
    assert "listed twice" in error({"glb": {"protocols": "http, http"}})


def test_modules():
    assert from_dict({"handlers": {"modules": ""}}).handlers.modules == []
    assert from_dict({"handlers": {"modules": "a.b,\nc"}}).handlers.modules == ["a.b", "c"]
    assert error({"handlers": {"modules": "my-handlers"}}) == (
        "file <dict>, section [handlers], key 'modules': not a dotted module name: 'my-handlers'")


def test_networks():
    s = from_dict({"backends": {"allow": "10.1.2.3/8, 2001:db8::/32, 192.0.2.7"}})
    assert s.backends.allow == [ipaddress.ip_network(n) for n in ("10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32")]
    assert "not an IP network or address: '10.0.0.0/33'" in error({"backends": {"allow": "10.0.0.0/33"}})
    assert from_dict({"backends": {"allow": ""}}).backends.allow == []


@pytest.mark.parametrize("text", ["ip", "cookie:session", "header:X-Client-Id", "query:user"])
def test_hash_key(text):
    assert from_dict({"glb": {"hash_key": text}}).glb.hash_key == text


@pytest.mark.parametrize("text", ["", "cookie", "cookie:", "body:x", "header:a b", "IP"])
def test_hash_key_errors(text):
    assert "expected ip, cookie:NAME, header:NAME or query:NAME" in error({"glb": {"hash_key": text}})


def test_prefix():
    assert from_dict({"glb": {"prefix": "/_lb/"}}).glb.prefix == "/_lb/"
    assert "must start and end with '/', got 'glb/'" in error({"glb": {"prefix": "glb/"}})
    assert "must start and end with '/'" in error({"glb": {"prefix": "/glb"}})
    assert "plain path" in error({"glb": {"prefix": "/a?b/"}})


def test_token():
    assert from_dict({"backends": {"token": "abc%def"}}).backends.token == "abc%def"  # no interpolation
    assert "whitespace" in error({"backends": {"token": "two words"}})


def test_ciphers():
    assert from_dict({"tls": {"ciphers": "ECDHE+AESGCM"}}).tls.ciphers == "ECDHE+AESGCM"
    assert "OpenSSL accepts none of these ciphers" in error({"tls": {"ciphers": "NOPE-NOT-A-CIPHER"}})




def test_file_not_found(tmp_path):
    path, message, exc = file_error(tmp_path, "[tls]\ncafile = missing.pem\n")
    assert message == (f"file {path}, section [tls], key 'cafile': "
                       f"file not found: {tmp_path / 'missing.pem'}")
    assert (exc.file, exc.section, exc.key) == (path, "tls", "cafile")


def test_file_path_is_a_directory(tmp_path):
    assert "not a file" in error({"backends": {"cafile": str(tmp_path)}})


# --------------------------------------------------------------------------- TLS files (real certificates)


@pytest.fixture
def certs(tmp_path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    paths = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key", "other_key")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    ca.issue_cert("other").private_key_pem.write_to_path(str(paths["other_key"]))
    return {name: str(path) for name, path in paths.items()}


def test_tls_loads(certs):
    s = from_dict({"tls": {"listen": "127.0.0.1:0", "certfile": certs["cert"], "keyfile": certs["key"],
                           "cafile": certs["ca"], "verify_client": "required"}})
    assert s.tls.listen == [("127.0.0.1", 0)] and s.tls.certfile == certs["cert"]


def test_file_paths_resolve_against_the_config_directory(certs, tmp_path):
    path = write(tmp_path, "[backends]\ncafile = ca.pem\n")
    assert load(path).backends.cafile == certs["ca"]


def test_tls_listen_only(certs):
    s = from_dict({"glb": {"listen": ""},
                   "tls": {"listen": "[::1]:0", "certfile": certs["cert"], "keyfile": certs["key"]}})
    assert s.glb.listen == [] and s.tls.listen == [("::1", 0)]


def test_tls_key_does_not_match(certs):
    message = error({"tls": {"listen": "127.0.0.1:0", "certfile": certs["cert"], "keyfile": certs["other_key"]}})
    assert message.startswith("file <dict>, section [tls], key 'certfile': cannot load certificate and key: ")


def test_cafile_not_a_bundle(certs):
    message = error({"backends": {"cafile": certs["key"]}})
    assert message.startswith("file <dict>, section [backends], key 'cafile': not a usable CA bundle")


# --------------------------------------------------------------------------- cross-field checks


def test_tls_listen_needs_cert_and_key():
    assert error({"tls": {"listen": "127.0.0.1:8443"}}) == \
        "file <dict>, section [tls], key 'certfile': required when [tls] listen is set"


def test_cert_and_key_together(certs):
    assert error({"backends": {"certfile": certs["cert"]}}) == \
        "file <dict>, section [backends], key 'keyfile': required when certfile is set"
    assert error({"tls": {"keyfile": certs["key"]}}) == \
        "file <dict>, section [tls], key 'certfile': required when keyfile is set"


def test_verify_client_needs_cafile():
    assert error({"tls": {"verify_client": "optional"}}) == \
        "file <dict>, section [tls], key 'cafile': required when verify_client = optional"


def test_nothing_to_listen_on():
    assert "glb would accept no clients" in error({"glb": {"listen": ""}})


def test_same_address_in_both_listens(certs):
    message = error({"glb": {"listen": "127.0.0.1:8443"},
                     "tls": {"listen": "127.0.0.1:8443", "certfile": certs["cert"], "keyfile": certs["key"]}})
    assert message == "file <dict>, section [tls], key 'listen': 127.0.0.1:8443 is also in [glb] listen"


# --------------------------------------------------------------------------- [backend:NAME]


def test_static_backends(tmp_path):
    s = load(write(tmp_path, """
        [backend:one]
        url = ws://10.0.0.1:9001
        http = http://10.0.0.1:9001
        weight = 3
        max_clients = 100

        [backend:two]
        url = wss://b.example:443/
    """))
    one, two = s.backends_static
    assert (one.name, one.url, one.http, one.weight, one.max_clients) == \
        ("one", "ws://10.0.0.1:9001", "http://10.0.0.1:9001", 3, 100)
    assert (two.name, two.url, two.http, two.weight, two.max_clients) == ("two", "wss://b.example:443/", None, 1, 0)


@pytest.mark.parametrize("values, key, reason", [
    ({}, "url", "required key is missing"),
    ({"url": ""}, "url", "required, must not be empty"),
    ({"url": "http://a/"}, "url", "expected a ws:// or wss:// URL, got 'http://a/'"),
    ({"url": "ws:///path"}, "url", "no host in URL"),
    ({"url": "ws://a:99999/"}, "url", "bad port in URL"),
    ({"url": "ws://a/#x"}, "url", "#fragment"),
    ({"url": "ws://a/", "http": "ws://a/"}, "http", "expected a http:// or https:// URL"),
    ({"url": "ws://a/", "weight": "0"}, "weight", "must be at least 1, got 0"),
    ({"url": "ws://a/", "max_clients": "-1"}, "max_clients", "must be at least 0"),
    ({"url": "ws://a/", "wieght": "2"}, "wieght", "unknown key (did you mean 'weight'?)"),
])
def test_static_backend_errors(values, key, reason):
    message = error({"backend:a": values})
    assert message.startswith(f"file <dict>, section [backend:a], key '{key}': ")
    assert reason in message


def test_backend_name_errors(tmp_path):
    assert error({"backend:": {"url": "ws://a/"}}) == \
        "file <dict>, section [backend:]: bad backend name '': use [backend:NAME] where NAME is letters, " \
        "digits, '.', '_' or '-'"
    assert "bad backend name 'a b'" in error({"backend:a b": {"url": "ws://a/"}})
    assert error({"backend:a": {"url": "ws://a/"}, "backend: a": {"url": "ws://b/"}}) == \
        "file <dict>, section [backend: a]: backend name 'a' is also used by [backend:a]"
    path, message, _ = file_error(tmp_path, "[backend:a]\nurl = ws://a/\n[backend:a]\nurl = ws://b/\n")
    assert message == f"file {path}, section [backend:a]: line 3: section given twice"


def test_backend_same_url():
    assert error({"backend:a": {"url": "ws://a/"}, "backend:b": {"url": "ws://a/"}}) == \
        "file <dict>, section [backend:b], key 'url': same URL as [backend:a]"


# --------------------------------------------------------------------------- file and syntax errors


def test_missing_file(tmp_path):
    path = str(tmp_path / "nope.ini")
    with pytest.raises(ConfigError, match=r"^file .*nope\.ini: file not found$"):
        load(path)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load(str(tmp_path))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    path = write(tmp_path, "[glb]\n")
    os.chmod(path, 0)
    with pytest.raises(ConfigError, match="cannot read: permission denied"):
        load(path)


def test_not_utf8(tmp_path):
    path = tmp_path / "lb.ini"
    path.write_bytes(b"[glb]\nprefix = /\xff/\n")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        load(str(path))


def test_key_before_section(tmp_path):
    path, message, _ = file_error(tmp_path, "listen = 127.0.0.1:80\n")
    assert message == f"file {path}: line 1: 'listen = 127.0.0.1:80' comes before any [section] header"


def test_line_without_equals(tmp_path):
    path, message, _ = file_error(tmp_path, "[glb]\nlisten 127.0.0.1:80\n")
    assert message.startswith(f"file {path}: line 2: cannot parse ")
    assert "listen 127.0.0.1:80" in message


def test_duplicate_key(tmp_path):
    path, message, _ = file_error(tmp_path, "[glb]\nlisten = 127.0.0.1:1\nlisten = 127.0.0.1:2\n")
    assert message == f"file {path}, section [glb], key 'listen': line 3: key given twice"


def test_unknown_section(tmp_path):
    path, message, exc = file_error(tmp_path, "[backend]\nurl = ws://a/\n")
    assert message.startswith(f"file {path}, section [backend]: unknown section (did you mean [backends]?); known: ")
    assert exc.section == "backend" and exc.key is None
    assert "did you mean [backend:NAME]" in error({"backends:a": {"url": "ws://a/"}})
    assert "unknown section" in error({"DEFAULT": {"listen": "127.0.0.1:1"}})


def test_unknown_key_suggests(tmp_path):
    path, message, exc = file_error(tmp_path, "[glb]\nmax_mesage_size = 200\n")
    assert message == f"file {path}, section [glb], key 'max_mesage_size': unknown key (did you mean 'max_message_size'?)"
    assert (exc.file, exc.section, exc.key, exc.reason) == \
        (path, "glb", "max_mesage_size", "unknown key (did you mean 'max_message_size'?)")


def test_unknown_key_in_the_wrong_section():
    assert error({"glb": {"certfile": "x"}}) == \
        "file <dict>, section [glb], key 'certfile': unknown key here (it belongs in [backends] or [tls])"
    assert error({"demo": {"zzz": "1"}}) == "file <dict>, section [demo], key 'zzz': unknown key"


def test_bad_value_in_a_file_names_the_file(tmp_path):
    path, message, _ = file_error(tmp_path, "[http]\nhost_header = proxy\n")
    assert message == (f"file {path}, section [http], key 'host_header': "
                       "expected one of client, backend; got 'proxy'")


def test_ini_syntax_accepted(tmp_path):
    s = load(write(tmp_path, """
        ; a comment
        # another
        [glb]
        Listen = 127.0.0.1:1,   ; inline comment
            [::1]:2             # continuation line
        prefix = /a%b/
        [backends]
        token = abc#def
    """))
    assert s.glb.listen == [("127.0.0.1", 1), ("::1", 2)]
    assert s.glb.prefix == "/a%b/"
    assert s.backends.token == "abc#def"
    assert s.path.endswith("lb.ini")


def test_dict_must_hold_dicts():
    assert error({"glb": "listen"}) == "file <dict>, section [glb]: expected a dict of key: value"


# --------------------------------------------------------------------------- shipped config, sample, reference


def test_shipped_config_loads_and_declares_every_key():
    import configparser

    path = os.path.join(ROOT, "conf", "lb.ini")
    s = load(path)
    assert s.glb.listen == [("127.0.0.1", 8080)]
    assert s.glb.balancing == "least_connections"
    assert s.glb.max_message_size == 16777216
    assert s.handlers.modules == ["glb.handlers.access_log"]
    assert s.demo.backends == 2
    raw = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#", ";"))
    raw.read(path, encoding="utf-8")
    for section in raw.sections():
        for key in raw.options(section):
            assert key in DECLARED[section], (section, key)


def test_sample_loads_as_defaults(tmp_path):
    sample = render_sample()
    s = load(write(tmp_path, sample))
    assert s.glb.listen == Settings.defaults().glb.listen and s.backends_static == []
    # Uncommenting every key gives the defaults too (plus the example backend).
    uncommented = re.sub(r"(?m)^#(?=\[|\w+ =)", "", sample)
    s = load(write(tmp_path, uncommented, "all.ini"))
    defaults = Settings.defaults()
    for section in SECTIONS:
        if section != PATTERN:
            assert vars(getattr(s, section)) == vars(getattr(defaults, section))
    assert [b.name for b in s.backends_static] == ["example"]


def test_reference_contains_every_setting():
    reference = render_reference()
    for section in SECTIONS:
        assert f"### `[{section}]`" in reference
    for setting in SETTINGS:
        row = next(line for line in reference.splitlines() if line.startswith(f"| `{setting.key}` |")
                   and setting.doc.replace("|", "\\|") in line)
        assert setting.type.name.replace("|", "\\|") in row


def test_update_readme(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# glb\n\n## Settings\n\n{README_START}\nold\n{README_END}\n\n## More\n", encoding="utf-8")
    assert update_readme(str(readme)) is True
    text = readme.read_text(encoding="utf-8")
    assert readme_block(text) == render_reference().strip()
    assert text.startswith("# glb\n\n## Settings\n\n") and text.endswith(f"{README_END}\n\n## More\n")
    assert update_readme(str(readme)) is False  # already in sync: untouched
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="settings:start"):
        update_readme(str(readme))


def test_cli(tmp_path, capsys):
    assert config.main(["--check", os.path.join(ROOT, "conf", "lb.ini")]) == 0
    assert config.main(["--check", str(tmp_path / "nope.ini")]) == 2
    assert "file not found" in capsys.readouterr().err
    assert config.main(["--reference"]) == 0
    assert capsys.readouterr().out == render_reference()


def _readme_block_or_none():
    path = os.path.join(ROOT, "README.md")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as stream:
        return readme_block(stream.read())


@pytest.mark.skipif(_readme_block_or_none() is None,
                    reason="README.md does not exist yet or lacks the <!-- settings:start/end --> markers")
def test_readme_settings_block_is_current():
    assert _readme_block_or_none() == render_reference().strip(), \
        "README.md settings block is stale: run `python -m glb.config --write-readme README.md`"
