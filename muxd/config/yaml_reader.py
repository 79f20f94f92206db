"""YAML text in, located nodes out: the only module of muxd.config that imports YAML.

The file is parsed with PyYAML's safe loader into a node tree (``yaml.compose``)
rather than plain Python objects, because nodes keep their line numbers: every
error can then say ``muxd.yaml:14: ports[0].listeners[1].tcp: port must be
1..65535, got 70000``.

The composer is the safe loader's, narrowed to the plain data a muxd config
needs: explicit tags (``!vault``, ``!!int``), anchors and aliases, and merge keys
(``<<``) are refused with their line, and nesting is bounded. Scalars are built
here, not by PyYAML's constructors, so no text can make them raise: only null,
booleans, bounded integers and floats, and strings come out (a timestamp-like
value such as ``2024-01-01`` stays a string).

``Node`` is a YAML node with the key path that led to it. Its typed accessors
(``text``, ``size``, ``duration``...) apply the grammars of muxd.config.values
and raise ConfigError located at the node. ``Node.mapping`` adds the errors of
the keys themselves (unknown, duplicate, missing) to the document's Report
(muxd.config.report) and goes on, so one misspelt key hides nothing else.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import yaml

from muxd.config import values
from muxd.config.report import Report
from muxd.config.values import show
from muxd.errors import ConfigError

T = TypeVar("T")
S = TypeVar("S", bound=str)

# The deepest real config nests five collections: the file, ports, a port, listeners, a listener.
# 20 leaves room for that and stops a hostile file long before the recursive
# composer (about three frames per level) nears Python's recursion limit.
MAX_DEPTH = 20
# Every number muxd accepts fits in 11 digits; 64 characters allows underscores and
# floats in exponent form, and stays far below Python's 4,300-digit int() limit.
MAX_NUMBER_CHARS = 64
# An error message from a grammar, cut to what fits a terminal line or two: the
# key path and line say where, the start of the message says what.
MAX_MESSAGE_CHARS = 200

_constructor = yaml.constructor.SafeConstructor()
_TAG = "tag:yaml.org,2002:"


def join_path(path: str, step: str | int) -> str:
    """`path` extended by a mapping key (str) or a list index (int)."""
    if isinstance(step, int):
        return f"{path}[{step}]"
    if not re.fullmatch(r"[A-Za-z0-9_<>-]{1,64}", step):
        # A key as written may be long, or hold dots, brackets or newlines: quote it,
        # cut short, so the path stays readable and the message one line.
        step = show(step)
    return f"{path}.{step}" if path else step


class _Refused(Exception):
    """YAML that is valid but not plain data, found while composing."""

    def __init__(self, message: str, path: str, mark: object) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = mark.line + 1 if isinstance(mark, yaml.Mark) else None


class _PlainLoader(yaml.SafeLoader):
    """The safe loader's composer, refusing what a muxd config never needs.

    Tags, anchors and aliases are refused here because a node tree no longer says
    whether its tag was written or implied, and an alias can make one small file
    expand into billions of nodes ("billion laughs"). The key path is tracked so
    the refusal reads like every other error.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._paths = [""]

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        # index is the key node for a mapping's value, the position in a list, or
        # None for a mapping's key (which is reported at its mapping's path).
        path = self._paths[-1]
        if isinstance(index, yaml.ScalarNode):
            path = join_path(path, str(index.value))
        elif isinstance(index, yaml.Node):
            path = join_path(path, "<key>")
        elif isinstance(index, int):
            path = join_path(path, index)
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                f"aliases (*{event.anchor}) are not supported: write the value out", path, event.start_mark
            )
        if getattr(event, "anchor", None) is not None:
            raise _Refused(
                f"anchors (&{getattr(event, 'anchor', '')}) are not supported: write each value out",
                path,
                event.start_mark,
            )
        tag = getattr(event, "tag", None)
        if tag is not None:
            shown = "!!" + tag[len(_TAG) :] if tag.startswith(_TAG) else tag
            raise _Refused(
                f"YAML tags such as {show(shown)} are not supported: write a plain value",
                path,
                event.start_mark,
            )
        if isinstance(event, yaml.CollectionStartEvent) and len(self._paths) > MAX_DEPTH:
            raise _Refused(f"nested more than {MAX_DEPTH} levels deep", path, event.start_mark)
        self._paths.append(path)
        try:
            return super().compose_node(parent, index)
        finally:
            self._paths.pop()


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def compose(text: str, file: str) -> yaml.Node | None:
    """The document's node tree, or a ConfigError located as well as YAML allows."""
    try:
        loader = _PlainLoader(text)
        try:
            return loader.get_single_node()
        finally:
            loader.dispose()
    except _Refused as exc:
        raise ConfigError(exc.message, exc.path, exc.line, file) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = _one_line(exc.problem or exc.context or "malformed")
        if exc.context and problem.startswith("but "):
            # "but found another document" reads only after its context.
            problem = f"{_one_line(exc.context)}, {problem}"
        raise ConfigError(f"YAML syntax error: {problem}", "", line, file) from None
    except yaml.reader.ReaderError as exc:
        # Not a MarkedYAMLError: it knows the offset only, and its str() is two lines.
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        char = exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        raise ConfigError(f"unacceptable character #x{char:04x}", "", line, file) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"YAML error: {_one_line(str(exc))}", "", None, file) from None


