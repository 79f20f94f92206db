"""ser2net compatibility without I/O: the ser2net.yaml reader, the converter's
pieces, the banner's bytes, and ser2net's command line (muxd.ser2net)."""

from __future__ import annotations

import pytest

from muxd import banner
from muxd.protocol.line_settings import LineSettings
from muxd.ser2net import convert, mode, options, reader

TWO = """\
%YAML 1.1
---
connection: &first
  accepter: tcp,2000
  connector: serialdev,/dev/ttyS0,9600n81
connection: &second
  accepter: tcp,2001
  connector: serialdev,/dev/ttyS1,9600n81
"""


def test_repeated_connections_are_all_kept_with_their_anchor_as_name_and_their_lines() -> None:
    parsed = reader.read(TWO, "x.yaml")
    assert parsed.problems == []
    assert [(c.name, c.line) for c in parsed.connections] == [("first", 3), ("second", 6)]
    assert parsed.connections[1].items["connector"] == reader.Item(
        "connector", "serialdev,/dev/ttyS1,9600n81", 8
    )


def test_define_alias_and_in_string_substitution() -> None:
    text = """\
define: &base "/dev/serial/by-path/pci-0000:00:1d.0"
define: &usb "*(base)-usb-0:1.8"
define: &b1 Banner \\p *(*not a name)
connection: &c
  accepter: tcp,2000
  connector: serialdev,*(usb)-port0,115200n81
  options:
    banner: *b1
    signature: '*(usb)!'
"""
    parsed = reader.read(text)
    assert parsed.problems == []
    conn = parsed.connections[0]
    assert (
        conn.items["connector"].value
        == "serialdev,/dev/serial/by-path/pci-0000:00:1d.0-usb-0:1.8-port0,115200n81"
    )
    assert conn.options == [
        reader.Item("banner", "Banner \\p *(not a name)", 8),
        reader.Item("signature", "/dev/serial/by-path/pci-0000:00:1d.0-usb-0:1.8!", 9),
    ]


def test_an_undefined_substitution_and_a_file_read_are_problems_with_their_line() -> None:
    text = (
        "connection: &c\n  accepter: tcp,2000\n  connector: serialdev,*(nope),9600n81\n"
        "  options:\n    banner: '*{pw}'\n"
    )
    parsed = reader.read(text)
    assert [p.message.split(":")[0] for p in parsed.problems] == [
        "*(nope)",
        "*{FILE} (a string read from a file) is not supported; write it inline",
    ]
    assert [p.line for p in parsed.problems] == [3, 5]


def test_defaults_apply_to_the_connections_after_them_only() -> None:
    text = """\
connection: &a
  accepter: tcp,2000
  connector: serialdev,/dev/ttyS0
default:
  name: speed
  value: 115200n81
  class: serialdev
connection: &b
  accepter: tcp,2001
  connector: serialdev,/dev/ttyS1
"""
    result = convert.convert(reader.read(text))
    assert result.errors == []
    assert [p.data["upstream"]["baudrate"] for p in result.ports] == [9600, 115200]


def test_yaml_errors_unknown_keys_and_nameless_connections_are_located() -> None:
    assert reader.read("connection: [\n", "f").problems[0].line == 2
    parsed = reader.read("connection:\n  accepter: tcp,1\nfrobnicate: 1\n")
    assert [(p.line, p.message.split(":")[0]) for p in parsed.problems] == [
        (1, "connection"),
        (3, "frobnicate"),
    ]


def test_split_top_keeps_parentheses_and_strips_folded_whitespace() -> None:
    assert reader.split_top("telnet(rfc2217,mode=server),tcp,2000") == [
        "telnet(rfc2217,mode=server)",
        "tcp",
        "2000",
    ]
    assert reader.split_top("serialdev, /dev/ttyS0, 9600n81,local") == [
        "serialdev",
        "/dev/ttyS0",
        "9600n81",
        "local",
    ]
    assert reader.name_and_args("serialdev(nouucplock=true)") == ("serialdev", ["nouucplock=true"])


def _accepter(text: str) -> tuple[options.Accepter | None, list[options.Error], list[str]]:
    errors: list[options.Error] = []
    c = options.Conn(reader.Connection("x", 1), errors)
    return convert.parse_accepter(c, reader.Item("accepter", text, 1)), errors, c.comments


