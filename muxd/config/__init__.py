"""The configuration file: YAML in, frozen dataclasses out; one public face.

The package is split by job:

- ``model``: the frozen dataclasses and closed vocabularies (Literal types)
  that the rest of muxd imports;
- ``values``: the value grammars (sizes, durations, HOST:PORT, modes, groups);
- ``keys``: the keys each mapping of the file accepts;
- ``yaml_reader``: the hardened YAML composer and the located nodes, the
  only module that imports YAML;
- ``schema``: the sections, node tree -> Config, every error in one pass;
- ``report``: the errors of one file, collected and raised together.
The checks against the machine are muxd.checks'.

Importing this package loads no YAML parser: the dataclasses are all most
modules need (the sans-I/O HTTP code among them). ``load``, ``loads``,
``load_all`` and ``from_data`` import the schema, and YAML, when first called.
"""

from __future__ import annotations

from typing import Any

from muxd.config.keys import (
    BACKOFF_KEYS,
    CONTROL_KEYS,
    HTTP_KEYS,
    LINE_KEYS,
    LISTENER_COMMON,
    LISTENER_EXTRA,
    MQTT_KEYS,
    MQTT_TLS_KEYS,
    PORT_KEYS,
    PORT_MQTT_KEYS,
    SERIAL_KEYS,
    SIM_KEYS,
    TCP_KEYS,
    TLS_KEYS,
    TOKEN_KEYS,
    TOP_KEYS,
    TRACE_KEYS,
    UPSTREAM_KINDS,
    schema_keys,
)
from muxd.config.model import (
    LINE_CONTROL_POLICIES,
    LISTENER_KINDS,
    LOG_LEVELS,
    MODES,
    OVERFLOWS,
    UPSTREAM_CONTROLS,
    WRITE_MODES,
    Config,
    ControlSocket,
    HttpServer,
    LineControlPolicy,
    Listener,
    ListenerKind,
    LogLevel,
    Mode,
    MqttConfig,
    MqttTls,
    Overflow,
    Port,
    PortMqtt,
    SerialUpstream,
    SimUpstream,
    TcpUpstream,
    TlsConfig,
    TraceFile,
    Upstream,
    UpstreamControl,
    WriteMode,
)
from muxd.config.report import ConfigErrors, each_error
from muxd.config.values import (
    DEFAULT_HOST,
    NAME_RE,
    PARITY_NAMES,
    SHOW_CHARS,
    GiB,
    KiB,
    MiB,
    format_hostport,
    parse_duration,
    parse_hostport,
    parse_server_name,
    parse_size,
)
from muxd.errors import ConfigError

__all__ = [
    "BACKOFF_KEYS",
    "CONTROL_KEYS",
    "DEFAULT_HOST",
    "HTTP_KEYS",
    "LINE_CONTROL_POLICIES",
    "LINE_KEYS",
    "LISTENER_COMMON",
    "LISTENER_EXTRA",
    "LISTENER_KINDS",
    "LOG_LEVELS",
    "MODES",
    "MQTT_KEYS",
    "MQTT_TLS_KEYS",
    "NAME_RE",
    "OVERFLOWS",
    "PARITY_NAMES",
    "PORT_KEYS",
    "PORT_MQTT_KEYS",
    "SERIAL_KEYS",
    "SHOW_CHARS",
    "SIM_KEYS",
    "TCP_KEYS",
    "TLS_KEYS",
    "TOKEN_KEYS",
    "TOP_KEYS",
    "TRACE_KEYS",
    "UPSTREAM_CONTROLS",
    "UPSTREAM_KINDS",
    "WRITE_MODES",
    "Config",
    "ConfigError",
    "ConfigErrors",
    "ControlSocket",
    "GiB",
    "HttpServer",
    "KiB",
    "LineControlPolicy",
    "Listener",
    "ListenerKind",
    "LogLevel",
    "MiB",
    "Mode",
    "MqttConfig",
    "MqttTls",
    "Overflow",
    "Port",
    "PortMqtt",
    "SerialUpstream",
    "SimUpstream",
    "TcpUpstream",
    "TlsConfig",
    "TraceFile",
    "Upstream",
    "UpstreamControl",
    "WriteMode",
    "each_error",
    "format_hostport",
    "from_data",
    "load",
    "load_all",
    "loads",
    "parse_duration",
    "parse_hostport",
    "parse_server_name",
    "parse_size",
    "schema_keys",
]


def load(path: str, *, in_loop: bool = False) -> Config:
    """The config of the file `path`; ConfigErrors naming every error, in line order.
    ``in_loop``: a reload, which reads a regular file only (schema._text_of)."""
    from muxd.config import schema

    return schema.load(path, in_loop=in_loop)


def loads(text: str, file: str = "<config>") -> Config:
    """The config of `text`, read as the file `file`."""
    from muxd.config import schema

    return schema.loads(text, file)


def load_all(path: str) -> tuple[Config | None, list[ConfigError]]:
    """For `muxd check`: what could be read of the file, and every error (schema.load_all)."""
    from muxd.config import schema

    return schema.load_all(path)


def from_data(data: dict[str, Any], source: str = "<command line>") -> Config:
    """Validate a config given as Python data (the one-port command-line form)."""
    from muxd.config import schema

    return schema.from_data(data, source)
