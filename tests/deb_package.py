"""The muxd .deb, built once per test session by packaging/build-deb.sh.

tests/test_deb.py reads it with dpkg-deb; tests/test_systemd_real.py installs it
under a real systemd. Both ask ``built_deb()``, which builds on the first call
(about 30 s) and hands every later caller the same file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONTROL = REPO / "packaging" / "debian" / "control"

_built: list[Path] = []  # the session's .deb, once built


def missing_build_tools() -> str | None:
    """Why the .deb cannot be built here, or None."""
    for tool in ("dpkg-buildpackage", "dpkg-checkbuilddeps", "dpkg-deb", "pybuild"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt install dpkg-dev dh-python pybuild-plugin-pyproject)"
    proc = subprocess.run(
        ["dpkg-checkbuilddeps", str(CONTROL)], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        return f"build dependencies missing: {proc.stderr.strip()}"
    return None


def built_deb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The .deb of the working tree; skips the calling test when it cannot be built."""
    if _built:
        return _built[0]
    reason = missing_build_tools()
    if reason:
        pytest.skip(reason)
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(
        [str(REPO / "packaging" / "build-deb.sh"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    (path,) = out.glob("muxd_*_all.deb")
    _built.append(path)
    return path


def control_fields(deb: Path) -> dict[str, str]:
    """The package's control fields (continuation lines left out)."""
    text = subprocess.run(
        ["dpkg-deb", "-f", str(deb)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return dict(line.split(": ", 1) for line in text.splitlines() if not line.startswith(" "))


def relations(field: str) -> list[str]:
    """The package names of a Depends-style field ("a (>= 1), b | c" -> a, b, c)."""
    names = []
    for group in field.split(","):
        for alt in group.split("|"):
            if alt.strip():
                names.append(alt.strip().split()[0].split(":")[0])
    return names
