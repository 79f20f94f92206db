"""The keys of the config file: which names each mapping accepts.

An unknown key is an error, never ignored (a misspelt ``overflow`` that fell
back to its default would be worse than no config), so these sets are the
schema's vocabulary. ``schema_keys()`` is every name, which the man page
muxd.yaml(5) must document (tests/test_manpages.py).
"""

from __future__ import annotations

from muxd.config.model import LISTENER_KINDS

TOP_KEYS = {"ports", "http", "log_level", "mqtt", "control"}
CONTROL_KEYS = {"path", "socket_mode", "group"}  # control: as a mapping
PORT_KEYS = {
    "name",
    "upstream",
    "listeners",
    "write_queue",
    "max_line",
    "line_timeout",
    "history",
    "line_control",
    "write_lock",
    "lock_idle",
    "owner_idle",
    "trace",
    "sequences",
    "mqtt",
}
TRACE_KEYS = {"path", "format", "rotate", "keep", "input", "events", "mode", "group"}
LINE_KEYS = {"baudrate", "bytesize", "parity", "stopbits", "flow"}
BACKOFF_KEYS = {"backoff_min", "backoff_max"}
SERIAL_KEYS = {"serial"} | LINE_KEYS | BACKOFF_KEYS
TCP_KEYS = (
    {"tcp", "connect_timeout", "keepalive_idle", "keepalive_interval", "keepalive_count", "idle_timeout"}
    | {"control"}
    | LINE_KEYS
    | BACKOFF_KEYS
)
SIM_KEYS = {"baudrate", "status_interval", "boot"}
LISTENER_COMMON = {"name", "mode", "max_clients", "buffer", "overflow", "write", "notices"}
LISTENER_COMMON |= {"history", "history_lines", "block_timeout"}
LISTENER_EXTRA = {
    "tcp": {"format", "allow", "tls", "banner", "escape"},
    "rfc2217": {"allow", "tls", "banner"},
    "websocket": {"format", "allow"},
    "unix": {"socket_mode", "group", "format", "banner", "escape"},
    "pty": {"link_mode", "group", "escape"},
}
# "token" (inline) is refused with a pointer to "tokens": see _http.
HTTP_KEYS = {"listen", "name", "origins", "token", "tokens", "server_names", "allow", "metrics_token"}
TOKEN_KEYS = {"name", "file", "scope"}
TLS_KEYS = {"cert", "key", "client_ca", "handshake_timeout"}  # of a listener's or http server's tls:
HTTP_KEYS |= {"tls"}
UPSTREAM_KINDS = ("serial", "tcp", "sim")
MQTT_KEYS = {"broker", "client_id", "prefix", "tls", "username", "password_file", "keepalive"}
MQTT_KEYS |= {"connect_timeout"} | BACKOFF_KEYS
MQTT_TLS_KEYS = {"ca", "cert", "key"}
PORT_MQTT_KEYS = {"format", "qos", "write", "buffer"}


def schema_keys() -> set[str]:
    """Every key name the config file accepts."""
    keys = TOP_KEYS | PORT_KEYS | SERIAL_KEYS | TCP_KEYS | {"sim"} | SIM_KEYS | LISTENER_COMMON | HTTP_KEYS
    keys |= TRACE_KEYS | TOKEN_KEYS | CONTROL_KEYS
    keys |= TLS_KEYS | {"tls"}
    keys |= MQTT_KEYS | MQTT_TLS_KEYS | PORT_MQTT_KEYS | {"mqtt"}
    keys |= set(LISTENER_KINDS)
    for extra in LISTENER_EXTRA.values():
        keys |= extra
    return keys
