"""Listeners: thin adapters between sockets (or a pty) and a port's hub."""
