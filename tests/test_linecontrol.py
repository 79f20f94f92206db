"""LineControl: the line_control policies, with real hub readers as requesters
and a recording upstream (the simulated device's apply_settings)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from muxd.config import Listener, Port, SerialUpstream, SimUpstream
from muxd.hub import Hub, ListenerStats, Reader
from muxd.linecontrol import LineControl
from muxd.metrics import make_registry
from muxd.port import PortRuntime
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from muxd.upstream.sim import SimDevice

RW = Listener("rfc2217", "rw-listener", mode="rw")
RO = Listener("rfc2217", "ro-listener", mode="ro")
BASE = LineSettings()
SLOW = LineSettings(baudrate=9600)
SLOWER = LineSettings(baudrate=4800, parity="E")


class Idle:
    """A hub reader's owner that never has anything to do."""

    def on_data(self) -> None:
        pass

    def on_write_room(self) -> None:
        pass

    def close(self, reason: str) -> None:
        pass


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def setup(reactor: Reactor, policy: str) -> tuple[Hub, LineControl, SimDevice]:
    port = Port("dut", SimUpstream(baudrate=115200), line_control=policy)
    hub = Hub(port, reactor)
    sim = SimDevice(port.upstream, hub, reactor)  # type: ignore[arg-type]
    return hub, LineControl(port, sim.apply_settings), sim


def reader(hub: Hub, listener: Listener, peer: str) -> Reader:
    return hub.attach(Idle(), listener, peer)


def stats(hub: Hub, listener: str) -> ListenerStats:
    return hub.listener_stats.get(listener, ListenerStats())


def owner(lc: LineControl) -> Reader | None:
    return lc.owner  # read through a call: mypy would narrow the attribute across request()


def test_owner_is_the_first_rw_requester_until_it_leaves(
    reactor: Reactor, caplog: pytest.LogCaptureFixture
) -> None:
    hub, lc, sim = setup(reactor, "owner")
    a, b = reader(hub, RW, "a:1"), reader(hub, RW, "b:2")
    caplog.set_level(logging.INFO, "muxd.linecontrol")
    # Asking for the value in force still claims ownership (pyserial does so at open).
    assert lc.request(a, BASE) == BASE and owner(lc) is a
    assert lc.request(b, SLOW) == BASE  # refused: the answer is what is in force
    assert lc.request(a, SLOW) == SLOW and sim.settings == SLOW
    assert lc.request(b, SLOWER) == SLOW
    assert (stats(hub, "rw-listener").settings_applied, stats(hub, "rw-listener").settings_refused) == (1, 2)
    assert "line settings 115200 8N1 -> 9600 8N1, asked by rw-listener a:1" in caplog.text
    lc.release(b)  # not the owner: nothing changes
    assert owner(lc) is a
    lc.release(a)
    assert owner(lc) is None
    assert lc.request(b, SLOWER) == SLOWER and owner(lc) is b and sim.settings == SLOWER


def test_ignore_never_applies(reactor: Reactor) -> None:
    hub, lc, sim = setup(reactor, "ignore")
    a = reader(hub, RW, "a:1")
    assert lc.request(a, SLOW) == BASE
    assert sim.settings == BASE and lc.owner is None and stats(hub, "rw-listener").settings_applied == 0


def test_any_applies_every_rw_request(reactor: Reactor) -> None:
    hub, lc, sim = setup(reactor, "any")
    a, b = reader(hub, RW, "a:1"), reader(hub, RW, "b:2")
    assert lc.request(a, SLOW) == SLOW
    assert lc.request(b, SLOWER) == SLOWER and sim.settings == SLOWER
    assert stats(hub, "rw-listener").settings_applied == 2 and lc.owner is None


@pytest.mark.parametrize("policy", ["owner", "any"])
def test_read_only_readers_never_change_or_own(reactor: Reactor, policy: str) -> None:
    hub, lc, sim = setup(reactor, policy)
    ro = reader(hub, RO, "ro:1")
    assert lc.request(ro, SLOW) == BASE
    assert lc.owner is None and sim.settings == BASE and stats(hub, "ro-listener").settings_refused == 1


def test_a_change_the_upstream_rejects_leaves_the_settings_in_force(reactor: Reactor) -> None:
    port = Port("dut", SerialUpstream("/dev/null"))

    def reject(settings: LineSettings) -> None:
        raise ValueError(f"invalid baud rate: {settings.baudrate}")

    hub = Hub(port, reactor)
    lc = LineControl(port, reject)
    assert lc.request(reader(hub, RW, "a:1"), SLOW) == BASE
    assert stats(hub, "rw-listener").settings_failed == 1 and stats(hub, "rw-listener").settings_applied == 0


def test_starts_from_the_upstream_config() -> None:
    assert LineControl(Port("dut", SimUpstream(baudrate=9600)), lambda _s: None).settings == SLOW
    serial = SerialUpstream("/dev/ttyUSB0", SLOWER)
    assert LineControl(Port("dut", serial), lambda _s: None).settings == SLOWER


def test_reload_keeps_changes_unless_the_upstream_was_reopened(reactor: Reactor) -> None:
    hub, lc, _sim = setup(reactor, "owner")
    a = reader(hub, RW, "a:1")
    lc.request(a, SLOW)
    port = Port("dut", SimUpstream(baudrate=115200), line_control="any")
    lc.reload(port, None)
    assert lc.settings == SLOW and lc.policy == "any" and lc.owner is None
    recorded: list[LineSettings] = []
    lc.reload(port, recorded.append)
    assert lc.settings == BASE
    lc.request(a, SLOWER)
    assert recorded == [SLOWER]


def test_outcomes_are_metrics(reactor: Reactor) -> None:
    port = Port("dut", SimUpstream(baudrate=115200), listeners=(RW,), line_control="owner")
    rt = PortRuntime.build(port, reactor)
    hub, lc = rt.hub, rt.line_control
    a, b = reader(hub, RW, "a:1"), reader(hub, RW, "b:2")
    lc.request(a, SLOW)
    lc.request(b, SLOWER)
    text = generate_latest(make_registry(lambda: [rt], reactor)).decode()
    for outcome, n in (("applied", 1), ("refused", 1), ("failed", 0)):
        labels = f'listener="rw-listener",outcome="{outcome}",port="dut"'
        assert f"muxd_line_settings_requests_total{{{labels}}} {n}.0" in text
