"""Upstreams: the one connection to the device (serial port, K2 over TCP, or the simulator)."""
