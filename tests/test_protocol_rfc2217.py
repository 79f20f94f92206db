"""The RFC 2217 codec: vectors from pyserial's source, real peers' quirks, and pyserial itself.

pyserial's own client and its PortManager (the server half it ships) are driven
against our codecs in-process: a small object stands in for the TCP socket and
hands bytes across, so no socket is opened here.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Sequence

import pytest
import serial
import serial.rfc2217
from hypothesis import given
from hypothesis import strategies as st

from muxd.errors import LocalProtocolError, RemoteProtocolError
from muxd.protocol.line_settings import LineSettings
from muxd.protocol.rfc2217 import (
    ComPortCommand,
    ComPortOption,
    ConnectionClosed,
    Data,
    Event,
    FlowControlResume,
    FlowControlSuspend,
    NotifyLinestate,
    NotifyModemstate,
    Purge,
    Rfc2217Client,
    Rfc2217Server,
    SetBaudrate,
    SetControl,
    SetDataSize,
    SetLinestateMask,
    SetModemstateMask,
    SetParity,
    SetStopSize,
    Signature,
)
from tests import helpers
from tests.helpers import TRAILING, cut, feeds, sent, settled, splits

IAC_SB_COM = b"\xff\xfa\x2c"
IAC_SE = b"\xff\xf0"


def merge_data(events: Sequence[Event]) -> list[Event]:
    return helpers.merge_data(events, Data)


def replied(server: Rfc2217Server, request: ComPortCommand, settings: LineSettings) -> bytes:
    server.reply(request, settings)
    return server.data_to_send()


def configured(client: Rfc2217Client, settings: LineSettings) -> bytes:
    client.configure(settings)
    return client.data_to_send()


def receive(connection: Rfc2217Server | Rfc2217Client, chunks: Sequence[bytes]) -> list[Event]:
    events: list[Event] = []
    for chunk in chunks:
        connection.receive_data(chunk)
        events += connection.next_events()
    return merge_data(events)


# What pyserial's client sends on open (rfc2217.py, Serial.open and _reconfigure_port)
# for rfc2217://...?baudrate=9600, 8N1, no flow control, then DTR and RTS on and both purges.
PYSERIAL_OPEN_OPTIONS = b"\xff\xfd\x01\xff\xfb\x03\xff\xfd\x03\xff\xfd\x2c\xff\xfb\x2c"
PYSERIAL_REQUESTS: list[tuple[bytes, ComPortCommand]] = [
    (IAC_SB_COM + b"\x01\x00\x00\x25\x80" + IAC_SE, SetBaudrate(9600)),
    (IAC_SB_COM + b"\x02\x08" + IAC_SE, SetDataSize(8)),
    (IAC_SB_COM + b"\x03\x01" + IAC_SE, SetParity("N")),
    (IAC_SB_COM + b"\x04\x01" + IAC_SE, SetStopSize(1)),
    (IAC_SB_COM + b"\x05\x01" + IAC_SE, SetControl(SetControl.FLOW_NONE)),
    (IAC_SB_COM + b"\x05\x08" + IAC_SE, SetControl(SetControl.DTR_ON)),
    (IAC_SB_COM + b"\x05\x0b" + IAC_SE, SetControl(SetControl.RTS_ON)),
    (IAC_SB_COM + b"\x0c\x01" + IAC_SE, Purge(Purge.RECEIVE)),
    (IAC_SB_COM + b"\x0c\x02" + IAC_SE, Purge(Purge.TRANSMIT)),
    # poll_modem: NOTIFY_MODEMSTATE without a value
    (IAC_SB_COM + b"\x07" + IAC_SE, NotifyModemstate(None)),
]


def test_initial_negotiation_bytes() -> None:
    # WILL BINARY, DO BINARY, WILL SGA, WILL ECHO, DO COM-PORT-OPTION
    assert Rfc2217Server().data_to_send() == bytes.fromhex("fffb00 fffd00 fffb03 fffb01 fffd2c")
    # WILL BINARY, DO BINARY, WILL SGA, DO SGA, WILL COM-PORT-OPTION
    assert Rfc2217Client().data_to_send() == bytes.fromhex("fffb00 fffd00 fffb03 fffd03 fffb2c")


def test_pyserial_open_negotiation_settles_without_loops() -> None:
    for chunks in splits(PYSERIAL_OPEN_OPTIONS):
        server = settled(Rfc2217Server())
        assert receive(server, chunks) == [ComPortOption(True)]
        # DO ECHO, DO SGA and WILL COM-PORT answer our own requests: no reply. WILL SGA
        # and DO COM-PORT are new: one acceptance each.
        assert server.data_to_send() == bytes.fromhex("fffd03 fffb2c")
        server.receive_data(PYSERIAL_OPEN_OPTIONS)
        assert server.next_events() == []
        assert server.data_to_send() == b""


@pytest.mark.parametrize(("wire", "expected"), PYSERIAL_REQUESTS)
def test_pyserial_requests_parse_at_every_split(wire: bytes, expected: ComPortCommand) -> None:
    for chunks in splits(wire):
        assert receive(Rfc2217Server(), chunks) == [expected]


@pytest.mark.parametrize(("wire", "asked"), PYSERIAL_REQUESTS[:-1])
def test_replies_are_what_pyserial_checks_for(wire: bytes, asked: ComPortCommand) -> None:
    # pyserial's client accepts an answer when its payload starts with the value it sent.
    reply = replied(settled(Rfc2217Server()), asked, LineSettings(baudrate=9600))
    code, value = wire[3], wire[4:-2]
    assert reply == IAC_SB_COM + bytes((code + 100,)) + value + IAC_SE


def test_reply_carries_the_setting_in_force_not_the_request() -> None:
    server = settled(Rfc2217Server())
    in_force = LineSettings(baudrate=115200, bytesize=7, parity="E", stopbits=2, flow="rtscts")
    assert replied(server, SetBaudrate(9600), in_force) == IAC_SB_COM + b"\x65\x00\x01\xc2\x00" + IAC_SE
    assert replied(server, SetBaudrate(None), in_force) == IAC_SB_COM + b"\x65\x00\x01\xc2\x00" + IAC_SE
    assert replied(server, SetDataSize(8), in_force) == IAC_SB_COM + b"\x66\x07" + IAC_SE
    assert replied(server, SetParity(None), in_force) == IAC_SB_COM + b"\x67\x03" + IAC_SE
    assert replied(server, SetStopSize(1.5), in_force) == IAC_SB_COM + b"\x68\x02" + IAC_SE
    assert replied(server, SetControl(SetControl.FLOW_XONXOFF), in_force) == IAC_SB_COM + b"\x69\x03" + IAC_SE
    assert replied(server, SetControl(SetControl.FLOW_QUERY), in_force) == IAC_SB_COM + b"\x69\x03" + IAC_SE
    assert (
        replied(server, SetControl(SetControl.INBOUND_FLOW_QUERY), in_force)
        == IAC_SB_COM + b"\x69\x10" + IAC_SE
    )
    assert replied(server, SetControl(SetControl.BREAK_ON), in_force) == IAC_SB_COM + b"\x69\x05" + IAC_SE
    assert replied(server, SetModemstateMask(0), in_force) == IAC_SB_COM + b"\x6f\x00" + IAC_SE
    for no_answer in (
        SetControl(SetControl.DTR_QUERY),
        NotifyModemstate(None),
        Signature(None),
        FlowControlSuspend(),
    ):
        assert replied(server, no_answer, in_force) == b""


def test_setcontrol_meanings() -> None:
    assert SetControl(3).flow == "rtscts" and SetControl(0).flow is None and SetControl(0).is_query
    assert SetControl(5).break_state is True and SetControl(6).break_state is False
    assert SetControl(9).dtr is False and SetControl(11).rts is True and SetControl(8).rts is None
    assert not SetControl(8).is_query and SetControl(10).is_query


def test_signature_request_and_answer() -> None:
    # sredird and ser2net: "To get the signature [COM_PORT_OPTION 0] has to be sent."
    server = settled(Rfc2217Server())
    assert receive(server, [IAC_SB_COM + b"\x00" + IAC_SE]) == [Signature(None)]
    assert sent(server, Signature(b"muxd")) == IAC_SB_COM + b"\x64muxd" + IAC_SE
    assert receive(Rfc2217Client(), [IAC_SB_COM + b"\x64ser2net 4.3" + IAC_SE]) == [Signature(b"ser2net 4.3")]


def test_tolerated_unknowns_are_dropped() -> None:
    wire = b"".join(
        [
            IAC_SB_COM + IAC_SE,  # telnetcpcd's empty COM-PORT subnegotiation
            IAC_SB_COM + b"\x32whatever" + IAC_SE,  # unassigned code
            IAC_SB_COM + b"\x65\x00" + IAC_SE,  # a server's code sent to the server
            b"\xff\xfa\x18\x01" + IAC_SE,  # another option's subnegotiation
            b"\xff\xf1\xff\xf6",  # NOP, AYT
            b"data",
        ]
    )
    for chunks in splits(wire):
        server = settled(Rfc2217Server())
        assert receive(server, chunks) == [Data(b"data")]
        assert server.data_to_send() == b""


@pytest.mark.parametrize(
    "payload",
    [
        b"\x01\x00\x00\x25",  # SET-BAUDRATE, 3 bytes
        b"\x01\x00\x00\x25\x80\x01",  # SET-BAUDRATE, a non-NUL extra byte
        b"\x02\x09",  # data size 9
        b"\x02",  # data size missing
        b"\x03\x06",  # parity code out of range
        b"\x03\x01\x01",  # parity, 2 bytes
        b"\x04\x04",  # stop size code out of range
        b"\x05\x14",  # SET-CONTROL 20
        b"\x07\x01\x02",  # NOTIFY-MODEMSTATE, 2 bytes
        b"\x08\x00",  # FLOWCONTROL-SUSPEND with a value
        b"\x09\x00",  # FLOWCONTROL-RESUME with a value
        b"\x0a",  # SET-LINESTATE-MASK without its value
        b"\x0c\x00",  # PURGE-DATA 0
        b"\x0c\x04",  # PURGE-DATA 4
    ],
)
def test_malformed_commands_are_fatal(payload: bytes) -> None:
    wire = IAC_SB_COM + payload.replace(b"\xff", b"\xff\xff") + IAC_SE
    for chunks in splits(wire):
        server = Rfc2217Server()
        with pytest.raises(RemoteProtocolError):
            receive(server, chunks)


def test_eof() -> None:
    server = Rfc2217Server()
    assert receive(server, [b"bye", b""]) == [Data(b"bye"), ConnectionClosed()]
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    cut_short = Rfc2217Server()
    cut_short.receive_data(IAC_SB_COM + b"\x01\x00")
    with pytest.raises(RemoteProtocolError):
        cut_short.receive_data(b"")


def test_negotiation_flood_is_fatal() -> None:
    server = Rfc2217Server()
    with pytest.raises(RemoteProtocolError, match="flood"):
        server.receive_data(b"\xff\xfb\x63" * 400)


def test_com_port_option_follows_either_direction() -> None:
    # PortManager: "be happy if client answers one or the other positively".
    server = settled(Rfc2217Server())
    assert receive(server, [b"\xff\xfc\x2c"]) == [ComPortOption(False)]  # WONT: our DO refused
    assert receive(server, [b"\xff\xfd\x2c"]) == [ComPortOption(True)]  # but DO: we WILL
    assert server.data_to_send() == b"\xff\xfb\x2c"


def test_send_data_is_escaped() -> None:
    assert sent(settled(Rfc2217Server()), Data(b"a\xffb")) == b"a\xff\xffb"
    assert sent(settled(Rfc2217Client()), Data(b"\xff")) == b"\xff\xff"


def test_send_refuses_what_the_role_cannot_say() -> None:
    server, client = Rfc2217Server(), Rfc2217Client()
    for event in (SetBaudrate(None), SetParity(None), NotifyModemstate(None)):
        with pytest.raises(LocalProtocolError):
            server.send(event)
    with pytest.raises(LocalProtocolError):
        client.send(NotifyModemstate(0x10))
    for bad in (SetBaudrate(0), SetBaudrate(2**32), SetParity("X"), SetStopSize(3), SetControl(20), Purge(0)):
        with pytest.raises(LocalProtocolError):
            client.send(bad)
    with pytest.raises(LocalProtocolError):
        client.send(Signature(b""))


def test_client_configure_bytes() -> None:
    settings = LineSettings(baudrate=9600, bytesize=7, parity="E", stopbits=1.5, flow="xonxoff")
    assert configured(settled(Rfc2217Client()), settings) == b"".join(
        IAC_SB_COM + body + IAC_SE
        for body in (b"\x01\x00\x00\x25\x80", b"\x02\x07", b"\x03\x03", b"\x04\x03", b"\x05\x02")
    )


def test_client_reads_quirky_server_answers() -> None:
    client = settled(Rfc2217Client())
    wire = b"".join(
        [
            b"ser2net port 2000\r\n",  # ser2net may print a banner before anything else
            b"\xff\xfd\x2c",  # DO COM-PORT only: ser2net never offers it for its own side
            IAC_SB_COM + b"\x65\x00\x01\xc2\x00\x00\x00\x00\x00" + IAC_SE,  # sredird: 4 extra NULs
            IAC_SB_COM + b"\x69\x01" + IAC_SE,  # sredird: SET-CONTROL always answered [105 1]
            IAC_SB_COM + b"\x6b\xb0" + IAC_SE,
            IAC_SB_COM + b"\x6c" + IAC_SE,
            b"\xff\xfb\x01",  # WILL ECHO: refused, an echo would pollute the device stream
        ]
    )
    for chunks in splits(wire):
        client = settled(Rfc2217Client())
        assert receive(client, chunks) == [
            Data(b"ser2net port 2000\r\n"),
            ComPortOption(True),
            SetBaudrate(115200),
            SetControl(1),
            NotifyModemstate(0xB0),
            FlowControlSuspend(),
        ]
        assert client.data_to_send() == b"\xff\xfe\x01"


commands_strategy = st.one_of(
    st.builds(Signature, st.binary(min_size=1, max_size=200)),
    st.builds(SetBaudrate, st.integers(1, 2**32 - 1)),
    st.builds(SetDataSize, st.sampled_from([5, 6, 7, 8])),
    st.builds(SetParity, st.sampled_from("NOEMS")),
    st.builds(SetStopSize, st.sampled_from([1, 1.5, 2])),
    st.builds(SetControl, st.integers(0, 19)),
    st.builds(NotifyLinestate, st.integers(0, 255)),
    st.builds(NotifyModemstate, st.integers(0, 255)),
    st.just(FlowControlSuspend()),
    st.just(FlowControlResume()),
    st.builds(SetLinestateMask, st.integers(0, 255)),
    st.builds(SetModemstateMask, st.integers(0, 255)),
    st.builds(Purge, st.integers(1, 3)),
)
traffic = st.lists(st.one_of(commands_strategy, st.builds(Data, st.binary(min_size=1))), max_size=12)


@given(traffic, st.lists(st.integers(0, 10_000), max_size=10))
def test_server_to_client_round_trips_split_anywhere(events: list[Event], points: list[int]) -> None:
    server, client = settled(Rfc2217Server()), settled(Rfc2217Client())
    wire = b"".join(sent(server, e) for e in events if not isinstance(e, (ComPortOption, ConnectionClosed)))
    points = [p % (len(wire) + 1) for p in points]
    assert receive(client, cut(wire, points)) == merge_data(events)


@given(traffic, st.lists(st.integers(0, 10_000), max_size=10))
def test_client_to_server_round_trips_split_anywhere(events: list[Event], points: list[int]) -> None:
    # A client's notifications are polls: they carry no value.
    events = [
        dataclasses.replace(e, value=None) if isinstance(e, NotifyModemstate | NotifyLinestate) else e
        for e in events
    ]
    server, client = settled(Rfc2217Server()), settled(Rfc2217Client())
    wire = b"".join(sent(client, e) for e in events if not isinstance(e, (ComPortOption, ConnectionClosed)))
    points = [p % (len(wire) + 1) for p in points]
    assert receive(server, cut(wire, points)) == merge_data(events)


def test_our_client_and_server_settle_and_configure() -> None:
    server, client = Rfc2217Server(), Rfc2217Client()
    to_server, to_client = client.data_to_send(), server.data_to_send()
    server_events: list[Event] = []
    client_events: list[Event] = []
    for _ in range(4):
        server.receive_data(to_server)
        client.receive_data(to_client)
        server_events += server.next_events()
        client_events += client.next_events()
        to_server, to_client = client.data_to_send(), server.data_to_send()
        if not to_server and not to_client:
            break
    assert not to_server and not to_client, "negotiation loop"
    assert server_events == [ComPortOption(True)] and client_events == [ComPortOption(True)]
    wanted = LineSettings(baudrate=57600, parity="O", flow="rtscts")
    server.receive_data(configured(client, wanted))
    requests = server.next_events()
    answers = b"".join(
        replied(server, request, wanted)
        for request in requests
        if not isinstance(request, Data | ComPortOption | ConnectionClosed)
    )
    client.receive_data(answers)
    assert client.next_events() == requests


class PortManagerWire:
    """pyserial's PortManager writes here; the bytes go to our client."""

    def __init__(self) -> None:
        self.written = bytearray()

    def write(self, data: bytes) -> None:
        self.written += data

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data


