"""labgrid's client side of tests/test_ser2net.py, run by labgrid's own
interpreter (the Makefile's .venv-labgrid): a NetworkSerialPort over RFC 2217
and a SerialDriver that expects a shell prompt, as a lab's test suite does.

A separate interpreter because labgrid installs pyserial-labgrid over
pyserial's `serial` package, and the rest of the suite tests muxd against
pyserial itself. Exit 0 when the console answered as expected; a traceback
and a non-zero exit otherwise.

    python tests/labgrid_client.py HOST PORT
"""

import sys

import labgrid
from labgrid.driver import SerialDriver
from labgrid.resource import NetworkSerialPort


def main(host: str, port: int) -> None:
    target = labgrid.Target("muxd-ser2net")
    try:
        NetworkSerialPort(target, name=None, host=host, port=port, speed=115200, protocol="rfc2217")
        console = SerialDriver(target, name=None)
        target.activate(console)
        console.sendline("")
        console.expect("# ", timeout=10)
        console.sendline("echo hi")
        console.expect("hi\r\n# ", timeout=10)
    finally:
        target.cleanup()
    print("labgrid: prompt and answer seen")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
