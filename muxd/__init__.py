"""muxd: one owner of a serial device, many readers.

One process holds the device (a local serial port, a K2 serial server over TCP,
or the built-in simulator) and republishes its byte stream to any number of
local readers through a shared, bounded log with a cursor per reader.
"""

__version__ = "0.1.0"