def test_our_client_against_pyserials_port_manager() -> None:
    device = serial.serial_for_url("loop://", baudrate=115200)
    try:
        wire = PortManagerWire()
        manager = serial.rfc2217.PortManager(device, wire)
        client = Rfc2217Client()
        to_manager = client.data_to_send()
        events: list[Event] = []
        for _ in range(4):
            for_device = b"".join(manager.filter(to_manager))
            assert for_device == b""
            client.receive_data(wire.take())
            events += client.next_events()
            to_manager = client.data_to_send()
            if not to_manager:
                break
        assert not to_manager, "negotiation loop"
        # PortManager announces the modem lines each time the client accepts RFC 2217,
        # once per direction: first with the deltas, then without. loop:// reports CTS
        # and DSR from RTS and DTR (both on) and CD always on.
        assert events == [ComPortOption(True), NotifyModemstate(0xB0 | 0x0B), NotifyModemstate(0xB0)]

        wanted = LineSettings(baudrate=9600, bytesize=7, parity="E", stopbits=2, flow="rtscts")
        assert b"".join(manager.filter(configured(client, wanted))) == b""
        assert (device.baudrate, device.bytesize, device.parity, device.stopbits, device.rtscts) == (
            9600,
            7,
            "E",
            2,
            True,
        )
        client.receive_data(wire.take())
        assert client.next_events() == [
            SetBaudrate(9600),
            SetDataSize(7),
            SetParity("E"),
            SetStopSize(2),
            SetControl(SetControl.FLOW_RTSCTS),
        ]

        assert b"".join(manager.filter(sent(client, Data(b"\xffAT\r")))) == b"\xffAT\r"
        client.receive_data(b"".join(manager.escape(b"\xffOK\r\n")))
        assert client.next_events() == [Data(b"\xffOK\r\n")]
    finally:
        device.close()


