"""The man pages document every command-line option and config key, with the
defaults the code really uses, render without groff warnings, and their
examples are valid."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MAN = REPO / "docs" / "man"
MUXD_8 = MAN / "muxd.8"
MUXD_YAML_5 = MAN / "muxd.yaml.5"

try:
    from muxd import config as configmod
    from muxd.cli import build_parser
    from muxd.config import LISTENER_KINDS, schema_keys
except ImportError as exc:  # the CLI and config are written in parallel with these pages
    pytest.skip(
        f"muxd.cli.build_parser / muxd.config.schema_keys not importable yet: {exc}", allow_module_level=True
    )


def plain(line: str) -> str:
    """A man source line as the reader sees it, roughly: no macros, fonts or escapes."""
    line = re.sub(r"^\.(B|I|BR|RB|BI|IB|IR|RI)\s+", "", line)
    line = re.sub(r"\\f[BIRP]", "", line)
    return line.replace("\\-", "-").replace("\\~", " ").replace("\\(mu", "x").replace('"', "")


def entries(page: Path) -> Iterator[tuple[set[str], str]]:
    """(heading words, body text) of every .TP entry; .TQ adds headings to the same body."""
    heads: set[str] = set()
    body: list[str] = []
    expect_head = False
    for line in [*page.read_text().splitlines(), ".SH END"]:
        if line.startswith((".TP", ".TQ")):
            if line.startswith(".TP") and heads:
                yield heads, " ".join(body)
                heads, body = set(), []
            expect_head = True
        elif expect_head:
            heads |= set(re.split(r"[\s,|]+", plain(line))) - {""}
            expect_head = False
        elif line.startswith((".SH", ".SS")):
            if heads:
                yield heads, " ".join(body)
            heads, body = set(), []
        elif heads:
            body.append(plain(line))


def parser_actions(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.Action]]:
    """(command, action) for every option of muxd and of its subcommands."""
    stack = [("", parser)]
    while stack:
        command, p = stack.pop()
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                stack += [(name, sub) for name, sub in action.choices.items()]
            elif action.option_strings:
                yield command, action


def subcommands() -> list[str]:
    for action in build_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    raise AssertionError("muxd has no subcommands")


def test_every_config_key_has_an_entry_with_its_default() -> None:
    documented: dict[str, list[str]] = {}
    for heads, body in entries(MUXD_YAML_5):
        for word in heads:
            documented.setdefault(word, []).append(body)
    missing = sorted(schema_keys() - documented.keys())
    assert not missing, f"keys without an entry in muxd.yaml(5): {missing}"
    # A listener kind is its own address; every other key says its default or that it is required.
    undefaulted = sorted(
        key
        for key in schema_keys() - set(LISTENER_KINDS)
        if not any(re.search(r"\b(Default|Defaults|defaults|Required)\b", b) for b in documented[key])
    )
    assert not undefaulted, f"entries that give no default: {undefaulted}"


def test_every_option_has_an_entry_with_its_default() -> None:
    documented: dict[str, str] = {}
    for heads, body in entries(MUXD_8):
        for word in heads:
            documented[word] = documented.get(word, "") + " " + body
    synopsis = plain(MUXD_8.read_text())
    for command, action in parser_actions(build_parser()):
        for option in action.option_strings:
            assert option in documented, f"muxd {command} {option}: no entry in muxd(8)"
            assert option in synopsis
        default = action.default
        if default not in (None, False, [], argparse.SUPPRESS):
            body = documented[action.option_strings[-1]]
            assert f"Default: {default}" in body, (
                f"muxd(8) {action.option_strings[-1]}: says no 'Default: {default}'"
            )
    commands = {word for heads, _ in entries(MUXD_8) for word in heads}
    assert set(subcommands()) <= commands


@pytest.mark.skipif(shutil.which("groff") is None, reason="needs groff")
@pytest.mark.parametrize("page", [MUXD_8, MUXD_YAML_5], ids=lambda p: p.name)
def test_pages_render_without_warnings(page: Path) -> None:
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(page)], capture_output=True, text=True, timeout=30, check=False
    )
    assert (proc.returncode, proc.stderr) == (0, "")


def examples(man_source: str) -> list[str]:
    """The .EX/.EE blocks of man source, unescaped."""
    blocks = re.findall(r"^\.EX\n(.*?)^\.EE$", man_source, flags=re.S | re.M)
    return [b.replace("\\-", "-").replace("\\e", "\\") for b in blocks]


def test_config_examples_are_valid() -> None:
    section = MUXD_YAML_5.read_text().split(".SH EXAMPLE\n", 1)[1]
    cfg = configmod.loads(examples(section)[0], "muxd.yaml(5) EXAMPLE")
    assert [p.name for p in cfg.ports] == ["dut1", "dut2"]
    shipped = configmod.load(str(REPO / "config" / "muxd.example.yaml"))
    assert len(shipped.ports) >= 2


def test_command_examples_parse() -> None:
    parser = build_parser()
    commands = [
        line.split("&&")[0].strip()
        for block in examples(MUXD_8.read_text())
        for line in [block.replace("\\\n", " ")]
        if line.startswith("muxd ")
    ]
    assert len(commands) >= 3
    for command in commands:
        parser.parse_args(command.split()[1:])
