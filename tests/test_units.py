"""The systemd units: systemd's own verifier and security scorer, and that they
agree with the command line, the example config and each other."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from muxd import config as configmod
from muxd.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
UNITS = REPO / "systemd"
UNIT_NAMES = ("muxd.service", "muxd@.service", "muxd.socket")
MAX_EXPOSURE = 2.5  # systemd-analyze security: 0 is a locked box, 10 is unconfined

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, in order (units may repeat keys)."""
    out = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key.strip(), value.strip()))
    return out


def values(path: Path, key: str) -> list[str]:
    return [v for _, k, v in directives(path) if k == key]


@pytest.fixture
def unit_dir(tmp_path: Path) -> Path:
    """The units with ExecStart= pointing at a real executable, and our man pages on MANPATH.

    verify checks that ExecStart's binary exists and that every Documentation=man:
    page can be found, so both are provided for real.
    """
    fake = tmp_path / "bin" / "muxd"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    units = tmp_path / "units"
    units.mkdir()
    for name in UNIT_NAMES:
        text = (UNITS / name).read_text()
        (units / name).write_text(text.replace("/usr/bin/muxd", str(fake)))
    for page in (REPO / "docs" / "man").iterdir():
        section_dir = tmp_path / "man" / f"man{page.suffix[1:]}"
        section_dir.mkdir(parents=True, exist_ok=True)
        shutil.copy(page, section_dir)
    return units


@needs_analyze
def test_systemd_analyze_verify(unit_dir: Path) -> None:
    env = {**os.environ, "MANPATH": str(unit_dir.parent / "man")}
    paths = [str(unit_dir / name) for name in UNIT_NAMES]
    proc = subprocess.run(
        ["systemd-analyze", "verify", *paths],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (proc.returncode, proc.stdout + proc.stderr) == (0, "")


def exposure(unit: Path) -> float:
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("this systemd-analyze has no --offline (systemd < 250)")
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, proc.stdout + proc.stderr
    return float(match.group(1))


@needs_analyze
@pytest.mark.parametrize("name", ["muxd.service", "muxd@.service"])
def test_security_exposure(unit_dir: Path, name: str) -> None:
    assert exposure(unit_dir / name) <= MAX_EXPOSURE


def test_instances_share_the_service_sandbox() -> None:
    """muxd@.service repeats muxd.service (units cannot include); only these may differ."""
    per_instance = {"Description", "ExecStart", "RuntimeDirectory"}
    main = [d for d in directives(UNITS / "muxd.service") if d[1] not in per_instance]
    template = [d for d in directives(UNITS / "muxd@.service") if d[1] not in per_instance]
    assert main == template
    assert values(UNITS / "muxd@.service", "ExecStart") == ["/usr/bin/muxd run -c /etc/muxd/%i.yaml"]
    assert values(UNITS / "muxd@.service", "RuntimeDirectory") == ["muxd/%i"]


@pytest.mark.parametrize("name", ["muxd.service", "muxd@.service"])
def test_exec_lines_are_real_command_lines(name: str) -> None:
    (start,) = values(UNITS / name, "ExecStart")
    argv = shlex.split(start)
    assert argv[0] == "/usr/bin/muxd"
    args = build_parser().parse_args(argv[1:])
    assert (args.command, args.config) == ("run", argv[-1])
    assert values(UNITS / name, "ExecReload") == ["/bin/kill -HUP $MAINPID"]
    # exit status 2 is a bad config; restarting cannot fix it
    assert values(UNITS / name, "RestartPreventExitStatus") == ["2"]


def activation_targets(cfg: configmod.Config) -> dict[str, str]:
    """What a passed socket may be named (a listener with a socket of its own, or
    an http server) and the address each listens on."""
    out = {lst.name: lst.address for port in cfg.ports for lst in port.listeners if lst.kind != "websocket"}
    out.update({srv.name: configmod.format_hostport(srv.host, srv.port) for srv in cfg.http})
    return out


def test_socket_units_name_listeners_of_the_shipped_config() -> None:
    """Every socket the shipped .socket units pass is named for a listener (or http
    server) of the shipped /etc/muxd/muxd.yaml with the same address: otherwise the
    packaged muxd.socket starts a muxd that refuses its socket (or, before that was
    checked first, bound the address itself and failed with "address in use")."""
    targets = activation_targets(configmod.load(str(REPO / "config" / "muxd.yaml")))
    sockets = sorted(UNITS.glob("*.socket"))
    assert sockets
    for unit in sockets:
        # One FileDescriptorName= names every fd of the unit; without it, the unit's name.
        names = values(unit, "FileDescriptorName") or [unit.stem]
        assert len(names) == 1, unit
        listens = values(unit, "ListenStream")
        assert listens, unit
        for listen in listens:
            assert names[0] in targets, f"{unit.name}: {names[0]} names no listener of config/muxd.yaml"
            assert targets[names[0]] == listen, f"{unit.name}: {names[0]} listens on {targets[names[0]]}"