class PyserialWire:
    """Stands in for the TCP socket of pyserial's rfc2217 client, with our server behind it.

    sendall() feeds our Rfc2217Server at once and queues its answers for recv(), which
    pyserial's reader thread calls. ``handle`` plays muxd: ``settings`` are the line
    settings in force, changed only while ``accept`` is true.
    """

    def __init__(self) -> None:
        self.server = Rfc2217Server()
        self.settings = LineSettings()
        self.accept = True
        self.from_client = bytearray()
        self.lock = threading.Lock()
        self.answers: queue.Queue[bytes] = queue.Queue(maxsize=1000)
        self.answers.put(self.server.data_to_send())

    def setsockopt(self, *args: object) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        with self.lock:
            self.server.receive_data(data)
            for event in self.server.next_events():
                self.handle(event)
            out = self.server.data_to_send()  # negotiation answers first, then handle()'s
            if out:
                self.answers.put(out)

    def handle(self, event: Event) -> None:
        if isinstance(event, Data):
            self.from_client += event.data
            return
        if isinstance(event, ComPortOption):
            cts_dsr_cd = NotifyModemstate.CTS | NotifyModemstate.DSR | NotifyModemstate.CD
            if event.enabled:
                self.server.send(NotifyModemstate(cts_dsr_cd))
            return
        if isinstance(event, ConnectionClosed):
            return
        if self.accept:
            changes = {
                SetBaudrate: "baudrate",
                SetDataSize: "bytesize",
                SetParity: "parity",
                SetStopSize: "stopbits",
            }
            field = changes.get(type(event))
            value = getattr(event, "value", None)
            if field is not None and value is not None:
                self.settings = dataclasses.replace(self.settings, **{field: value})
        self.server.reply(event, self.settings)

    def recv(self, size: int) -> bytes:
        try:
            data = self.answers.get(timeout=0.05)
        except queue.Empty:
            raise TimeoutError from None
        assert len(data) <= size
        return data

    def device_sends(self, data: bytes) -> None:
        with self.lock:
            self.answers.put(sent(self.server, Data(data)))

    def shutdown(self, how: int) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.mark.filterwarnings("ignore:set(Daemon|Name)\\(\\) is deprecated:DeprecationWarning")
