"""Fuzzing the config loader (issue 15, "keep the attack in the suite").

Theory of operation: every mutant starts from a config that muxd ships and that
loads today (``config/*.yaml``, ``muxd/demo.yaml``), so most mutants get deep
into the schema instead of failing at the first line. Mutations come in two
layers:

- on the data (the file loaded as Python objects, changed, dumped again): keys
  deleted, duplicated into their neighbours, renamed to other schema keys or to
  unknown ones; values retyped (scalar, list, mapping), replaced by huge,
  negative, zero, NaN/inf, date-like, port-like or otherwise odd values, or
  wrapped in deep nesting;
- on the text: YAML tags (``!!int``, ``!vault``...), anchors and aliases, merge
  keys, thousands of brackets, lines duplicated, dropped or swapped, and random
  bytes (decoded as Latin-1, so control characters and NUL get through).

The only property: ``loads()`` returns a Config or raises ConfigError, and
each error it holds (every error of the file, in line order) is one line. Any
other exception is a loader crash, which the CLI would turn into exit status 1
and a traceback instead of 2.

Size: ``MUXD_FUZZ_EXAMPLES`` examples per test, 300 by default so CI takes
seconds; ``make fuzz`` may set 10^6. ``deadline=None`` because a shared CI core
makes single examples slow now and then, which is not a failure.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muxd.config import Config, each_error, loads, schema_keys
from muxd.errors import ConfigError
from tests.conftest import ROOT

EXAMPLES = int(os.environ.get("MUXD_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    # Mutants are whole files: hypothesis may find them slow or large on a busy core.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

SOURCES: list[Path] = [*sorted((ROOT / "config").glob("*.yaml")), ROOT / "muxd" / "demo.yaml"]
TEXTS = [p.read_text() for p in SOURCES]
DATA = [yaml.safe_load(t) for t in TEXTS]
KEYS = sorted(schema_keys())

# Values chosen to hit each check's edges and each conversion's failure modes.
ODD_SCALARS: list[Any] = [
    0,
    -1,
    1,
    65535,
    65536,
    2**31,
    2**64,
    10**400,
    float("inf"),
    float("-inf"),
    float("nan"),
    1e-9,
    -0.0,
    True,
    False,
    None,
    "",
    " ",
    "0",
    "0s",
    "0ms",
    "-1s",
    "1e400",
    "1" + "0" * 400 + "s",
    "1" + "0" * 5000,
    "0x_",
    "0b",
    "._",
    "1:2:3",
    "2024-01-01",
    "2024-01-01T00:00:00Z",
    "=",
    "<<",
    "~",
    "yes",
    "off",
    "0660",
    "0o777",
    "7" * 5000,
    "1TiB",
    "99999999999999999999999GiB",
    "0.0.0.0:0",
    "[::1]:0",
    "127.0.0.1:99999",
    "[::1",
    "::1:7000",
    "host.example:80",
    ":0",
    "²",
    "٣s",
    "a" * 10_000,
    "line\nbreak",
    "\x00",
    "\ud800",
    "*.example",
    "-bad-",
]
# Values aimed at one kind of key, so a mutant gets past the type check into the
# range checks and conversions behind it.
DURATIONS: list[Any] = [
    0,
    "0s",
    "30s",
    "2h",
    "1e400",
    10**400,
    "1" + "0" * 400 + "s",
    -1,
    float("nan"),
    "5 ms",
]
SIZES: list[Any] = [0, 1, "0KiB", "1GiB", "2GiB", "4096 B", "1 M", 10**400, "1" + "0" * 400 + "B", -4096]
ADDRESSES: list[Any] = [0, ":0", "0.0.0.0:0", "[::]:0", "127.0.0.1:65536", "[::1]", "k2.lab:8899", 10**400]
KEYED: dict[str, list[Any]] = {
    key: values
    for keys, values in [
        (["backoff_min", "backoff_max", "connect_timeout", "keepalive_idle"], DURATIONS),
        (["keepalive_interval", "idle_timeout", "status_interval"], DURATIONS),
        (["buffer", "history", "write_queue", "max_line"], SIZES),
        (["tcp", "rfc2217", "listen"], ADDRESSES),
        (["socket_mode", "link_mode"], ["0777", "0o1000", 511, 512, "7" * 5000, "0x1ff"]),
        (["group", "token", "name", "serial"], ["", None, -1, 2**32, "x" * 200, "a\x00b", "-"]),
        (["server_names", "origins"], [[], ["*"], ["a" * 300], [None], "x", ["1.2.3.4:80"]]),
    ]
    for key in keys
}
odd_scalar = st.one_of(
    st.sampled_from(ODD_SCALARS),
    st.integers(),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from(KEYS),
)

TEXT_SNIPPETS = [
    "!!int ",
    "!!float ",
    "!!bool ",
    "!!timestamp ",
    "!!binary ",
    "!!str ",
    "!!python/object:os.system ",
    "!vault ",
    "! ",
    "&a ",
    "*a",
    "&a [1, 2]",
    "<<: {name: x}",
    "<<: *a",
    "? [a, b]",
    "? {a: b}",
    "%TAG !e! tag:example.com,2000:\n---\n",
    "---\n",
    "...\n",
    "\t",
    "'",
    '"',
    "{",
    "}",
    "- ",
    ": ",
    "#",
    "\x00",
    "\ufeff",
]


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key or index) in a tree: each value is equally likely to
    be picked, so the many scalars are hit more often than the few containers."""
    if isinstance(node, dict | list):
        for slot in list(node) if isinstance(node, dict) else range(len(node)):
            out.append((node, slot))
            _slots(node[slot], out)
    return out


