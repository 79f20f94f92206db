"""Every error of a config file, found in one pass and raised together.

The schema (muxd.config.schema) reads a file section by section. An error in a
value is added to the document's Report and the value's default stands in for
it, so the reading goes on and finds the next error too; an error that leaves
a section without a shape to read (a list where a mapping belongs) skips that
section only. When the whole file has been read, its errors are raised
together, in line order, as one ConfigErrors: `muxd check`, `muxd run` and a
reload (SIGHUP) each see every mistake of the file at once, not one per run.

Items are the parts of a config that can be left out on their own: a port, a
listener, an http server. ``Report.each`` reads a list of them and keeps only
those read without an error, so that `muxd check` can still check what was
valid against the machine (muxd.checks) without reporting a stand-in value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from muxd.errors import ConfigError

Item = TypeVar("Item")
T = TypeVar("T")


def line_order(errors: Iterable[ConfigError]) -> list[ConfigError]:
    """By line, those without one (the file as a whole) last; stable within a line."""
    return sorted(errors, key=lambda e: (e.line is None, e.line or 0))


class ConfigErrors(ConfigError):
    """Every error of one file, in line order (``errors``). As a ConfigError it
    is the first of them, one line as ever: what a log line or a caller that
    wants one error shows. Whoever reports to the operator (`muxd check`,
    `muxd run`) prints each of ``each_error(exc)``."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = line_order(errors)
        first = self.errors[0]
        super().__init__(first.message, first.path, first.line, first.file)


def each_error(exc: ConfigError) -> list[ConfigError]:
    """The single errors in `exc`, which may hold several (ConfigErrors)."""
    return exc.errors if isinstance(exc, ConfigErrors) else [exc]


class Report:
    """The errors of one document, and of the item being read."""

    def __init__(self) -> None:
        self.errors: list[ConfigError] = []
        # Errors counted per item being read, innermost last.
        self._counts: list[int] = []

    def add(self, exc: ConfigError) -> None:
        found = each_error(exc)
        self.errors.extend(found)
        if self._counts:
            self._counts[-1] += len(found)

    def collect(self, items: Iterable[Item], read: Callable[[Item], T]) -> list[T]:
        """read() of each item; an item whose read() fails is left out, its
        error added, and the rest read on."""
        out: list[T] = []
        for item in items:
            try:
                out.append(read(item))
            except ConfigError as exc:
                self.add(exc)
        return out

    def each(self, items: Iterable[Item], read: Callable[[Item], T]) -> list[tuple[Item, T]]:
        """(item, read(item)) for each item read without an error; the errors
        of the others are added, so one bad listener hides no other error.
        An error inside a nested item counts for that item only."""
        out: list[tuple[Item, T]] = []
        for item in items:
            self._counts.append(0)
            try:
                value = read(item)
            except ConfigError as exc:
                self.add(exc)
                continue
            finally:
                errors = self._counts.pop()
            if not errors:
                out.append((item, value))
        return out

    def raise_any(self) -> None:
        if self.errors:
            raise ConfigErrors(self.errors)
