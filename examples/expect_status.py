#!/usr/bin/env python3
"""Expect-style scripting against a muxd port with pexpect: send a command, expect its answer.

muxd does not ship an expect engine: a test framework already has one. This
shows pexpect, the long-kept library behind many of them, driving a port
through a muxd TCP listener that is read-write. pexpect is not a dependency of
muxd: a framework that uses it installs it itself (``pip install pexpect``;
muxd's own ``[test]`` extra does, to run this script in its test suite).

What it does, against the built-in simulated board (``muxd demo``, or any
port with ``upstream: {sim: {}}``):

1. connect to the listener with a plain socket; pexpect's SocketSpawn reads
   and matches over it (``pexpect.fdpexpect.fdspawn(sock.fileno())`` works
   the same on Unix);
2. send ``status`` and a carriage return, as a terminal's Enter key does;
3. expect the board's answer, ``ok counter=N uptime=...s baud=...``, within
   the timeout.

Why ``ok counter=`` and not ``status: counter=``: the board also prints a
``status: counter=N`` line by itself (every ``status_interval``), which would match even if
the command never reached it (a read-only listener, say). Expect the text
only the command can cause.

TCP is a byte stream: the answer may arrive split over several reads, or
together with other output. pexpect keeps reading and searching its buffer
until the pattern matches or the timeout ends, so neither matters.

Run it:   muxd demo &   python3 examples/expect_status.py 127.0.0.1:7000
Exit status: 0 the answer came; 1 no answer before the timeout (or the
connection closed); 2 a bad command line, or no listener at the address.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import sys

import pexpect
from pexpect.socket_pexpect import SocketSpawn

# The answer to `status`; the group is the board's counter.
ANSWER = rb"ok counter=(\d+)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Send `status` to a muxd port and expect the answer.")
    parser.add_argument(
        "address",
        nargs="?",
        default="127.0.0.1:7000",
        help="HOST:PORT of a rw TCP listener (default: the demo's)",
    )
    parser.add_argument(
        "--timeout", type=float, default=5.0, help="seconds to wait for the answer (default 5)"
    )
    args = parser.parse_args(argv)
    host, _, port = args.address.rpartition(":")
    if not port.isdigit():
        parser.error(f"not HOST:PORT: {args.address!r}")

    try:
        sock = socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=args.timeout)
    except OSError as exc:
        print(f"cannot connect to {args.address}: {exc}", file=sys.stderr)
        return 2
    # SocketSpawn reads with its own timeouts; the socket itself stays blocking.
    sock.settimeout(None)
    # Bytes in, bytes out: a board's console is not always valid text.
    child = SocketSpawn(sock, timeout=args.timeout)
    try:
        child.send(b"status\r")
        try:
            child.expect(ANSWER)
        except pexpect.TIMEOUT:
            print(f"no answer to `status` within {args.timeout:g}s", file=sys.stderr)
            return 1
        except pexpect.EOF:
            print("the connection closed before the answer", file=sys.stderr)
            return 1
        print(f"the board answered: counter={int(child.match.group(1))}")
        return 0
    finally:
        # close() shuts the socket down first, which a peer's reset makes fail: it is closed either way.
        with contextlib.suppress(OSError):
            child.close()


if __name__ == "__main__":
    sys.exit(main())
