"""LineControl: the line_control policies, with real hub readers as requesters
and a real upstream (the simulated device) that owns the settings in force."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from prometheus_client import generate_latest

from muxd.config import Listener, Port, SerialUpstream, SimUpstream
from muxd.connection import policy_for
from muxd.errors import SettingsRefused
from muxd.hub import Hub, Reader
from muxd.linecontrol import LineControl, SettingsCounts
from muxd.metrics import make_registry
from muxd.port import PortRuntime, bounds_for, make_upstream
from muxd.protocol.line_settings import LineSettings
from muxd.reactor import Reactor
from muxd.upstream.sim import SimDevice
from tests.helpers import IdleOwner

RW = Listener("rfc2217", "rw-listener", mode="rw")
RO = Listener("rfc2217", "ro-listener", mode="ro")
BASE = LineSettings()
SLOW = LineSettings(baudrate=9600)
SLOWER = LineSettings(baudrate=4800, parity="E")


class Recording:
    """An upstream that grants every change and records it."""

    def __init__(self, settings: LineSettings) -> None:
        self.settings = settings
        self.applied: list[LineSettings] = []

    def apply_settings(self, wanted: LineSettings) -> LineSettings:
        self.applied.append(wanted)
        self.settings = wanted
        return wanted


class Refusing:
    """An upstream whose device takes no change (pyserial rejects the value)."""

    def __init__(self, settings: LineSettings, error: Exception) -> None:
        self.settings = settings
        self.error = error

    def apply_settings(self, wanted: LineSettings) -> LineSettings:
        raise self.error


@pytest.fixture
def reactor() -> Iterator[Reactor]:
    r = Reactor()
    yield r
    r.close()


def make_hub(port: Port, reactor: Reactor) -> Hub:
    return Hub(port.name, bounds_for(port), reactor)


def setup(reactor: Reactor, policy: str) -> tuple[Hub, LineControl, SimDevice]:
    port = Port("dut", SimUpstream(baudrate=115200), line_control=policy)  # type: ignore[arg-type]
    hub = make_hub(port, reactor)
    sim = SimDevice(port.upstream, hub, reactor)  # type: ignore[arg-type]
    return hub, LineControl(port, sim), sim


def reader(hub: Hub, listener: Listener, peer: str) -> Reader:
    return hub.attach(IdleOwner(), policy_for(listener), peer)


def stats(lc: LineControl, listener: str) -> SettingsCounts:
    return lc.counts.get(listener, SettingsCounts())


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
    assert (stats(lc, "rw-listener").applied, stats(lc, "rw-listener").refused) == (1, 2)
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
    assert sim.settings == BASE and lc.owner is None and stats(lc, "rw-listener").applied == 0


def test_any_applies_every_rw_request(reactor: Reactor) -> None:
    hub, lc, sim = setup(reactor, "any")
    a, b = reader(hub, RW, "a:1"), reader(hub, RW, "b:2")
    assert lc.request(a, SLOW) == SLOW
    assert lc.request(b, SLOWER) == SLOWER and sim.settings == SLOWER
    assert stats(lc, "rw-listener").applied == 2 and lc.owner is None


@pytest.mark.parametrize("policy", ["owner", "any"])
def test_read_only_readers_never_change_or_own(reactor: Reactor, policy: str) -> None:
    hub, lc, sim = setup(reactor, policy)
    ro = reader(hub, RO, "ro:1")
    assert lc.request(ro, SLOW) == BASE
    assert lc.owner is None and sim.settings == BASE and stats(lc, "ro-listener").refused == 1


def test_a_change_the_upstream_rejects_leaves_the_settings_in_force(
    reactor: Reactor, caplog: pytest.LogCaptureFixture
) -> None:
    port = Port("dut", SerialUpstream("/dev/null"), line_control="owner")
    refusing = Refusing(BASE, SettingsRefused("invalid baud rate: 9600"))
    lc = LineControl(port, refusing)
    caplog.set_level(logging.WARNING, "muxd.linecontrol")
    assert lc.request(reader(make_hub(port, reactor), RW, "a:1"), SLOW) == BASE
    assert stats(lc, "rw-listener").failed == 1 and stats(lc, "rw-listener").applied == 0
    assert "could not be applied: invalid baud rate: 9600; 115200 8N1 stays" in caplog.text


def test_only_a_refusal_is_an_answer_anything_else_is_a_bug(reactor: Reactor) -> None:
    # An OverflowError out of pyserial used to be caught (or not) here; now the
    # upstream turns what a device refuses into SettingsRefused, and anything
    # else reaching the policy is a bug of ours, left to the loop's handler.
    port = Port("dut", SerialUpstream("/dev/null"), line_control="owner")
    lc = LineControl(port, Refusing(BASE, OverflowError("signed integer is greater than maximum")))
    with pytest.raises(OverflowError):
        lc.request(reader(make_hub(port, reactor), RW, "a:1"), SLOW)
    assert stats(lc, "rw-listener") == SettingsCounts()


def test_starts_from_the_upstream_config(reactor: Reactor) -> None:
    sim = Port("dut", SimUpstream(baudrate=9600))
    assert LineControl(sim, make_upstream(sim, make_hub(sim, reactor), reactor)).settings == SLOW
    serial = Port("dut", SerialUpstream("/dev/ttyUSB0", SLOWER))
    assert LineControl(serial, make_upstream(serial, make_hub(serial, reactor), reactor)).settings == SLOWER


def test_settings_are_read_from_the_upstream_never_copied(reactor: Reactor) -> None:
    _hub, lc, sim = setup(reactor, "owner")
    # The upstream changed them on its own (a K2's RFC 2217 answer, a reopen
    # that fell back to the configured settings): the policy sees it at once.
    sim.apply_settings(SLOWER)
    assert lc.settings == SLOWER
    assert "settings" not in vars(lc)


def test_a_refusal_by_the_simulator_is_answered_with_the_settings_in_force(reactor: Reactor) -> None:
    hub, lc, sim = setup(reactor, "any")
    assert lc.request(reader(hub, RW, "a:1"), LineSettings(baudrate=0)) == BASE
    assert sim.settings == BASE and stats(lc, "rw-listener") == SettingsCounts(failed=1)


def test_reload_keeps_changes_unless_the_upstream_was_reopened(reactor: Reactor) -> None:
    hub, lc, _sim = setup(reactor, "owner")
    a = reader(hub, RW, "a:1")
    lc.request(a, SLOW)
    port = Port("dut", SimUpstream(baudrate=115200), line_control="any")
    lc.reload(port, None)
    assert lc.settings == SLOW and lc.policy == "any" and lc.owner is None
    reopened = Recording(BASE)  # a new upstream opens with the configured settings
    lc.reload(port, reopened)
    assert lc.settings == BASE
    lc.request(a, SLOWER)
    assert reopened.applied == [SLOWER]
    assert stats(lc, "rw-listener").applied == 2  # counters survive a reload


def test_outcomes_are_metrics(reactor: Reactor) -> None:
    tcp = Listener("tcp", "tcp-listener", mode="rw")
    port = Port("dut", SimUpstream(baudrate=115200), listeners=(RW, tcp), line_control="owner")
    rt = PortRuntime.build(port, reactor)
    hub, lc = rt.hub, rt.line_control
    a, b = reader(hub, RW, "a:1"), reader(hub, RW, "b:2")
    lc.request(a, SLOW)
    lc.request(b, SLOWER)
    text = generate_latest(make_registry(lambda: [rt], reactor)).decode()
    for outcome, n in (("applied", 1), ("refused", 1), ("failed", 0)):
        labels = f'listener="rw-listener",outcome="{outcome}",port="dut"'
        assert f"muxd_line_settings_requests_total{{{labels}}} {n}.0" in text
    # A TCP client cannot ask for line settings: no series that could never move.
    assert 'muxd_line_settings_requests_total{listener="tcp-listener"' not in text