def test_pyserials_client_against_our_server(monkeypatch: pytest.MonkeyPatch) -> None:
    wire = PyserialWire()
    monkeypatch.setattr(serial.rfc2217.socket, "create_connection", lambda address, timeout: wire)
    port = serial.rfc2217.Serial("rfc2217://127.0.0.1:7001", baudrate=9600, timeout=2)
    try:
        assert wire.settings.baudrate == 9600
        port.write(b"\xffAT\r")
        assert bytes(wire.from_client) == b"\xffAT\r"
        wire.device_sends(b"\xffOK\r\n")
        assert port.read(5) == b"\xffOK\r\n"
        assert port.cts and port.dsr and port.cd and not port.ri

        port.baudrate = 115200
        assert wire.settings.baudrate == 115200
        # muxd refuses the change and answers with the rate in force: pyserial notices.
        wire.accept = False
        with pytest.raises(ValueError, match="rejected"):
            port.baudrate = 57600
        assert wire.settings.baudrate == 115200
    finally:
        port.close()


# -- one outbox, broken after a peer error, option 255 (issues 10 and 15) ---------------


def test_outbox_is_one_channel_in_order() -> None:
    server = Rfc2217Server()
    initial = bytes.fromhex("fffb00 fffd00 fffb03 fffb01 fffd2c")
    server.receive_data(b"\xff\xfb\x63")  # WILL 99: refused, DONT 99 queued after the initial negotiation
    server.send(Data(b"a\xff"))
    server.reply(SetBaudrate(9600), LineSettings(baudrate=57600))
    server.receive_data(b"\xff\xfd\x63")  # DO 99: WONT 99, after what we queued
    assert server.data_to_send() == b"".join(
        [
            initial,
            b"\xff\xfe\x63",
            b"a\xff\xff",
            IAC_SB_COM + b"\x65\x00\x00\xe1\x00" + IAC_SE,
            b"\xff\xfc\x63",
        ]
    )
    assert server.data_to_send() == b""
    client = Rfc2217Client()
    client.configure(LineSettings(baudrate=9600))
    out = client.data_to_send()
    assert out.startswith(
        bytes.fromhex("fffb00 fffd00 fffb03 fffd03 fffb2c") + IAC_SB_COM + b"\x01\x00\x00\x25\x80"
    )
    assert client.data_to_send() == b""


