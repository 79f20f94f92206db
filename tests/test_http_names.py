"""muxd.protocol.http_names byte by byte, without sockets: request targets,
Host values (good, malformed and hostile), the names a server answers to, and
peer addresses."""

from __future__ import annotations

import pytest

from muxd.config import HttpServer
from muxd.protocol.http_names import (
    ECHO_LIMIT,
    KnownHosts,
    echo,
    host_names,
    is_loopback,
    names_server,
    normal_host,
    parse_host,
    peer_ip,
    split_target,
)


@pytest.mark.parametrize(
    ("target", "split"),
    [
        (b"/", (None, "/", "")),
        (b"/api/v1/ports?x=1", (None, "/api/v1/ports", "x=1")),
        (b"/a#frag?not-a-query", (None, "/a", "")),
        (b"/a?b?c", (None, "/a", "b?c")),
        # urlsplit reads these as a network location and raises on "[".
        (b"//[", (None, "//[", "")),
        (b"//[::1]/x?y", (None, "//[::1]/x", "y")),
        # Absolute-form: the authority comes back, whatever its case or shape.
        (b"http://Example.COM:8080/a?b#c", ("Example.COM:8080", "/a", "b")),
        (b"HTTPS://h?x", ("h", "/", "x")),
        (b"http://h", ("h", "/", "")),
        (b"http://", ("", "/", "")),
        (b"http://[::1/p", ("[::1", "/p", "")),
        (b"/\xff", (None, "/\ufffd", "")),
    ],
)
def test_split_target_origin_and_absolute_form(target: bytes, split: tuple[str | None, str, str]) -> None:
    assert split_target(target) == split


@pytest.mark.parametrize("target", [b"", b"*", b"example.com:80", b"ftp://x/", b"a/b", b"\x00/", b"http:/x"])
def test_split_target_refuses_other_forms(target: bytes) -> None:
    assert split_target(target) is None


def test_split_target_of_a_long_target_keeps_it_whole() -> None:
    path = "/" + "a/" * 8000
    assert split_target(path.encode() + b"?" + b"q" * 16000) == (None, path, "q" * 16000)


@pytest.mark.parametrize(
    ("value", "parsed"),
    [
        ("localhost", ("localhost", None)),
        ("LOCALHOST.:8080", ("localhost", 8080)),
        ("EXAMPLE.com.", ("example.com", None)),
        ("under_score-1.lab:80", ("under_score-1.lab", 80)),
        ("127.0.0.1:", ("127.0.0.1", None)),
        ("127.0.0.1.:8080", ("127.0.0.1", 8080)),
        ("[::1]:80", ("::1", 80)),
        ("[::1]:", ("::1", None)),
        ("[0:0::1]", ("::1", None)),
        ("[::FFFF:127.0.0.1]", ("::ffff:7f00:1", None)),
        ("host:00080", ("host", 80)),
        ("a" * 253, ("a" * 253, None)),
        # Not a canonical IP (leading zeros): kept as text, so it names no server.
        ("127.000.000.001", ("127.000.000.001", None)),
    ],
)
def test_parse_host(value: str, parsed: tuple[str, int | None]) -> None:
    assert parse_host(value) == parsed


@pytest.mark.parametrize(
    "value",
    [
        "",
        "::1",  # IPv6 without brackets
        "[::1",
        "[::1]x",
        "[]",
        "[127.0.0.1]",
        "[v1.fe]",
        "[example.com]",
        "ex ample",
        "host/path",
        "h\u00e9te",
        "a" * 254,
        "x" * 20000,
        "h:123456",
        "h:+80",
        "h:-1",
        "h: 80",
        "h:80:80",
        "h:\uff18\uff10",  # fullwidth digits: isdigit() says yes, int() would take them
        "h:" + "9" * 5000,
        "evil.com@localhost",
    ],
)
def test_parse_host_refuses_malformed(value: str) -> None:
    assert parse_host(value) is None


def test_normal_host() -> None:
    assert normal_host("Foo.Example.") == "foo.example"
    assert normal_host("0::1") == "::1"
    assert normal_host("::FFFF:127.0.0.1") == "::ffff:7f00:1"
    assert normal_host("127.0.0.1.") == "127.0.0.1"
    assert normal_host("0x7f.1") == "0x7f.1"


def known(host: str = "0.0.0.0", port: int = 8080, names: tuple[str, ...] = ()) -> KnownHosts:
    return host_names(HttpServer(host=host, port=port, name="web", server_names=names), None)


def test_host_names_are_local_names_and_the_listen_host_with_its_port() -> None:
    names = known()
    assert names == {(h, 8080) for h in ("localhost", "127.0.0.1", "::1", "0.0.0.0")}


def test_host_names_add_the_bound_address_and_server_names_without_port() -> None:
    cfg = HttpServer(host="::", port=0, name="web", server_names=("Console.Lab.",))
    names = host_names(cfg, ("::FFFF:10.0.0.5", 41234))
    assert ("::ffff:a00:5", 41234) in names and ("::ffff:a00:5", 0) in names
    assert ("::", 41234) in names and ("localhost", 41234) in names
    assert ("console.lab", None) in names


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("localhost:8080", True),
        ("LocalHost.:8080", True),
        ("127.0.0.1:8080", True),
        ("[::1]:8080", True),
        ("[0::1]:8080", True),
        ("console.lab", True),
        ("console.lab:443", True),  # a server name matches any port (a proxy's)
        ("CONSOLE.LAB.:8443", True),
        ("localhost", False),  # port 80 is not ours
        ("localhost:8081", False),
        ("evil.example:8080", False),  # DNS rebinding: a hostile name for our address
        ("localhost.evil.example:8080", False),
        ("127.000.000.001:8080", False),
        ("h:99999", False),
    ],
)
def test_names_server(value: str, ok: bool) -> None:
    parsed = parse_host(value)
    assert parsed is not None
    assert names_server(*parsed, known(names=("console.lab",))) is ok


def test_names_server_without_port_means_80() -> None:
    assert names_server("localhost", None, known(port=80))
    assert not names_server("localhost", None, known(port=8080))


@pytest.mark.parametrize(
    ("host", "ip"),
    [
        ("10.0.0.1", "10.0.0.1"),
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("0:0::1", "::1"),
        ("FE80::1", "fe80::1"),
        ("nonsense", "nonsense"),
        ("", ""),
    ],
)
def test_peer_ip(host: str, ip: str) -> None:
    assert peer_ip(host) == ip


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("::ffff:127.0.0.2", True),
        ("10.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::", False),
        ("localhost", False),  # a name, not an address: never trusted
        ("nonsense", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_echo_cuts_and_quotes() -> None:
    assert echo("x") == "'x'"
    assert echo("a" * ECHO_LIMIT) == repr("a" * ECHO_LIMIT)
    assert echo("a" * (ECHO_LIMIT + 1)) == repr("a" * ECHO_LIMIT) + "..."
    assert echo("\x1b[2J\n") == repr("\x1b[2J\n")
