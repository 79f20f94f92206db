"""The MQTT bridge: every published port's console on a broker, as one more reader of the hub.

One connection per daemon (the top-level ``mqtt:`` section), one ``Feed`` per
port with a ``mqtt:`` section. Topics, under ``prefix`` (default ``muxd``):

``<prefix>/<port>/rx``
    The device's output, never retained, at the port's ``qos`` (0 or 1).
    ``text`` and ``jsonl``: one message per record of the port's shared
    FramedLog (muxd.records): a line, an event (``{"event":"gap","bytes":N}``
    where the bridge lost N device bytes, upstream up/down), or in jsonl the
    part of a line the device has sent so far. A jsonl message is the JSON
    object alone (no newline after it); a text message is the stamped line
    with its newline. A text line still open is held until its end, at most
    LINE_HOLD or MAX_MESSAGE. ``raw``: chunks of at
    most RAW_CHUNK bytes, sent at most RAW_DELAY after their first byte came.
``<prefix>/<port>/tx``
    Subscribed only with ``write: true``. Each message goes to the device
    through the port's write arbitration like a rw listener's ``write: lines``
    input: whole lines, in order, and the message's last partial line as a
    unit of its own right after it (the bytes are sent as published: end a
    command with a newline). A subscription has no backpressure, so a message
    the write queue has no room for is refused and counted (``refused``,
    muxd_mqtt_tx_messages_total{outcome="refused"}), never dropped silently.
``<prefix>/<port>/state``
    Retained JSON: the upstream's state, reason and since, the line settings,
    and counters. Published at connect and whenever state, reason or line
    settings change (checked every STATE_INTERVAL), and once more on a clean stop.
``<prefix>/<host>/online``
    Retained: ``online`` at connect; the last will, and what a clean stop
    publishes before it disconnects, is ``offline``.

One loop. paho-mqtt is driven by the reactor through its external-loop API:
the socket callbacks (on_socket_open / close / register_write /
unregister_write) put its socket in the reactor, ``loop_read`` /
``loop_write`` run on its events and ``loop_misc`` on a timer. paho's own
connect (``reconnect()``) is a blocking ``socket.create_connection`` and a
blocking TLS handshake, so the bridge does that part itself, on the reactor,
over the transports every listener uses (muxd.mqtt.wire: plain TCP, or
muxd.tls's TlsTransport as a client: an SSLObject over memory BIOs); then the
transport, in a small socket-like adapter, is handed to paho
(``_Client._create_socket``), which sends CONNECT. The whole attempt,
CONNACK included, must finish within ``connect_timeout`` (10 s), so a
broker that is unreachable, black-holed (accepts TCP and never answers) or
hangs costs a timer, never a stalled loop. The link's states are an upstream's
(muxd.upstream.state: connecting, up, down, backing-off, with its transition
table), and so is the reconnect backoff: doubling from ``backoff_min`` to
``backoff_max`` with jitter, reset once a link has stayed up 10 s. The broker
is a numeric IP: no DNS lookup.

Bounds. What the broker sends is bounded before it is read
(muxd.mqtt.packet): a packet longer than the largest write queue of a port
with ``write: true`` (plus 4 KiB of header room) could never be written to a
device, so its fixed header is enough to refuse it: the link is closed
unread, the refusal counted (muxd_mqtt_reconnects_total{reason="packet too
large"}) and logged, and the bridge reconnects (with a clean session the
broker does not send it again).

A feed is a hub reader with a cursor and a bound (``buffer``, by default
1 MiB). At most MAX_INFLIGHT messages (all ports together) are
handed to paho and not yet acknowledged (QoS 1) or written (QoS 0): paho's
queue is that bounded, and the rest waits in the hub's ring, costing no
memory of its own. While the broker is slow or gone a feed is a blocked
reader: past its bound the hub skips its cursor forward, counts the loss
(``dropped``) and marks a gap record in its stream; a broker outage never
slows the device or another reader. On reconnect the feed carries on from its
cursor; QoS 1 messages paho held are sent again (so a line may arrive twice,
never out of order), QoS 0 messages paho had not written yet are lost and
counted (``lost``).
"""