def test_what_raises_queues_nothing() -> None:
    server, client = settled(Rfc2217Server()), settled(Rfc2217Client())
    with pytest.raises(LocalProtocolError):
        server.send(SetBaudrate(None))
    with pytest.raises(LocalProtocolError):
        server.reply(SetBaudrate(9600), LineSettings(baudrate=2**32))
    with pytest.raises(LocalProtocolError):  # all or nothing: the baud rate goes first and fits
        client.configure(LineSettings(baudrate=9600, parity="X"))
    assert server.data_to_send() == b"" and client.data_to_send() == b""


def test_flood_bound_counts_answers_since_the_last_collection() -> None:
    server = settled(Rfc2217Server())
    for _ in range(3):  # 900 bytes of answers each time: under the bound once collected
        server.receive_data(b"\xff\xfb\x63" * 300)
        assert server.data_to_send() == b"\xff\xfe\x63" * 300
    server.receive_data(b"\xff\xfb\x63" * 300)
    with pytest.raises(RemoteProtocolError, match="flood"):
        server.receive_data(b"\xff\xfb\x63" * 300)


CODEC_MALFORMED = [
    b"\xff\xf0",  # IAC SE outside a subnegotiation
    b"\xff\xfa\xff",  # IAC SB IAC: EXOPL never agreed
    IAC_SB_COM + b"\x01\xff\xf1" + IAC_SE,  # a command inside a subnegotiation
    IAC_SB_COM + b"\x02\x09" + IAC_SE,  # data size 9
    IAC_SB_COM + b"\x0c\x00" + IAC_SE,  # PURGE-DATA 0
    IAC_SB_COM + b"x" * 300 + IAC_SE,  # longer than MAX_SUBNEGOTIATION
]
# Valid bytes that, fed with the error in one call, would give events and an answer.
BEFORE = b"data\xff\xfb\x63"