def read_document(text: str, file: str, report: Report) -> Node:
    """The root node of `text`; a ConfigError if it is not YAML, or empty."""
    node = compose(text, file)
    if node is None:
        raise ConfigError("the file is empty", "", None, file)
    return Node(node, "", file, line=None, lines={}, report=report)


class _NoAliasDumper(yaml.SafeDumper):
    """Writes a repeated list or dict out again: the loader refuses aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def dump(data: dict[str, Any]) -> str:
    """Python data as YAML text that the loader accepts (the one-port command-line form)."""
    return yaml.dump(data, Dumper=_NoAliasDumper)


def _scalar(node: yaml.ScalarNode) -> object:
    """The plain value of a scalar whose tag the resolver implied from its text.

    Raises ValueError (with a message for the operator) for numbers that are too
    long, or that the YAML 1.1 patterns accept but Python cannot read ("0x_").
    """
    tag, text = node.tag, node.value
    if tag == _TAG + "null":
        return None
    if tag == _TAG + "bool":
        return _constructor.bool_values[text.lower()]
    if tag in (_TAG + "int", _TAG + "float"):
        if len(text) > MAX_NUMBER_CHARS:
            raise ValueError(f"number too long ({len(text)} characters)")
        try:
            if tag == _TAG + "int":
                return _constructor.construct_yaml_int(node)
            return _constructor.construct_yaml_float(node)
        except ValueError:
            raise ValueError(f"not a valid number: {show(text)}") from None
    # str, and the implied timestamp, merge ("<<") and value ("=") tags, which a
    # muxd config gives no meaning: their text, as written.
    return text


class Section(dict[str, "Node"]):
    """A mapping's keys as read, and those that failed: written twice, missing
    though required, or with a value in error. A failed key reads as its
    default, and a check across keys skips it (its stand-in would only make a
    second, false error)."""

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    def read(self, key: str, read: Callable[[Node], T], default: T) -> T:
        """read() of the key's node; `default` when the key is absent, or (its
        error added to the report) when read() fails."""
        node = self.get(key)
        if node is None or key in self.failed:
            return default
        try:
            return read(node)
        except ConfigError as exc:
            self.failed.add(key)
            node.report.add(exc)
            return default

    def ok(self, *keys: str) -> bool:
        """Whether none of `keys` had an error."""
        return not self.failed.intersection(keys)


class Node:
    """A YAML node with the key path that led to it, for located errors."""

    def __init__(
        self,
        node: yaml.Node,
        path: str,
        file: str,
        *,
        line: int | None,
        lines: dict[str, int],
        report: Report,
    ) -> None:
        self.node = node
        self.path = path
        self.file = file
        self.line = line if line is not None else node.start_mark.line + 1
        # Shared by every node of one document: key path -> line (Config.lines), and the errors.
        self.lines = lines
        self.report = report

    def error(self, message: str) -> ConfigError:
        return ConfigError(message, self.path, self.line, self.file)

    def add_error(self, message: str) -> None:
        """An error at this node, reported; the reading goes on."""
        self.report.add(self.error(message))

    def child(self, node: yaml.Node, step: str | int, line: int | None = None) -> Node:
        child = Node(
            node, join_path(self.path, step), self.file, line=line, lines=self.lines, report=self.report
        )
        self.lines.setdefault(child.path, child.line)
        return child

    # shapes

    def is_mapping(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    def is_list(self) -> bool:
        return isinstance(self.node, yaml.SequenceNode)

    def is_scalar(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode)

    def written_keys(self) -> list[str]:
        """The keys of a mapping as written (scalars only, unchecked); [] if not a mapping."""
        if not isinstance(self.node, yaml.MappingNode):
            return []
        return [k.value for k, _ in self.node.value if isinstance(k, yaml.ScalarNode)]

    def mapping(self, allowed: set[str], required: tuple[str, ...] = ()) -> Section:
        """The keys of a mapping. A bad key (unknown, duplicate, not a string)
        and a missing required one are added to the report, and the rest read
        on; the caller's stand-in for a missing key is never used, as the item
        holding it is dropped (Report.each). Not a mapping at all: raised."""
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping, got {self.describe()}")
        out = Section()
        for key_node, value_node in self.node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.report.add(self.child(key_node, "<key>").error("keys must be strings"))
                continue
            if key_node.tag == _TAG + "merge":
                self.report.add(
                    self.child(key_node, "<<").error("merge keys (<<) are not supported: write the keys out")
                )
                continue
            try:
                key = self.child(key_node, "<key>").value()
            except ConfigError as exc:  # a number YAML accepts and Python cannot read
                self.report.add(exc)
                continue
            if not isinstance(key, str):
                self.report.add(self.child(key_node, str(key)).error("keys must be strings"))
                continue
            # Located at the key, not at its value (which may start on the next line).
            child = self.child(value_node, key, key_node.start_mark.line + 1)
            if key in out:
                # Which of the two was meant is anyone's guess: neither is read.
                self.report.add(child.error("duplicate key"))
                out.failed.add(key)
            elif key not in allowed:
                hint = ", ".join(sorted(allowed))
                self.report.add(child.error(f"unknown key (expected one of: {hint})"))
            else:
                out[key] = child
        for key in required:
            if key not in out:
                self.report.add(self.error(f"missing required key {key!r}"))
                out.failed.add(key)
        return out

    def sequence(self) -> Iterator[Node]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got {self.describe()}")
        for i, item in enumerate(self.node.value):
            yield self.child(item, i)

    def value(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got {self.describe()}")
        try:
            return _scalar(self.node)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def describe(self) -> str:
        if isinstance(self.node, yaml.MappingNode):
            return "a mapping"
        if isinstance(self.node, yaml.SequenceNode):
            return "a list"
        return show(self.value())

    # typed accessors: the grammars of muxd.config.values, located

    def parsed(self, parse: Callable[[Any], T]) -> T:
        """parse() of the value; its ValueError becomes a ConfigError here."""
        v = self.value()
        try:
            return parse(v)
        except ValueError as exc:
            message = _one_line(str(exc))
            if len(message) > MAX_MESSAGE_CHARS:
                # A grammar of another module (a step, a network) may quote a long value whole.
                message = message[: MAX_MESSAGE_CHARS - 3] + "..."
            raise self.error(message) from None

    def text(self, what: str = "a string") -> str:
        v = self.value()
        if not isinstance(v, str) or not v:
            raise self.error(f"expected a non-empty string, got {show(v)}")
        try:
            return values.no_nul(v, what)
        except ValueError as exc:
            raise self.error(str(exc)) from None

    def file_path(self, absolute: bool) -> str:
        v = self.text("a path")
        if absolute and not v.startswith("/"):
            raise self.error(f"must be an absolute path, got {show(v)}")
        return v

    def integer(self, lo: int, hi: int) -> int:
        v = self.value()
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(f"expected an integer, got {show(v)}")
        if not lo <= v <= hi:
            raise self.error(f"must be {lo}..{hi}, got {v}")
        return v

    def flag(self) -> bool:
        v = self.value()
        if not isinstance(v, bool):
            raise self.error(f"expected true or false, got {show(v)}")
        return v

    def choice(self, options: tuple[S, ...]) -> S:
        """One of `options`, typed as their (Literal) type."""
        v = self.value()
        for option in options:
            if isinstance(v, str) and v == option:
                return option
        raise self.error(f"must be one of {', '.join(options)}; got {show(v)}")

    def size(self, lo: int, hi: int) -> int:
        v = self.value()
        n = values.parse_size(v)
        if n is None:
            raise self.error(f"expected a size such as 4096, 64KiB or 1MiB, got {show(v)}")
        if not lo <= n <= hi:
            raise self.error(f"must be between {lo} and {hi} bytes, got {show(n)}")
        return n

    def duration(self, lo: float, hi: float, off: bool = True) -> float:
        """A duration in seconds; 0 means off where `off` allows it."""
        v = self.value()
        s = values.parse_duration(v)
        if s is None:
            raise self.error(f"expected a duration such as 500ms, 5s or 1m, got {show(v)}")
        if (s != 0 or not off) and not lo <= s <= hi:
            zero = "0 (off) or " if off else ""
            raise self.error(f"must be {zero}between {lo:g} and {hi:g} seconds, got {s:g}")
        return s

    def hostport(self) -> tuple[str, int]:
        return self.parsed(values.parse_hostport)

    def peer_address(self) -> tuple[str, int]:
        return self.parsed(values.parse_peer_address)

    def file_mode(self) -> int:
        return self.parsed(values.parse_file_mode)

    def group(self) -> str | int:
        return self.parsed(values.parse_group)
