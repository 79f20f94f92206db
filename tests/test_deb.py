"""The Debian package, built for real by packaging/build-deb.sh, and checked with
dpkg-deb and (when installed) lintian."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

import muxd
from tests.deb_package import REPO, built_deb, control_fields, relations

# procps for /bin/kill, which the units' ExecReload= runs.
DEPENDS = (
    "python3-serial",
    "python3-yaml",
    "python3-prometheus-client",
    "python3-h11",
    "python3-wsproto",
    "procps",
)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_deb(tmp_path_factory)


def dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, timeout=60, check=True).stdout


def test_contents(deb: Path) -> None:
    paths = {line.split()[-1].removeprefix(".") for line in dpkg_deb("-c", str(deb)).splitlines()}
    assert "/usr/bin/muxd" in paths
    assert "/etc/muxd/muxd.yaml" in paths
    assert {"/usr/share/man/man8/muxd.8.gz", "/usr/share/man/man5/muxd.yaml.5.gz"} <= paths
    for unit in ("muxd.service", "muxd@.service", "muxd.socket"):
        assert {f"/lib/systemd/system/{unit}", f"/usr/lib/systemd/system/{unit}"} & paths, unit
    assert "/usr/share/doc/muxd/examples/99-muxd.rules" in paths
    assert "/usr/share/doc/muxd/examples/muxd.example.yaml" in paths


def test_web_console_ships_beside_web_py(deb: Path) -> None:
    """muxd.web reads the console by a path beside web.py (not importlib.resources):
    every file of muxd/web has its place there in the package, as has the
    WebSocket module imported at the first upgrade."""
    from muxd.web import web_files

    paths = {line.split()[-1].removeprefix(".") for line in dpkg_deb("-c", str(deb)).splitlines()}
    [web_py] = [p for p in paths if p.endswith("/muxd/web.py")]
    package = web_py.removesuffix("/web.py")
    console = sorted(web_files())
    assert "index.html" in console
    assert [rel for rel in console if f"{package}/web/{rel}" not in paths] == []
    assert f"{package}/listeners/wsclient.py" in paths


def test_control(deb: Path) -> None:
    fields = control_fields(deb)
    assert fields["Package"] == "muxd"
    assert fields["Version"] == muxd.__version__
    assert fields["Architecture"] == "all"
    depends = set(relations(fields["Depends"]))
    assert set(DEPENDS) | {"adduser"} <= depends
    assert fields["Recommends"] == "python3-systemd"
    assert dpkg_deb("-I", str(deb), "conffiles").split() == ["/etc/muxd/muxd.yaml"]


def test_paho_is_suggested_never_depended_on(deb: Path) -> None:
    """Debian 12's python3-paho-mqtt is 1.6.1, which the MQTT bridge refuses: a
    Depends (as ${python3:Depends} made of a hard dependency in pyproject.toml)
    would install it for nothing. Only a config with mqtt: needs paho >= 2.1,
    and muxd says so, naming the fix, when it is missing or too old."""
    fields = control_fields(deb)
    for field in ("Depends", "Pre-Depends", "Recommends"):
        assert not [p for p in relations(fields.get(field, "")) if "paho" in p], fields[field]
    assert fields["Suggests"] == "python3-paho-mqtt (>= 2.1)"


def test_shipped_config_is_the_safe_default(deb: Path) -> None:
    tar = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, timeout=60, check=True
    )
    shipped = subprocess.run(
        ["tar", "-xO", "./etc/muxd/muxd.yaml"], input=tar.stdout, capture_output=True, timeout=60, check=True
    )
    assert shipped.stdout == (REPO / "config" / "muxd.yaml").read_bytes()
    modes = {line.split()[-1]: line.split()[0] for line in dpkg_deb("-c", str(deb)).splitlines()}
    assert modes["./etc/muxd/muxd.yaml"] == "-rw-r-----"


def test_maintainer_scripts(deb: Path) -> None:
    postinst = dpkg_deb("-I", str(deb), "postinst")
    assert "adduser --system" in postinst and "muxd dialout" in postinst
    assert "chown root:muxd /etc/muxd/muxd.yaml" in postinst
    assert "muxd@" not in postinst  # instances are the administrator's to start


@pytest.mark.skipif(shutil.which("lintian") is None, reason="needs lintian")
def test_lintian_has_no_errors(deb: Path) -> None:
    proc = subprocess.run(["lintian", str(deb)], capture_output=True, text=True, timeout=300, check=False)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert not errors, proc.stdout