def _nest(value: Any, depth: int, as_list: bool) -> Any:
    for _ in range(depth):
        value = [value] if as_list else {"k": value}
    return value


@st.composite
def data_mutant(draw: st.DrawFn) -> str:
    """One of the shipped configs, changed as data and dumped as YAML."""
    tree = copy.deepcopy(draw(st.sampled_from(DATA)))
    for _ in range(draw(st.integers(1, 4))):
        slots = _slots(tree, [])
        if not slots:
            break
        target, slot = draw(st.sampled_from(slots))
        # "odd" twice: a changed value reaches the most checks.
        op = draw(
            st.sampled_from(
                ["odd", "delete", "odd", "duplicate", "alias", "rename", "retype", "nest", "add"]
            ),
        )
        if op == "delete":
            del target[slot]
        elif op == "duplicate":
            if isinstance(target, list):
                target.append(copy.deepcopy(target[slot]))
            else:
                target[draw(st.sampled_from(KEYS))] = copy.deepcopy(target[slot])
        elif op == "alias" and isinstance(target, list):
            target.append(target[slot])  # the same object twice: the dumper writes &id001 / *id001
        elif op == "rename" and isinstance(target, dict):
            target[draw(st.one_of(st.sampled_from(KEYS), st.text(max_size=10)))] = target.pop(slot)
        elif op == "odd":
            keyed = KEYED.get(slot) if isinstance(slot, str) else None
            value = draw(st.sampled_from(keyed) if keyed and draw(st.booleans()) else odd_scalar)
            target[slot] = copy.deepcopy(value)  # later mutations must not reach KEYED's lists
        elif op == "retype":
            value = target[slot]
            target[slot] = draw(st.sampled_from([[value], {"x": value}, [], {}, str(value), None]))
        elif op == "nest":
            # Past the loader's bound (20), within what the dumper's recursion can
            # write; the text mutations build the thousands of levels.
            depth = draw(st.integers(1, 60))
            target[slot] = _nest(target[slot], depth, draw(st.booleans()))
        elif isinstance(target, dict):
            key = draw(st.sampled_from(KEYS))
            target[key] = copy.deepcopy(draw(st.sampled_from(KEYED[key]) if key in KEYED else odd_scalar))
    return yaml.safe_dump(tree, sort_keys=False, allow_unicode=draw(st.booleans()))


@st.composite
def text_mutant(draw: st.DrawFn, base: st.SearchStrategy[str]) -> str:
    """A config text with YAML-level damage: tags, aliases, nesting, bytes, lines."""
    text = draw(base)
    for _ in range(draw(st.integers(1, 3))):
        lines = text.split("\n")
        i = draw(st.integers(0, max(len(lines) - 1, 0)))
        op = draw(st.sampled_from(["snippet", "after_colon", "brackets", "bytes", "dup", "drop", "swap"]))
        if op == "snippet":
            pos = draw(st.integers(0, len(text)))
            text = text[:pos] + draw(st.sampled_from(TEXT_SNIPPETS)) + text[pos:]
            continue
        if op == "after_colon" and ": " in lines[i]:
            key, _, value = lines[i].partition(": ")
            lines[i] = f"{key}: {draw(st.sampled_from(TEXT_SNIPPETS))}{value}"
        elif op == "brackets":
            n = draw(st.one_of(st.integers(1, 50), st.sampled_from([999, 5000])))
            opener, closer = draw(st.sampled_from([("[", "]"), ("{", "}"), ("[{a: ", "}]")]))
            lines[i] = lines[i] + opener * n + closer * draw(st.sampled_from([n, 0, n // 2]))
        elif op == "bytes":
            noise = draw(st.binary(max_size=40)).decode("latin-1")
            pos = draw(st.integers(0, len(lines[i])))
            lines[i] = lines[i][:pos] + noise + lines[i][pos:]
        elif op == "dup":
            lines.insert(i, lines[i])
        elif op == "drop":
            del lines[i]
        elif op == "swap" and len(lines) > 1:
            j = draw(st.integers(0, len(lines) - 1))
            lines[i], lines[j] = lines[j], lines[i]
        text = "\n".join(lines)
    return text


def check(text: str) -> None:
    """The property: a Config, or ConfigErrors in line order, each one line, the
    first of them the error's own text; anything else propagates."""
    try:
        cfg = loads(text, "fuzz.yaml")
    except ConfigError as exc:
        errors = each_error(exc)
        assert errors and str(errors[0]) == str(exc)
        lines = [e.line for e in errors]
        assert lines == sorted(lines, key=lambda n: (n is None, n or 0)), lines
        for error in errors:
            message = str(error)
            assert message.startswith("fuzz.yaml")
            assert "\n" not in message and len(message) < 2000, message
    else:
        assert isinstance(cfg, Config)


@FUZZ
@given(data_mutant())
def test_data_mutants_load_or_raise_config_error(text: str) -> None:
    check(text)


@FUZZ
@given(text_mutant(st.one_of(st.sampled_from(TEXTS), data_mutant())))
def test_text_mutants_load_or_raise_config_error(text: str) -> None:
    check(text)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_load_or_raise_config_error(raw: bytes) -> None:
    check(raw.decode("latin-1"))
    check(raw.decode("utf-8", errors="replace"))


def test_the_sources_are_the_shipped_configs() -> None:
    # The mutants mean something only if their sources load unchanged.
    assert len(SOURCES) >= 3
    for path, text in zip(SOURCES, TEXTS, strict=True):
        assert isinstance(loads(text, str(path)), Config)
