"""A reader of ser2net.yaml(5), version 1, as ser2net really reads it.

The file looks like YAML but is not a plain YAML mapping:

- ``connection: &NAME`` repeats at the top level, once per connection; a YAML
  mapping keeps only the last of duplicate keys, so the file is *composed*
  (PyYAML's composer gives nodes, and a MappingNode keeps every key/value pair
  in order, duplicates included) and never constructed.
- The anchor of a connection is its name. The composer forgets anchors once
  it has resolved aliases, so ``_Composer`` records each node's anchor on the
  node itself.
- ``define: &name text`` makes a macro: ``*name`` (a YAML alias) stands for
  the whole text, and ser2net substitutes ``*(name)`` inside any string
  (``*(*`` is a literal ``*(``). Defines may use earlier defines; they are
  substituted in file order, as ser2net reads them.
- ``default:`` entries (name, value, optional class) set defaults for what
  follows them in the file.

Everything is read as text from scalar nodes (``node.value``): ``on``/``off``
and ``true``/``false`` are ser2net's words, not YAML 1.1 booleans, and a
banner's backslashes are ser2net's escapes, not YAML's. Every item keeps its
line, so a problem is reported as ``FILE:LINE: ...``.

Nothing here opens a socket or a device: ``read(text, source)`` takes the
file's text and returns a ``Ser2netFile``; problems the reader alone can see
(a YAML error, an unknown top-level key, a connection without an anchor)
are in its ``problems``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.events import AliasEvent
from yaml.nodes import MappingNode, Node, ScalarNode

# Top-level keys ser2net knows that muxd cannot serve; each is one error.
UNSUPPORTED_TOP = {
    "rotator": "a rotator (one accepter cycling over connections) has no muxd equivalent",
    "admin": "ser2net's admin interface has no muxd equivalent (muxd has an HTTP API: muxd(8))",
    "led": "LEDs flashing on traffic have no muxd equivalent",
    "include": "include: is not read by the converter; merge the files into one first",
    "delete_default": "delete_default: is not supported by the converter",
}
CONNECTION_KEYS = {"accepter", "connector", "enable", "timeout"}
_SUBST_RE = re.compile(r"\*\(([^)]*)\)")


@dataclass(frozen=True)
class Item:
    """One key of a connection or of its options, as text, with its line."""

    key: str
    value: str
    line: int


@dataclass
class Connection:
    name: str
    line: int
    items: dict[str, Item] = field(default_factory=dict)  # accepter, connector, enable, timeout...
    options: list[Item] = field(default_factory=list)  # in file order; a key may repeat (remaddr)


@dataclass(frozen=True)
class Default:
    name: str
    value: str
    cls: str  # "" for the base default of every class
    line: int


@dataclass(frozen=True)
class Problem:
    line: int
    message: str


@dataclass
class Ser2netFile:
    source: str
    connections: list[Connection] = field(default_factory=list)
    # Each connection sees the defaults written before it: (index of the first
    # connection after the default, the default), in file order.
    defaults: list[tuple[int, Default]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    def defaults_for(self, index: int) -> list[Default]:
        """The defaults in force for the connection at index (later ones win)."""
        return [d for before, d in self.defaults if before <= index]


class _Composer(yaml.SafeLoader):
    """PyYAML's SafeLoader pipeline, with each node's anchor recorded on it."""

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event: yaml.Event = self.peek_event()  # type: ignore[no-untyped-call]
        anchor = None if isinstance(event, AliasEvent) else getattr(event, "anchor", None)
        node = super().compose_node(parent, index)
        if anchor is not None and node is not None:
            node.ser2net_anchor = anchor  # type: ignore[attr-defined]
        return node


def line_of(node: Node) -> int:
    return int(node.start_mark.line) + 1


def substitute(text: str, defines: dict[str, str], line: int, problems: list[Problem]) -> str:
    """ser2net's ``*(name)`` in a string: the define's text; ``*(*`` is ``*(``."""

    def one(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in defines:
            problems.append(Problem(line, f"*({name}): no define: &{name} before this line"))
            return match.group(0)
        return defines[name]

    # "*(*" first, so that the "*(" it stands for never starts a name.
    out = text.replace("*(*", "\x00")
    out = _SUBST_RE.sub(one, out)
    if "*{" in out.replace("*{*", ""):
        problems.append(
            Problem(line, "*{FILE} (a string read from a file) is not supported; write it inline")
        )
    return out.replace("\x00", "*(").replace("*{*", "*{")


def _scalar(node: Node, what: str, problems: list[Problem]) -> str | None:
    if isinstance(node, ScalarNode):
        return str(node.value)
    problems.append(Problem(line_of(node), f"{what}: expected a string, got a {type(node).__name__}"))
    return None


def _option(key: str, node: Node, line: int, defines: dict[str, str], problems: list[Problem]) -> Item:
    """An option as text; a mapping or list (an LED's alias) as ``<mapping>``:
    no option muxd takes has one, and the converter says what it is."""
    if not isinstance(node, ScalarNode):
        return Item(key, f"<{type(node).__name__}>", line)
    return Item(key, _text(node, defines, line, problems), line)


def _text(node: ScalarNode, defines: dict[str, str], line: int, problems: list[Problem]) -> str:
    """A scalar's text after ``*(name)`` substitution (done once: a define's alias is already)."""
    done: str | None = getattr(node, "ser2net_text", None)
    return done if done is not None else substitute(str(node.value), defines, line, problems)


def _connection(
    key: ScalarNode, node: Node, defines: dict[str, str], problems: list[Problem]
) -> Connection | None:
    line = line_of(key)
    name = getattr(node, "ser2net_anchor", None)
    if name is None:
        problems.append(Problem(line, "connection: needs a name, written as an anchor: connection: &NAME"))
        return None
    if not isinstance(node, MappingNode):
        problems.append(Problem(line, f"connection &{name}: expected a mapping"))
        return None
    conn = Connection(name, line)
    for k, v in node.value:
        kname = _scalar(k, "a key", problems)
        if kname is None:
            continue
        if kname == "options":
            if isinstance(v, ScalarNode) and v.value in ("", None):
                continue  # "options:" with nothing under it (labgrid's -Y lines may end so)
            if not isinstance(v, MappingNode):
                problems.append(Problem(line_of(v), f"connection &{name}: options: expected a mapping"))
                continue
            for ok, ov in v.value:
                oname = _scalar(ok, "an option name", problems)
                if oname is not None:
                    conn.options.append(_option(oname, ov, line_of(ok), defines, problems))
            continue
        if kname not in CONNECTION_KEYS:  # ser2net takes options at this level too (its own example does)
            conn.options.append(_option(kname, v, line_of(k), defines, problems))
            continue
        if _scalar(v, f"connection &{name}: {kname}", problems) is None:
            continue
        if kname in conn.items:
            problems.append(Problem(line_of(k), f"connection &{name}: {kname} given twice"))
        kline = line_of(k)
        conn.items[kname] = Item(kname, _text(v, defines, kline, problems), kline)
    return conn


def _default(node: Node, problems: list[Problem]) -> Default | None:
    line = line_of(node)
    if not isinstance(node, MappingNode):
        problems.append(Problem(line, "default: expected a mapping with name, value, class"))
        return None
    fields: dict[str, str] = {}
    for k, v in node.value:
        kname = _scalar(k, "a key", problems)
        text = _scalar(v, f"default: {kname}", problems) if kname else None
        if kname is not None and text is not None:
            fields[kname] = text
    if "name" not in fields:
        problems.append(Problem(line, "default: needs a name"))
        return None
    return Default(fields["name"], fields.get("value", ""), fields.get("class", ""), line)


def read(text: str, source: str = "<ser2net.yaml>") -> Ser2netFile:
    """The connections, defaults and problems of a ser2net.yaml text."""
    result = Ser2netFile(source)
    problems = result.problems
    loader = _Composer(text)
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        problems.append(Problem(line, f"not readable as YAML: {exc.problem or exc.context}"))
        return result
    except yaml.YAMLError as exc:
        problems.append(Problem(1, f"not readable as YAML: {exc}"))
        return result
    finally:
        loader.dispose()
    if root is None:
        problems.append(Problem(1, "empty file: no connection"))
        return result
    if not isinstance(root, MappingNode):
        problems.append(Problem(line_of(root), "expected top-level keys (connection:, define:, ...)"))
        return result
    defines: dict[str, str] = {}
    for key, node in root.value:
        kname = _scalar(key, "a top-level key", problems)
        line = line_of(key)
        if kname is None:
            continue
        if kname == "define":
            anchor = getattr(node, "ser2net_anchor", None)
            value = _scalar(node, "define", problems)
            if anchor is None:
                problems.append(Problem(line, "define: needs a name, written as an anchor: define: &NAME"))
            elif value is not None:
                value = substitute(value, defines, line, problems)
                defines[anchor] = value
                # A later *NAME alias is this very node: it reads the text as
                # substituted here, and is not substituted twice (*(* stays *().
                node.ser2net_text = value
        elif kname == "connection":
            conn = _connection(key, node, defines, problems)
            if conn is not None:
                result.connections.append(conn)
        elif kname == "default":
            default = _default(node, problems)
            if default is not None:
                result.defaults.append((len(result.connections), default))
        elif kname in UNSUPPORTED_TOP:
            problems.append(Problem(line, f"{kname}: {UNSUPPORTED_TOP[kname]}"))
        else:
            problems.append(Problem(line, f"{kname}: not a ser2net.yaml top-level key"))
    _check_names(result)
    return result


def _check_names(result: Ser2netFile) -> None:
    seen: dict[str, int] = {}
    for conn in result.connections:
        if conn.name in seen:
            result.problems.append(
                Problem(conn.line, f"connection &{conn.name}: name already used on line {seen[conn.name]}")
            )
        seen.setdefault(conn.name, conn.line)


def split_top(text: str) -> list[str]:
    """Split a gensio string on the commas outside parentheses, each part
    stripped: ``telnet(rfc2217,mode=server),tcp,2000`` is three parts. A value
    that YAML folded over several lines has spaces around its commas."""
    parts: list[str] = []
    depth = 0
    current: list[str] = []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth = max(0, depth - 1)
        if ch == "," and depth == 0:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    parts.append("".join(current).strip())
    return parts


def name_and_args(part: str) -> tuple[str, list[str]]:
    """``telnet(rfc2217,mode=server)`` -> ("telnet", ["rfc2217", "mode=server"])."""
    m = re.fullmatch(r"\s*([^()\s]*)\s*(?:\((.*)\))?\s*", part, re.DOTALL)
    if m is None:
        return part.strip(), []
    args = [a.strip() for a in m.group(2).split(",")] if m.group(2) else []
    return m.group(1), [a for a in args if a]
