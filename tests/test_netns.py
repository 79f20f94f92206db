"""muxd across hosts: two network namespaces joined by a veth pair, so clients
reach muxd over real, non-loopback addresses.

Namespace A holds muxd (198.18.0.1, fd00:6d78::1); namespace B the clients and
the MQTT broker (198.18.0.2 and a second address, 198.18.0.3, for a peer to
refuse; fd00:6d78::2 and ::3). The addresses are from the benchmarking range
(RFC 2544) and an IPv6 ULA, on a veth pair that only these namespaces see:
nothing reaches the host's own interfaces. The names carry the PID and a
random tag, and the namespaces (the veth pair with them) are deleted at the
end, also when a test fails.

Each namespace has a worker thread that entered it with setns(2). A socket
belongs to the namespace of the thread that created it, and a child process
to that of the thread that forked it, so the harness runs unchanged there:
``hosts.a.call(start_on_pty, ...)`` starts muxd inside A (and reads its API
on A's loopback), ``hosts.b.call(connect_from, ...)`` opens a client socket
from B, which the test then reads from any thread; mosquitto and its paho
subscriber (tests/test_mqtt.py's) are started from B's thread the same way.
Every process is stopped by PID by its fixture, before the namespaces go.

Needs root and iproute2's ``ip``; skipped otherwise, with the reason.
"""

from __future__ import annotations

import ctypes
import functools
import os
import secrets
import shutil
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from muxd.config import format_hostport
from tests.helpers import (
    Muxd,
    PtyDevice,
    StartMuxd,
    read_to_eof,
    recv_until,
    split_hostport,
    start_on_pty,
    wait_for,
)
from tests.test_mqtt import Broker, Subscriber, data_records, joined, needs_broker, start_bridged

IP = shutil.which("ip")
pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or IP is None,
    reason="network namespaces need root and iproute2's ip"
    + ("" if IP else " (not installed)")
    + ("" if os.geteuid() == 0 else " (not root)"),
)

CLONE_NEWNET = 0x40000000  # <sched.h>; os.CLONE_NEWNET only from Python 3.12
# One address per role and family: (muxd's, an allowed peer's, a refused peer's).
ADDRESSES = {
    "ipv4": ("198.18.0.1", "198.18.0.2", "198.18.0.3"),
    "ipv6": ("fd00:6d78::1", "fd00:6d78::2", "fd00:6d78::3"),
}
SERVER4, PEER4, OUTSIDER4 = ADDRESSES["ipv4"]
SERVER6, PEER6, OUTSIDER6 = ADDRESSES["ipv6"]
MQTT_PORT = 1883  # B is a namespace of our own: the broker's usual port is free there

T = TypeVar("T")


# -- the namespaces ---------------------------------------------------------------------------


def ip_run(*args: str) -> subprocess.CompletedProcess[str]:
    """``ip ARGS`` to its end, its output captured."""
    assert IP is not None
    return subprocess.run([IP, *args], capture_output=True, text=True, timeout=10, check=False)