@pytest.mark.parametrize(
    ("text", "kind", "hosts", "loose"),
    [
        ("tcp,2000", "tcp", ("0.0.0.0", "[::]"), False),
        ("tcp,localhost,2000", "tcp", ("127.0.0.1",), False),
        ("tcp,::1,2000", "tcp", ("[::1]",), False),
        ("telnet(rfc2217),tcp,2000", "rfc2217", ("0.0.0.0", "[::]"), False),
        ("telnet(rfc2217,mode=server),tcp,2000", "rfc2217", ("0.0.0.0", "[::]"), False),
        ("telnet(rfc2217),2000", "rfc2217", ("0.0.0.0", "[::]"), False),  # labgrid before 23.0
        ("telnet,tcp,192.168.1.5,2000", "rfc2217", ("192.168.1.5",), True),
    ],
)
def test_accepter_forms(text: str, kind: str, hosts: tuple[str, ...], loose: bool) -> None:
    acc, errors, comments = _accepter(text)
    assert errors == []
    assert acc == options.Accepter(kind, hosts, 2000)
    assert bool(comments) == loose


@pytest.mark.parametrize(
    "text", ["sctp,2000", "udp,2000", "telnet,ssl,tcp,2000", "tcp,myhost.example,2000", "tcp,70000"]
)
def test_accepters_muxd_cannot_serve_are_errors(text: str) -> None:
    acc, errors, _ = _accepter(text)
    assert acc is None and len(errors) == 1


def test_connector_spans_lines_and_takes_rtscts_and_local() -> None:
    text = (
        "connection: &c\n  accepter: tcp,2000\n  connector: serialdev(nouucplock=true),\n"
        "     /dev/ttyUSB0,\n     57600e72,local,rtscts\n"
    )
    result = convert.convert(reader.read(text))
    assert result.errors == []
    assert result.ports[0].data["upstream"] == {
        "serial": "/dev/ttyUSB0",
        "baudrate": 57600,
        "parity": "even",
        "bytesize": 7,
        "stopbits": 2,
        "flow": "rtscts",
    }
    assert result.ports[0].data["name"] == "ttyUSB0"


def test_banner_bytes() -> None:
    ctx = banner.BannerContext(
        port="2000", device="/dev/ttyS0", settings=LineSettings(9600), name="ttyS0", peer="::1"
    )
    assert banner.expand("\\r\\nport \\p dev \\d [\\B] \\o \\I\\x41\\101\\\\", ctx) == (
        b"\r\nport 2000 dev /dev/ttyS0 [9600N81] ttyS0 ::1AA\\"
    )
    assert banner.expand("caf\u00e9\\t", ctx) == "caf\u00e9\t".encode()
    assert banner.check("ok \\p") is None
    assert "\\Y" in (banner.check("year \\Y") or "")
    assert banner.check("x" * (banner.MAX_BANNER + 1)) is not None


def test_yaml_option_hash_is_a_newline_outside_quotes() -> None:
    assert (
        mode.yaml_option("connection: &con01#  accepter: tcp,2000")
        == "connection: &con01\n  accepter: tcp,2000\n"
    )
    assert mode.yaml_option('  banner: "### A #"#x') == '  banner: "### A #"\nx\n'


LABGRID = [
    "-d",
    "-n",
    "-Y",
    "connection: &con01#  accepter: telnet(rfc2217,mode=server),tcp,5000",
    "-Y",
    "  connector: serialdev(nouucplock=true),/dev/ttyUSB0,115200n81,local",
    "-Y",
    "  options:",
    "-Y",
    "    max-connections: 10",
]


def test_labgrid_command_line_gives_one_rfc2217_port() -> None:
    opts = mode.parse_args(LABGRID)
    assert opts.foreground and opts.debug and opts.config is None
    result = convert.convert(reader.read("".join(opts.yaml), "<-Y>"))
    assert result.errors == []
    [port] = result.data
    assert port["upstream"] == {
        "serial": "/dev/ttyUSB0",
        "baudrate": 115200,
        "parity": "none",
        "bytesize": 8,
        "stopbits": 1,
    }
    assert port["listeners"] == [
        {"rfc2217": "0.0.0.0:5000", "name": "con01", "mode": "rw", "max_clients": 10},
        {"rfc2217": "[::]:5000", "name": "con01-v6", "mode": "rw", "max_clients": 10},
    ]


def test_ser2net_options() -> None:
    assert mode.parse_args(["-u", "-P", "/run/x.pid", "-c/etc/s.yaml"]).pidfile == "/run/x.pid"
    assert mode.parse_args(["-v"]).version
    assert mode.parse_args(["-dn"]).foreground
    for bad in (["-p", "tcp,2000"], ["-C", "2000:telnet:0:/dev/ttyS0:9600"], ["-Z"], ["-c"]):
        with pytest.raises(mode.UsageError):
            mode.parse_args(bad)


def test_version_line_is_three_words_major_4() -> None:
    words = mode.version_line().split(" ")
    assert len(words) == 3 and words[:2] == ["ser2net", "version"] and words[2].startswith("4.")