@pytest.mark.parametrize("bad", CODEC_MALFORMED)
@pytest.mark.parametrize("role", [Rfc2217Server, Rfc2217Client])
def test_codec_stays_broken_after_a_peer_error(role: type[Rfc2217Server | Rfc2217Client], bad: bytes) -> None:
    if role is Rfc2217Client and bad[3:4] in (b"\x02", b"\x0c"):
        bad = bad[:3] + bytes((bad[3] + 100,)) + bad[4:]  # the answer codes a client decodes
    for chunks in feeds(BEFORE + bad):
        codec = settled(role())
        with pytest.raises(RemoteProtocolError) as first:
            for chunk in chunks:
                codec.receive_data(chunk)
                codec.next_events()  # collected after each call, as a caller does
                codec.data_to_send()
        assert "earlier error" not in str(first.value)
        # Nothing of the failed call comes out: no events, no answers.
        assert codec.next_events() == [], chunks
        assert codec.data_to_send() == b"", chunks
        for later in (b"x", b"\xff\xfb\x00", b""):
            with pytest.raises(RemoteProtocolError, match="after an earlier error"):
                codec.receive_data(later)
        assert codec.next_events() == [] and codec.data_to_send() == b""
        codec.send(Data(b"\xff"))  # our side still works, for a last flush
        assert codec.data_to_send() == b"\xff\xff"


