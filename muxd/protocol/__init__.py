"""Sans-I/O protocol codecs: bytes in, events out; never a socket or a select."""
