"""The MQTT bridge end to end, against a real broker: Debian's mosquitto,
started on a free loopback port with a generated config and stopped by PID.

muxd runs as a subprocess on a pty device; a paho subscriber (its own network
thread) collects what the broker delivers. Tests synchronise on what the
subscriber received, on the device's bytes and on the API, never on time
alone. The inbound packet bound (muxd.mqtt.packet) is tested byte by byte
without a socket; the bridge's backoff and its error reporting in process,
on a reactor against a loopback socket that plays the broker. Config checks
at the end need no broker.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from muxd import config
from muxd.config import MqttConfig
from muxd.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from muxd.mqtt.bridge import MqttBridge
from muxd.mqtt.packet import InboundLimit, PacketTooLarge
from muxd.mqtt.wire import READ_SIZE, PahoSocket, PlainTransport
from muxd.reactor import Reactor
from muxd.upstream.state import BACKING_OFF, CONNECTING, DOWN, UP
from tests.helpers import (
    AUTO,
    LOCAL,
    Muxd,
    PtyDevice,
    StartMuxd,
    connect,
    free_port,
    recv_until,
    run_muxd,
    run_until,
    splits,
    start_on_pty,
    wait_for,
)
from tests.test_hostile import status_kb

MOSQUITTO = shutil.which("mosquitto") or (
    "/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None
)
needs_broker = pytest.mark.skipif(
    MOSQUITTO is None, reason="mosquitto is not installed (make test installs Debian's mosquitto)"
)


class Broker:
    """mosquitto on 127.0.0.1:port, persistent (a restart keeps sessions and
    queued QoS 1 messages, as a production broker does), stopped by PID."""

    def __init__(self, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
        self.dir = tmp_path / "broker"
        self.dir.mkdir(exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        lines = [
            f"listener {self.port} {LOCAL}",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            *extra,
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it switches to user mosquitto, who cannot write here
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> str:
        return f"{LOCAL}:{self.port}"

    def start(self) -> None:
        assert MOSQUITTO is not None
        log = open(self.dir / "mosquitto.log", "ab")  # noqa: SIM115 - the child holds it
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=log, stderr=log)
        log.close()

        def listening() -> bool:
            assert self.proc is not None
            assert self.proc.poll() is None, (self.dir / "mosquitto.log").read_text()
            try:
                socket.create_connection((LOCAL, self.port), timeout=0.2).close()
            except OSError:
                return False
            return True

        wait_for(listening, 10, f"mosquitto on {self.address}")

    def stop(self, signum: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signum)
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Broker]:
    b = Broker(tmp_path)
    b.start()
    yield b
    b.stop()


class Subscriber:
    """A paho client on its own thread, collecting (topic, payload) in order."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str = "test-sub", clean: bool = False):
        self.messages: list[tuple[str, bytes, bool]] = []
        self.topics = topics
        self.connected = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean)
        c.reconnect_delay_set(1, 1)
        c.on_connect = self._on_connect
        c.on_message = lambda _c, _u, msg: self.messages.append((msg.topic, bytes(msg.payload), msg.retain))
        c.connect(LOCAL, broker.port, keepalive=10)
        c.loop_start()
        self.client = c
        assert self.connected.wait(10), "subscriber did not connect"

    def _on_connect(self, client: Any, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        for topic in self.topics:
            client.subscribe(topic, qos=1)
        self.connected.set()

    def payloads(self, topic: str) -> list[bytes]:
        return [p for t, p, _r in list(self.messages) if t == topic]

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> Subscriber:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def retained(broker: Broker, topics: list[str], expect: int) -> dict[str, bytes]:
    """The retained messages of these topics, read by a fresh subscriber."""
    with Subscriber(broker, topics, client_id=f"retained-{time.monotonic_ns() % 10**9}", clean=True) as sub:
        wait_for(lambda: len(sub.messages) >= expect, 10, f"{expect} retained messages")
        return {t: p for t, p, r in sub.messages if r}


def start_bridged(  # noqa: PLR0917 - the harness's own (muxd, tmp_path, dev) first
    muxd: StartMuxd,
    tmp_path: Path,
    dev: PtyDevice,
    broker_address: str,
    port_mqtt: dict[str, Any] | None = None,
    listeners: list[dict[str, Any]] | None = None,
    wait_up: bool = True,
    **mqtt: Any,
) -> Muxd:
    """muxd on the pty with the bridge; with wait_up, once the bridge is connected."""
    section = {"broker": broker_address, "backoff_max": "500ms", "client_id": "muxd-test", **mqtt}
    m = start_on_pty(
        muxd,
        tmp_path,
        dev,
        listeners if listeners is not None else [],
        mqtt=port_mqtt if port_mqtt is not None else {"format": "jsonl", "qos": 1},
        top={"mqtt": section},
    )
    if wait_up:
        wait_bridge(m)
    return m


def mqtt_view(m: Muxd) -> dict[str, Any]:
    view: dict[str, Any] = m.port_info()["mqtt"]
    return view


def wait_bridge(m: Muxd, state: str = "up", timeout: float = 10.0) -> None:
    wait_for(lambda: mqtt_view(m)["state"] == state, timeout, f"bridge {state}: {mqtt_view(m)}")


def data_records(payloads: list[bytes]) -> list[dict[str, Any]]:
    return [json.loads(p) for p in payloads]


def joined(records: list[dict[str, Any]]) -> bytes:
    return "".join(r["data"] for r in records if "data" in r).encode("utf-8", "surrogateescape")


def lines_of(n: int, start: int = 0, width: int = 40) -> list[bytes]:
    return [f"line {i:06d} ".ljust(width, "x").encode() + b"\n" for i in range(start, start + n)]


# -- rx, tx ------------------------------------------------------------------------------


@needs_broker
def test_every_line_reaches_a_subscriber_in_order_at_qos1(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    """No listener at all: the bridge is the port's only reader."""
    with Subscriber(broker, ["muxd/dut/rx"]) as sub:
        m = start_bridged(muxd, tmp_path, pty_device, broker.address)
        sent = lines_of(500)
        for i in range(0, len(sent), 25):
            pty_device.write(b"".join(sent[i : i + 25]))
        want = b"".join(sent)
        wait_for(lambda: joined(data_records(sub.payloads("muxd/dut/rx"))) == want, 15, "every line")
        records = data_records(sub.payloads("muxd/dut/rx"))
        assert all(r["port"] == "dut" and r.get("dir", "rx") == "rx" for r in records)
        assert not [r for r in records if r.get("event") == "gap"]
        # Counted at PUBACK, which may come after the subscriber has the message.
        wait_for(lambda: mqtt_view(m)["published"] >= len(records), 5, "every message acknowledged")
        view = mqtt_view(m)
        assert view["dropped"] == 0 and view["qos"] == 1 and view["lag"] == 0
        assert m.metric("muxd_mqtt_published_messages_total", port="dut") >= len(records)
        assert m.metric("muxd_mqtt_up") == 1
        status = run_muxd("status", "--url", m.http)
        assert status.returncode == 0, status.stderr
        assert "mqtt up" in status.stdout and "muxd/dut/rx" in status.stdout, status.stdout


@needs_broker
def test_text_format_gives_one_stamped_line_per_message(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    with Subscriber(broker, ["muxd/dut/rx"]) as sub:
        start_bridged(muxd, tmp_path, pty_device, broker.address, {"format": "text", "qos": 0})
        pty_device.write(b"alpha\nbeta\ngam")
        pty_device.write(b"ma\n")

        def lines() -> list[bytes]:
            return [p for p in sub.payloads("muxd/dut/rx") if b" -- muxd: " not in p]  # events

        wait_for(lambda: len(lines()) >= 3, 10, "three lines")
        got = lines()
        assert [p.split(b" ", 1)[1] for p in got] == [b"alpha\n", b"beta\n", b"gamma\n"]
        assert all(p[:2] == b"20" and p.index(b"Z ") == 23 for p in got)
        pty_device.write(b"login: ")  # a line still open goes out after LINE_HOLD
        wait_for(lambda: lines()[-1].endswith(b" login: "), 5, "the prompt")


@needs_broker
def test_raw_format_gives_bounded_chunks_of_the_exact_bytes(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    with Subscriber(broker, ["muxd/dut/rx"]) as sub:
        start_bridged(muxd, tmp_path, pty_device, broker.address, {"format": "raw", "qos": 0})
        sent = bytes(range(256)) * 80  # binary, no lines: 20 KiB
        pty_device.write(sent)
        pty_device.write(b"prompt> ")  # a chunk that ends nowhere still goes out (RAW_DELAY)
        want = sent + b"prompt> "
        wait_for(lambda: b"".join(sub.payloads("muxd/dut/rx")) == want, 10, "the exact bytes")
        assert max(map(len, sub.payloads("muxd/dut/rx"))) <= 4096


@needs_broker
def test_tx_reaches_the_device_only_with_write_true(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    with Subscriber(broker, ["muxd/dut/rx"]) as sub:
        m = start_bridged(muxd, tmp_path, pty_device, broker.address, {"format": "jsonl", "write": True})
        sub.client.publish("muxd/dut/tx", b"reboot\n", qos=1)
        assert pty_device.read(7) == b"reboot\n"
        wait_for(lambda: mqtt_view(m)["tx_accepted"] == 1, 5, "the write counted")
        assert m.metric("muxd_mqtt_tx_messages_total", port="dut", outcome="written") == 1
        m.stop()

        m = start_bridged(muxd, tmp_path, pty_device, broker.address, {"format": "jsonl", "write": False})
        assert mqtt_view(m)["tx"] is None
        sub.client.publish("muxd/dut/tx", b"reboot\n", qos=1)
        # A round trip through muxd after the publish: the broker had it first.
        pty_device.write(b"marker\n")
        wait_for(lambda: b"marker" in joined(data_records(sub.payloads("muxd/dut/rx"))), 10, "marker")
        # Nothing may arrive: a window on the device, not a synchronisation.
        with pytest.raises(AssertionError):
            pty_device.read(1, timeout=0.6)


@needs_broker
def test_tx_the_queue_cannot_take_is_refused_and_counted(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    """The device does not read (nobody drains the pty): the 1 KiB write queue
    fills, and what it cannot take is refused, counted, never half-written."""
    with Subscriber(broker, []) as sub:
        section = {"broker": broker.address, "client_id": "muxd-test"}
        m = start_on_pty(
            muxd,
            tmp_path,
            pty_device,
            [],
            mqtt={"format": "jsonl", "write": True},
            write_queue="1KiB",
            max_line=512,
            top={"mqtt": section},
        )
        wait_bridge(m)
        msgs = [f"msg {i:04d} ".ljust(199, "x").encode() + b"\n" for i in range(300)]
        for msg in msgs:
            sub.client.publish("muxd/dut/tx", msg, qos=1)

        def settled() -> bool:
            v = mqtt_view(m)
            return bool(v["tx_accepted"] + v["tx_refused"] == len(msgs))

        wait_for(settled, 10, "every message judged")
        view = mqtt_view(m)
        assert view["tx_refused"] > 0 and view["tx_accepted"] > 0
        assert m.metric("muxd_mqtt_tx_messages_total", port="dut", outcome="refused") == view["tx_refused"]
        got = pty_device.read(200 * view["tx_accepted"])
        lines = got.splitlines(keepends=True)
        assert all(line in msgs for line in lines), "whole messages only"
        assert lines == sorted(lines), "in order"
        with pytest.raises(AssertionError):
            pty_device.read(1, timeout=0.3)


@needs_broker
def test_a_100mb_tx_message_is_refused_unread(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    """100 MB on /tx, where the device write queue holds 64 KiB: the bridge
    refuses the packet from its header (closes the link, counts it, logs it)
    and reconnects. muxd's peak RSS hardly moves, a TCP reader of the same
    port sees its lines on time meanwhile, the device gets none of it, and the
    bridge carries on: a small message after it goes through."""
    with Subscriber(broker, ["muxd/dut/state"]) as sub:
        m = start_bridged(
            muxd,
            tmp_path,
            pty_device,
            broker.address,
            {"format": "text", "qos": 1, "write": True},
            listeners=[{"tcp": AUTO}],
        )
        client = connect(m.port())
        m.wait_connected(1)
        wait_for(lambda: sub.payloads("muxd/dut/state"), 10, "the state at connect")
        peak_before = status_kb(m.pid, "VmHWM") * 1024
        connects = mqtt_view(m)["connects"]
        sub.client.publish("muxd/dut/tx", b"x" * 100_000_000 + b"\n", qos=1)  # sent by its thread

        def refused() -> float:
            return m.metric("muxd_mqtt_reconnects_total", reason="packet too large")

        worst, i = 0.0, 0
        deadline = time.monotonic() + 60
        # Until the message is judged: refused unread, or (without the bound) read and refused whole.
        while not (refused() or mqtt_view(m)["tx_refused"]):
            assert time.monotonic() < deadline, "the message was never judged"
            line = f"tick {i}\n".encode()
            t0 = time.monotonic()
            pty_device.write(line)
            recv_until(client, line, timeout=10.0)
            worst = max(worst, time.monotonic() - t0)
            i += 1
            select.select([], [], [], 0.01)  # pacing the device's lines, not a synchronisation
        growth = status_kb(m.pid, "VmHWM") * 1024 - peak_before
        print(f"100 MB on /tx: peak RSS +{growth / 2**20:.1f} MiB, a TCP reader's worst line {worst:.3f} s")
        assert refused() == 1
        assert mqtt_view(m)["tx_refused"] == 0, "refused before it was read, not after"
        assert growth < 16 * 2**20, f"peak RSS grew {growth / 2**20:.1f} MiB"
        assert worst < 0.25, f"a TCP reader waited {worst:.3f}s for a line"
        assert "packet too large" in m.log()

        states = len(sub.payloads("muxd/dut/state"))
        wait_for(lambda: mqtt_view(m)["connects"] > connects and mqtt_view(m)["state"] == "up", 15, "back up")
        # The states follow the tx SUBSCRIBE on the new link: once the broker has them, it has that too.
        wait_for(lambda: len(sub.payloads("muxd/dut/state")) > states, 10, "the state at reconnect")
        sub.client.publish("muxd/dut/tx", b"after\n", qos=1)
        assert pty_device.read(6) == b"after\n", "nothing of the big message reached the device"
        client.close()


# -- outages ----------------------------------------------------------------------------


@needs_broker
def test_broker_restart_resumes_in_order_with_counted_announced_loss(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    """While the broker is gone the feed is a stuck reader with a 4 KiB bound:
    what passes it is skipped, counted and marked with a gap record; the
    rest comes in order once the broker is back."""
    with Subscriber(broker, ["muxd/dut/rx"]) as sub:  # a persistent session: the broker queues for it
        m = start_bridged(
            muxd, tmp_path, pty_device, broker.address, {"format": "jsonl", "qos": 1, "buffer": "4KiB"}
        )
        before, during, after = lines_of(50), lines_of(400, 50), lines_of(50, 450)
        pty_device.write(b"".join(before))
        wait_for(lambda: joined(data_records(sub.payloads("muxd/dut/rx"))) == b"".join(before), 10, "before")
        broker.stop()
        wait_for(lambda: mqtt_view(m)["state"] != "up", 10, "the bridge notices")
        for i in range(0, len(during), 20):
            pty_device.write(b"".join(during[i : i + 20]))
        wait_for(lambda: mqtt_view(m)["dropped"] > 0, 10, "the bound applied")
        broker.start()
        wait_bridge(m, timeout=15)
        pty_device.write(b"".join(after))
        last = after[-1]
        wait_for(lambda: last in joined(data_records(sub.payloads("muxd/dut/rx"))), 20, "the last line")

        records = data_records(sub.payloads("muxd/dut/rx"))
        unique = [json.loads(p) for p in dict.fromkeys(sub.payloads("muxd/dut/rx"))]  # QoS 1: maybe twice
        gaps = [r["bytes"] for r in unique if r.get("event") == "gap"]
        assert gaps, "the loss is announced"
        text = joined(unique)
        numbers = [int(line.split()[1]) for line in text.splitlines() if line.startswith(b"line ")]
        assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), "in order, none twice"
        assert numbers[:50] == list(range(50)) and numbers[-50:] == list(range(450, 500))
        total = len(b"".join(before + during + after))
        view = mqtt_view(m)
        assert len(text) + sum(gaps) == total, "every byte delivered or counted in a gap"
        assert view["dropped"] == sum(gaps) == m.metric("muxd_mqtt_dropped_bytes_total", port="dut")
        # Bounded: what was lost is what passed the 4 KiB bound, no more.
        assert sum(gaps) >= len(b"".join(during)) - 4096 - 2048
        assert len(records) >= len(unique)
        assert view["reconnects"] >= 1 and view["connects"] >= 2


class BlackHole:
    """A listener that completes TCP handshakes (the kernel's backlog) and never
    answers: a broker that accepts and hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind((LOCAL, 0))
        self.sock.listen(16)
        self.address = f"{LOCAL}:{self.sock.getsockname()[1]}"

    def close(self) -> None:
        self.sock.close()


@needs_broker
@pytest.mark.parametrize("outage", ["black-hole", "killed"])
def test_a_dead_or_black_holed_broker_adds_no_latency_to_tcp_readers(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker, outage: str
) -> None:
    hole = BlackHole()
    try:
        address = hole.address if outage == "black-hole" else broker.address
        m = start_bridged(
            muxd,
            tmp_path,
            pty_device,
            address,
            {"format": "text", "qos": 1},
            listeners=[{"tcp": AUTO}],
            wait_up=False,
            connect_timeout="500ms",
        )
        client = connect(m.port())
        m.wait_connected(1)
        if outage == "killed":
            wait_bridge(m)
            broker.stop(signal.SIGKILL)
        worst = 0.0
        deadline = time.monotonic() + 3.0
        i = 0
        while time.monotonic() < deadline:  # several connect timeouts and retries
            line = f"tick {i}\n".encode()
            t0 = time.monotonic()
            pty_device.write(line)
            recv_until(client, line, timeout=2.0)
            worst = max(worst, time.monotonic() - t0)
            i += 1
            select.select([], [], [], 0.02)  # pacing the device's lines, not a synchronisation
        assert worst < 0.5, f"a TCP reader waited {worst:.3f}s for a line"
        view = mqtt_view(m)
        assert view["state"] != "up" and view["reconnects"] >= 2, view
        if outage == "black-hole":
            assert m.metric("muxd_mqtt_reconnects_total", reason="connect timeout") >= 2
        # The loop is not stalled: the API answers at once.
        t0 = time.monotonic()
        m.port_info()
        assert time.monotonic() - t0 < 0.5
        client.close()
    finally:
        hole.close()


@needs_broker
def test_tls_and_password(muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice) -> None:
    """A broker on TLS (a throwaway CA) that wants a user name and password:
    the bridge's own non-blocking handshake, then paho's CONNECT with them;
    a wrong password is refused, counted and retried, never a stall."""
    trustme = pytest.importorskip("trustme")
    passwd = shutil.which("mosquitto_passwd")
    if passwd is None:
        pytest.skip("mosquitto_passwd is not installed (Debian's mosquitto package has it)")
    ca = trustme.CA()
    cert = ca.issue_cert(LOCAL)
    ca_pem, cert_pem, key_pem = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_pem))
    cert.cert_chain_pems[0].write_to_path(str(cert_pem))
    cert.private_key_pem.write_to_path(str(key_pem))
    users = tmp_path / "passwd"
    subprocess.run([passwd, "-c", "-b", str(users), "muxd", "s3cret"], check=True, capture_output=True)
    os.chmod(users, 0o600)
    broker = Broker(
        tmp_path,
        (
            f"cafile {ca_pem}",
            f"certfile {cert_pem}",
            f"keyfile {key_pem}",
            "allow_anonymous false",
            f"password_file {users}",
        ),
    )
    broker.conf.write_text(broker.conf.read_text().replace("allow_anonymous true\n", ""))
    broker.start()
    try:
        good, bad = tmp_path / "good", tmp_path / "bad"
        good.write_text("s3cret\n")
        bad.write_text("wrong\n")
        m = start_bridged(
            muxd,
            tmp_path,
            pty_device,
            broker.address,
            wait_up=False,
            username="muxd",
            password_file=str(bad),
            tls={"ca": str(ca_pem)},
        )
        wait_for(lambda: mqtt_view(m)["reconnects"] >= 2, 10, "refused and retried")
        view = mqtt_view(m)
        assert view["state"] != "up" and view["connects"] == 0, view
        assert m.metric("muxd_mqtt_reconnects_total", reason="refused") >= 2
        m.stop()

        m = start_bridged(
            muxd,
            tmp_path,
            pty_device,
            broker.address,
            username="muxd",
            password_file=str(good),
            tls={"ca": str(ca_pem)},
        )
        pty_device.write(b"over tls\n")
        wait_for(lambda: mqtt_view(m)["published"] >= 2, 10, "published over TLS")  # the up event, the line
        # Many records at once: TLS records the socket takes in part, and PUBACKs read in batches.
        pty_device.write(b"".join(lines_of(2000)))
        wait_for(lambda: mqtt_view(m)["published"] >= 2002, 20, "2000 lines published over TLS")
        assert mqtt_view(m)["reconnects"] == 0
    finally:
        broker.stop()


@needs_broker
def test_reload_rebuilds_the_bridge(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    """A port's mqtt: changed by SIGHUP: a clean DISCONNECT (no will: online
    stays true) and a new bridge with the new settings; removed: not published."""
    online = f"muxd/{socket.gethostname()}/online"
    with Subscriber(broker, ["muxd/dut/rx"]) as sub:
        m = start_bridged(muxd, tmp_path, pty_device, broker.address)
        assert mqtt_view(m)["tx"] is None
        ports = m.data["ports"]
        ports[0]["mqtt"] = {"format": "jsonl", "write": True}
        m.rewrite(ports)
        m.signal(signal.SIGHUP)
        wait_for(
            lambda: mqtt_view(m)["tx"] == "muxd/dut/tx" and mqtt_view(m)["state"] == "up", 10, "new bridge"
        )
        sub.client.publish("muxd/dut/tx", b"hi\n", qos=1)
        assert pty_device.read(3) == b"hi\n"
        pty_device.write(b"after reload\n")
        wait_for(
            lambda: b"after reload" in joined(data_records(sub.payloads("muxd/dut/rx"))), 10, "published"
        )
        assert retained(broker, [online], 1)[online] == b"online"
        ports[0].pop("mqtt")
        m.rewrite(ports)
        m.signal(signal.SIGHUP)
        wait_for(lambda: m.port_info()["mqtt"] is None, 10, "not published")


# -- retained state and availability ------------------------------------------------------


@needs_broker
def test_retained_state_and_last_will_after_clean_stop_and_sigkill(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    host = socket.gethostname()
    online, state = f"muxd/{host}/online", "muxd/dut/state"
    m = start_bridged(muxd, tmp_path, pty_device, broker.address)
    wait_for(lambda: retained(broker, [online, state], 2).get(online) == b"online", 10, "online")
    doc = json.loads(retained(broker, [online, state], 2)[state])
    assert doc["state"] == "up" and doc["line"]["baudrate"] == 115200 and "since" in doc

    m.stop()  # SIGTERM: a clean stop
    got = retained(broker, [online, state], 2)
    assert got[online] == b"offline"
    doc = json.loads(got[state])
    assert doc["state"] == "down" and doc["reason"] == "stopped"

    m = start_bridged(muxd, tmp_path, pty_device, broker.address)
    wait_for(lambda: retained(broker, [online, state], 2).get(online) == b"online", 10, "online again")
    m.signal(signal.SIGKILL)
    m.wait_exit()
    m.stop()
    # The broker publishes the will when the socket closes (the kernel closes it).
    wait_for(lambda: retained(broker, [online, state], 2).get(online) == b"offline", 10, "the last will")
    assert json.loads(retained(broker, [online, state], 2)[state])["state"] == "up"  # as last published


@needs_broker
def test_clean_stop_publishes_what_was_read_then_offline(
    muxd: StartMuxd, tmp_path: Path, pty_device: PtyDevice, broker: Broker
) -> None:
    online = f"muxd/{socket.gethostname()}/online"
    with Subscriber(broker, ["muxd/dut/rx", online]) as sub:
        m = start_bridged(muxd, tmp_path, pty_device, broker.address)
        sent = b"".join(lines_of(2000))
        pty_device.write(sent)
        wait_for(lambda: m.port_info()["bytes_in"] == len(sent), 10, "muxd read it all")
        m.stop()  # SIGTERM at once: the bridge may still hold a backlog
        wait_for(lambda: sent in joined(data_records(sub.payloads("muxd/dut/rx"))), 10, "every line")
        assert sub.payloads(online)[-1] == b"offline"


# -- config -----------------------------------------------------------------------------


def test_config_without_paho_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """paho-mqtt is needed only with mqtt: (muxd.mqtt is imported only then):
    a Debian install without it runs every other part of muxd."""
    monkeypatch.setitem(sys.modules, "paho", None)
    monkeypatch.setitem(sys.modules, "paho.mqtt", None)
    with pytest.raises(ConfigError, match=r"mqtt: the MQTT bridge needs paho-mqtt 2\.1 or later \(it is not"):
        config.loads("mqtt: {broker: '127.0.0.1:1883'}\nports: [{name: a, upstream: {sim: true}}]")
    assert config.loads("ports: [{name: a, upstream: {sim: true}}]").mqtt is None
    code = "import sys; sys.modules['paho'] = None; import muxd.daemon, muxd.metrics, muxd.api, muxd.cli"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_config_keys_and_errors() -> None:
    cfg = config.loads(
        "mqtt: {broker: '127.0.0.1:1883', prefix: lab/muxd, keepalive: 20}\n"
        "ports:\n"
        "- {name: a, upstream: {sim: true}, mqtt: {format: raw, qos: 0, write: true, buffer: 64KiB}}\n"
        "- {name: b, upstream: {sim: true}}\n"
    )
    assert cfg.mqtt is not None and cfg.mqtt.prefix == "lab/muxd" and cfg.mqtt.keepalive == 20
    a, b = cfg.ports
    assert a.mqtt is not None and (a.mqtt.format, a.mqtt.qos, a.mqtt.write, a.mqtt.buffer) == (
        "raw",
        0,
        True,
        65536,
    )
    assert a.listeners == () and b.mqtt is None
    bad = {
        "mqtt: {broker: 'broker.lab:1883'}": "mqtt.broker: give a numeric IP",
        "mqtt: {broker: '127.0.0.1:1883', prefix: 'a/+/b'}": "mqtt.prefix",
        "mqtt: {broker: '127.0.0.1:1883', client_id: 'x y'}": "mqtt.client_id",
        "mqtt: {broker: '127.0.0.1:1883', password_file: /etc/hostname}": "needs a username",
        "mqtt: {broker: '127.0.0.1:1883', tls: {cert: /etc/hostname}}": "cert and key go together",
        "mqtt: {keepalive: 20}": "missing required key 'broker'",
    }
    for text, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            config.loads(text + "\nports: [{name: a, upstream: {sim: true}}]")
    with pytest.raises(ConfigError, match=r"ports\[0\]\.mqtt: publishing a port needs the broker"):
        config.loads("ports: [{name: a, upstream: {sim: true}, mqtt: true}]")
    with pytest.raises(ConfigError, match=r"ports\[0\]\.mqtt\.qos: must be 0\.\.1"):
        config.loads(
            "mqtt: {broker: '127.0.0.1:1'}\nports: [{name: a, upstream: {sim: true}, mqtt: {qos: 2}}]"
        )


def test_config_with_paho_1_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    """paho-mqtt 1.x has another callback API: refused by the config, not failing at run time."""
    old = types.ModuleType("paho.mqtt")
    old.__version__ = "1.6.1"  # type: ignore[attr-defined]
    package = types.ModuleType("paho")
    package.mqtt = old  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "paho", package)
    monkeypatch.setitem(sys.modules, "paho.mqtt", old)
    with pytest.raises(
        ConfigError, match=r"mqtt: the MQTT bridge needs paho-mqtt 2\.1 or later \(found 1\.6\)"
    ):
        config.loads("mqtt: {broker: '127.0.0.1:1883'}\nports: [{name: a, upstream: {sim: true}}]")


# -- the inbound packet bound, sans I/O ----------------------------------------------------


def fixed_header(first: int, length: int) -> bytes:
    """An MQTT fixed header: the type byte, then the Remaining Length in base 128."""
    out = bytearray([first])
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def packet(first: int, body: bytes) -> bytes:
    return fixed_header(first, len(body)) + body


def test_packets_within_the_limit_pass_however_the_bytes_are_cut() -> None:
    stream = (
        packet(0x20, b"\x00\x00")  # CONNACK
        + packet(0x30, b"\x00\x0bmuxd/dut/tx" + b"hi\n")  # a PUBLISH
        + packet(0xD0, b"")  # PINGRESP: no body
        + packet(0x30, b"\x00\x0bmuxd/dut/tx" + b"y" * 187)  # a 2-byte length, exactly the limit
        + packet(0x90, b"\x00\x01\x01")  # SUBACK
    )
    for chunks in splits(stream):
        limit = InboundLimit(200)
        for chunk in chunks:
            limit.feed(chunk)
        assert limit.packets == 5


def test_a_packet_over_the_limit_is_refused_at_its_last_length_byte() -> None:
    """Refused when the Remaining Length is complete: before any byte of the body."""
    before = packet(0x20, b"\x00\x00") + packet(0xD0, b"")
    for size, limit in ((201, 200), (100_000_021, 65536 + 4096), (268_435_455, 1 << 20)):
        big = fixed_header(0x32, size)
        stream = before + big + b"x" * 1000
        last = len(before) + len(big) - 1  # the length's last byte
        guard = InboundLimit(limit)
        for i, byte in enumerate(stream):
            try:
                guard.feed(bytes((byte,)))
            except PacketTooLarge as exc:
                assert i == last and exc.size == size and exc.limit == limit
                break
        else:
            raise AssertionError(f"{size} bytes over {limit} passed")
        for chunks in splits(before + big):
            guard = InboundLimit(limit)
            with pytest.raises(PacketTooLarge):
                for chunk in chunks:
                    guard.feed(chunk)
            assert guard.packets == 2


def test_a_fifth_length_byte_is_a_protocol_error() -> None:
    guard = InboundLimit(1 << 28)
    guard.feed(b"\x30\xff\xff\xff")
    with pytest.raises(RemoteProtocolError) as info:
        guard.feed(b"\xff")
    assert not isinstance(info.value, PacketTooLarge)


def test_paho_socket_reads_bounded_chunks_through_the_bound() -> None:
    """paho asks recv() for a whole body at once: it gets at most READ_SIZE, and
    a header over the limit raises out of recv() (not an OSError, so paho does
    not take it for a lost link) before the body is read."""
    ours, theirs = socket.socketpair()
    try:
        wire = PahoSocket(PlainTransport(ours), InboundLimit(1 << 20))
        body = b"\x00\x0bmuxd/dut/tx" + b"z" * (3 * READ_SIZE)
        theirs.sendall(packet(0x30, body))
        got = bytearray(wire.recv(1) + wire.recv(1) + wire.recv(1) + wire.recv(1))
        select.select([ours], [], [], 5)
        chunk = wire.recv(len(body))
        assert 0 < len(chunk) <= READ_SIZE
        while len(got) + len(chunk) < 4 + len(body):
            got += chunk
            select.select([ours], [], [], 5)
            chunk = wire.recv(len(body))
        theirs.sendall(fixed_header(0x30, 2 << 20) + b"unread")
        select.select([ours], [], [], 5)
        with pytest.raises(PacketTooLarge):
            for _ in range(5):
                wire.recv(1)
        assert not issubclass(PacketTooLarge, OSError)
        with pytest.raises(PacketTooLarge):  # refused for good: the framing is lost
            wire.recv(8)
        theirs.close()
        wire = PahoSocket(PlainTransport(ours), InboundLimit(1 << 20))
        assert wire.recv(8) == b"" and wire.eof
    finally:
        ours.close()
        theirs.close()


# -- the connection in process: states, backoff, errors --------------------------------------


def test_the_bridge_backs_off_with_jitter_through_the_upstream_table() -> None:
    """Nothing listens: every attempt fails, each followed by a jittered wait
    under the doubling ceiling, and the states follow the upstream's table."""
    cfg = MqttConfig(LOCAL, free_port(), backoff_min=0.02, backoff_max=0.16, connect_timeout=2.0)
    reactor = Reactor()
    bridge = MqttBridge(cfg, reactor, hostname="test")
    seen: list[tuple[str, float | None]] = []
    set_state = bridge.status.set

    def record(state: Any, reason: str, retry_in: float | None = None) -> None:
        seen.append((state, retry_in))
        set_state(state, reason, retry_in)

    bridge.status.set = record  # type: ignore[method-assign]
    bridge.start()
    try:
        run_until(reactor, lambda: bridge.reconnects >= 8, "eight failed attempts")
        waits = [delay for state, delay in seen if state == BACKING_OFF]
        assert [state for state, _ in seen[:4]] == [CONNECTING, BACKING_OFF, CONNECTING, BACKING_OFF]
        for i, wait in enumerate(waits):
            ceiling = min(cfg.backoff_max, cfg.backoff_min * 2**i)
            assert wait is not None and ceiling / 2 <= wait <= ceiling, (i, wait)
        assert len({round(w or 0, 6) for w in waits[4:]}) > 1, "no jitter at the cap"
        assert bridge.failures == {"connect": bridge.reconnects}
        assert bridge.state == BACKING_OFF and "ECONNREFUSED" in bridge.reason
        with pytest.raises(LocalProtocolError):
            bridge.status.set(UP, "backing-off to up skips the attempt")
    finally:
        bridge.close()
    assert bridge.state == DOWN and bridge.reason == "stopped" and bridge.finished


class LoopbackBroker:
    """A listening socket that plays the broker, driven by the test in its own thread of control."""

    def __init__(self) -> None:
        self.server = socket.create_server((LOCAL, 0))
        self.port = self.server.getsockname()[1]
        self.conn: socket.socket | None = None

    def accept(self, reactor: Reactor) -> socket.socket:
        self.server.setblocking(False)

        def accepted() -> bool:
            try:
                self.conn, _ = self.server.accept()
            except BlockingIOError:
                return False
            return True

        run_until(reactor, accepted, "the bridge connects")
        assert self.conn is not None
        self.conn.setblocking(False)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.server.close()


def test_a_failed_disconnect_is_logged_with_its_cause_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    """The broker resets the link just before a reload's clean close: paho's
    DISCONNECT cannot be sent. That is reported (why, once) and counted, not
    swallowed; the bridge closes all the same."""
    broker = LoopbackBroker()
    reactor = Reactor()
    bridge = MqttBridge(MqttConfig(LOCAL, broker.port), reactor, hostname="test")
    try:
        bridge.start()
        conn = broker.accept(reactor)
        run_until(reactor, lambda: conn in select.select([conn], [], [], 0)[0], "CONNECT")
        assert conn.recv(1024)[:1] == b"\x10"
        conn.sendall(packet(0x20, b"\x00\x00"))  # CONNACK: accepted
        run_until(reactor, lambda: bridge.state == UP, "up")
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        conn.close()  # an RST, which the bridge has not read yet
        broker.conn = None
        with caplog.at_level("WARNING", logger="muxd.mqtt"):
            bridge.close(clean=True)
        assert bridge.failures == {"disconnect": 1}, bridge.failures
        lines = [r.getMessage() for r in caplog.records if "disconnect:" in r.getMessage()]
        assert len(lines) == 1 and "reset" in lines[0].lower(), lines
        assert bridge.finished and bridge.state == DOWN
    finally:
        bridge.close()
        broker.close()