def test_pending_events_are_discarded_by_an_error() -> None:
    server = settled(Rfc2217Server())
    server.receive_data(b"uncollected")
    with pytest.raises(RemoteProtocolError):
        server.receive_data(b"\xff\xf0")
    assert server.next_events() == []


@pytest.mark.parametrize(
    ("wire", "answer"),
    [
        (b"\xff\xfb\xff", b"\xff\xfe\xff"),  # WILL EXOPL: DONT EXOPL
        (b"\xff\xfd\xff", b"\xff\xfc\xff"),  # DO EXOPL: WONT EXOPL
        (b"\xff\xfc\xff", b""),
        (b"\xff\xfe\xff", b""),
        (b"\xff\xfb\xff\xff\xfd\xff", b"\xff\xfe\xff\xff\xfc\xff"),
    ],
)
@pytest.mark.parametrize("role", [Rfc2217Server, Rfc2217Client])
def test_option_255_is_refused_not_raised(
    role: type[Rfc2217Server | Rfc2217Client], wire: bytes, answer: bytes
) -> None:
    for chunks in feeds(wire):
        codec = settled(role())
        events = receive(codec, chunks)
        out = codec.data_to_send()
        if b"".join(chunks).endswith(TRAILING):
            # TRAILING: data, WILL BINARY (we asked for it: no answer), an escaped 0xFF.
            assert events == [Data(b"more\xff")], chunks
        else:
            assert events == [], chunks
        assert out == answer, chunks


def test_option_255_ends_no_conversation() -> None:
    # The K2 storm of issue 15 item 5: WILL 255 then real traffic, in one segment.
    client = settled(Rfc2217Client())
    client.receive_data(b"\xff\xfb\xff\xff\xfd\x2c" + IAC_SB_COM + b"\x65\x00\x00\x25\x80" + IAC_SE + b"ok")
    assert client.next_events() == [ComPortOption(True), SetBaudrate(9600), Data(b"ok")]
    assert client.data_to_send() == b"\xff\xfe\xff"