def ip(*args: str) -> None:
    """Run ``ip ARGS``; fail with its message."""
    done = ip_run(*args)
    if done.returncode != 0:
        raise AssertionError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class Netns:
    """A network namespace made with ``ip netns add``, and one worker thread inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"netns-{name}", initializer=self._enter)

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns into {self.name}: {os.strerror(err)}")
        finally:
            os.close(fd)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """fn(*args, **kwargs) on the thread inside the namespace; its result or its exception."""
        return self._worker.submit(fn, *args, **kwargs).result(timeout=60)

    def close(self) -> None:
        self._worker.shutdown(wait=True)


@dataclass
class Hosts:
    a: Netns  # muxd's
    b: Netns  # the clients' and the broker's


@pytest.fixture(scope="module")
def hosts() -> Iterator[Hosts]:
    tag = f"{os.getpid():x}{secrets.token_hex(2)}"  # unique per run; veth names stay <= 15 chars
    names = (f"muxd-{tag}-a", f"muxd-{tag}-b")
    veth_a, veth_b = f"mx{tag}a", f"mx{tag}b"
    made: list[str] = []
    try:
        for name in names:
            done = ip_run("netns", "add", name)
            if done.returncode != 0:
                pytest.skip(f"cannot create a network namespace: {done.stderr.strip()}")
            made.append(name)
        a, b = names
        ip("link", "add", veth_a, "netns", a, "type", "veth", "peer", "name", veth_b, "netns", b)
        for ns, dev, mine in ((a, veth_a, (SERVER4,)), (b, veth_b, (PEER4, OUTSIDER4))):
            ip("-n", ns, "link", "set", "lo", "up")  # the harness reads muxd's API on A's loopback
            for addr in mine:
                ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            six = (SERVER6,) if ns == a else (PEER6, OUTSIDER6)
            for addr in six:  # nodad: usable at once, no duplicate detection to wait for
                ip("-n", ns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
            ip("-n", ns, "link", "set", dev, "up")
        for ns, dev in ((a, veth_a), (b, veth_b)):
            wait_for(functools.partial(carrier, ns, dev), 10, f"{dev} up in {ns}")
        pair = Hosts(Netns(a), Netns(b))
        try:
            yield pair
        finally:
            pair.a.close()
            pair.b.close()
    finally:
        for name in made:  # the veth pair goes with its namespaces
            ip("netns", "del", name)


def carrier(ns: str, dev: str) -> bool:
    return "LOWER_UP" in ip_run("-n", ns, "-o", "link", "show", "dev", dev).stdout


def connect_from(source: str, server: str, port: int) -> socket.socket:
    """A TCP connection from this source address (run it on B's thread)."""
    return socket.create_connection((server, port), timeout=5, source_address=(source, 0))


def muxd_in_a(hosts: Hosts, muxd: StartMuxd, tmp_path: Path, dev: PtyDevice, listeners: list[Any]) -> Muxd:
    """muxd inside A on the pty, ready (its API answers on A's loopback, the upstream is up)."""
    return hosts.a.call(start_on_pty, muxd, tmp_path, dev, listeners)


def bytes_in(hosts: Hosts, m: Muxd) -> int:
    return int(hosts.a.call(m.port_info)["bytes_in"])


# -- allow: across real addresses ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_allow_list_serves_its_peer_and_refuses_another_host(
    family: str, hosts: Hosts, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """From B, the allowed address reads the device; the other address of the same
    host gets no byte (not even the history it would have had), and is counted."""
    server, peer, outsider = ADDRESSES[family]
    walled = {"tcp": format_hostport(server, 0), "name": "walled", "allow": [peer], "history": 4096}
    m = muxd_in_a(hosts, muxd, tmp_path, pty_device, [walled])
    _, port = split_hostport(m.address("walled"))
    pty_device.write(b"history for whoever is let in\r\n")
    wait_for(lambda: bytes_in(hosts, m) == 31, what="the line in muxd's history")

    for _ in range(3):
        refused = hosts.b.call(connect_from, outsider, server, port)
        with refused:
            assert read_to_eof(refused) == b""
    hosts.a.call(m.wait_metric, "muxd_client_rejected_total", 3, listener="walled", reason="address")
    assert hosts.a.call(m.metric, "muxd_client_rejected_total", reason="address") == 3

    with hosts.b.call(connect_from, peer, server, port) as allowed:
        assert recv_until(allowed, b"\r\n") == b"history for whoever is let in\r\n"
        hosts.a.call(m.wait_connected, 1)
        [client] = hosts.a.call(m.clients)
        assert split_hostport(client["peer"])[0] == peer, client
        pty_device.write(b"live from the board\r\n")
        assert recv_until(allowed, b"board\r\n") == b"live from the board\r\n"
    assert hosts.a.call(m.metric, "muxd_client_rejected_total", reason="address") == 3


# -- TLS across real addresses --------------------------------------------------------------------


def test_tls_certificate_for_the_servers_ip_verifies_from_the_other_host(
    hosts: Hosts, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert(SERVER4)  # an IP subjectAltName, as a lab without DNS has
    ca_path, cert_path, key_path = tmp_path / "ca.pem", tmp_path / "server.pem", tmp_path / "server.key"
    ca.cert_pem.write_to_path(str(ca_path))
    cert.private_key_pem.write_to_path(str(key_path))
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    tls = {"cert": str(cert_path), "key": str(key_path)}
    m = muxd_in_a(hosts, muxd, tmp_path, pty_device, [{"tcp": f"{SERVER4}:0", "name": "tls", "tls": tls}])
    _, port = split_hostport(m.address("tls"))
    ctx = ssl.create_default_context(cafile=str(ca_path))

    raw = hosts.b.call(connect_from, PEER4, SERVER4, port)
    with ctx.wrap_socket(raw, server_hostname=SERVER4) as client:
        hosts.a.call(m.wait_connected, 1)
        pty_device.write(b"over TLS between hosts\r\n")
        assert recv_until(client, b"\r\n") == b"over TLS between hosts\r\n"
    # The check is real: the same certificate does not pass for another address.
    raw = hosts.b.call(connect_from, PEER4, SERVER4, port)
    with raw, pytest.raises(ssl.SSLCertVerificationError, match="IP address mismatch"):
        ctx.wrap_socket(raw, server_hostname="198.18.0.9")

    # And a client that is not Python: openssl, run inside B.
    cmd = ["openssl", "s_client", "-connect", f"{SERVER4}:{port}", "-CAfile", str(ca_path)]
    cmd += ["-verify_ip", SERVER4, "-verify_return_error", "-brief"]
    opts: dict[str, Any] = {"input": "", "capture_output": True, "text": True, "timeout": 10}
    done = hosts.b.call(subprocess.run, cmd, check=False, **opts)
    assert done.returncode == 0 and "Verification: OK" in done.stderr, done.stderr


# -- [::] is IPv6 only ----------------------------------------------------------------------------


def test_both_families_on_one_port_take_two_listeners(
    hosts: Hosts, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """``[::]:P`` takes IPv6 clients only (V6ONLY), so ``0.0.0.0:P`` binds beside it
    and the two serve both families; ``[::]:Q`` alone refuses IPv4 (muxd.yaml(5))."""
    both = [{"tcp": "[::]:7000", "name": "any6"}, {"tcp": "0.0.0.0:7000", "name": "any4"}]
    alone = {"tcp": "[::]:7001", "name": "only6"}
    m = muxd_in_a(hosts, muxd, tmp_path, pty_device, [*both, alone])
    with pytest.raises(ConnectionRefusedError):
        hosts.b.call(connect_from, PEER4, SERVER4, 7001).close()
    four = hosts.b.call(connect_from, PEER4, SERVER4, 7000)
    six = hosts.b.call(connect_from, PEER6, SERVER6, 7000)
    with four, six:
        hosts.a.call(m.wait_connected, 2)
        listeners = {c["listener"] for c in hosts.a.call(m.clients)}
        assert listeners == {"any4", "any6"}
        pty_device.write(b"to both families\r\n")
        for sock in (four, six):
            assert recv_until(sock, b"\r\n") == b"to both families\r\n"


# -- the MQTT bridge to a broker on the other host ---------------------------------------------


@needs_broker
def test_mqtt_bridge_publishes_to_a_broker_on_the_other_host(
    hosts: Hosts, muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice
) -> None:
    """mosquitto in B listens on 198.18.0.2 (and B's loopback, for the harness);
    muxd in A bridges the port to it; a subscriber in B gets the device's lines."""
    broker = hosts.b.call(Broker, tmp_path, (f"listener {MQTT_PORT} {PEER4}",))
    try:
        hosts.b.call(broker.start)
        with hosts.b.call(Subscriber, broker, ["muxd/dut/rx"]) as sub:
            hosts.a.call(start_bridged, muxd, tmp_path, pty_device, f"{PEER4}:{MQTT_PORT}")
            sent = b"".join(f"line {i} across hosts\n".encode() for i in range(50))
            pty_device.write(sent)
            wait_for(lambda: joined(data_records(sub.payloads("muxd/dut/rx"))) == sent, 10, "every line")
        log = (broker.dir / "mosquitto.log").read_text()
        assert f"New client connected from {SERVER4}:" in log, log
    finally:
        broker.stop()
