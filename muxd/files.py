"""Operator files read inside the event loop, at start and on every reload:
the config, token files, TLS certificates and keys, the MQTT password.

The loop reads them synchronously, so whatever sits at the path must not be
able to hold it, nor redirect the read:

- O_NONBLOCK: opening a FIFO for reading blocks until a writer comes (never,
  for a planted one), and a SIGHUP would stop every port. With O_NONBLOCK
  the open returns at once, and what it opened is then refused.
- fstat on the open fd must say regular file: a FIFO, a device, a socket or
  a directory is refused with an error that says which it is. The fd is
  checked, not the path, so nothing can be swapped in between check and read.
- A bound on the size, the caller's (each says why its size), checked
  against st_size before reading and again on the bytes read: a huge file is
  refused, never read into memory by the loop.
- O_NOFOLLOW where the caller wants no symlink (token files); the others
  follow links, as certbot's live/ directory and config management are made
  of them.
- ssl.SSLContext.load_cert_chain and load_verify_locations take paths only:
  ``checked_paths`` opens and checks each file and hands over its
  /proc/self/fd/N name, which opens that same checked file again.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator

_KINDS = {
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a directory",
    stat.S_IFLNK: "a symbolic link",
}


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words: "a FIFO", "a directory"..."""
    return _KINDS.get(stat.S_IFMT(mode), "an unknown kind of file")


@contextlib.contextmanager
def opened(path: str, limit: int, *, follow: bool = True) -> Iterator[tuple[int, os.stat_result]]:
    """The fd and fstat of the regular file at path, closed on exit. OSError
    (its strerror says why) if it cannot be opened, is not a regular file or
    is over ``limit`` bytes; a symlink too, with follow=False."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP and not follow:
            raise OSError(errno.ELOOP, "it is a symbolic link, which is not followed", path) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"it is {kind_of(st.st_mode)}, not a regular file", path)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"it is {st.st_size} bytes, over the {limit} expected", path)
        yield fd, st
    finally:
        os.close(fd)


def read_fd(fd: int, limit: int, path: str) -> bytes:
    """All of a regular file's bytes, at most limit (a file that grew past it
    since the fstat is refused, OSError)."""
    chunks: list[bytes] = []
    size = 0
    # A regular file's read returns what is asked or the rest; a file growing
    # meanwhile ends by the limit, so this loops at most limit/64 KiB + 2 times.
    while chunk := os.read(fd, min(limit + 1 - size, 64 * 1024) or 1):
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise OSError(errno.EFBIG, f"it is over the {limit} bytes expected", path)
    return b"".join(chunks)


def read_regular(path: str, limit: int, *, follow: bool = True) -> bytes:
    """The bytes of the regular file at path, at most limit; OSError says why not."""
    with opened(path, limit, follow=follow) as (fd, _st):
        return read_fd(fd, limit, path)


@contextlib.contextmanager
def checked_paths(paths: list[str], limit: int) -> Iterator[list[str]]:
    """Paths for a library that opens files by name (OpenSSL), each one the
    /proc/self/fd/N of the checked regular file, open until exit. Without
    /proc the paths themselves, checked a moment before."""
    with contextlib.ExitStack() as stack:
        fds = [stack.enter_context(opened(path, limit))[0] for path in paths]
        if os.path.isdir("/proc/self/fd"):
            yield [f"/proc/self/fd/{fd}" for fd in fds]
        else:
            yield list(paths)
