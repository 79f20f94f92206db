"""muxd as shipped: the .deb installed by apt in a Debian 12 guest whose PID 1 is a
real systemd (systemd-nspawn -b), driven with systemctl, journalctl and
systemd-analyze inside it.

Theory of operation. The guest is a minbase bookworm rootfs built by mmdebstrap
from this machine's own apt sources, with systemd, dbus, python3 and the
package's runtime Depends and Recommends already in, so installing the .deb
needs no download. It is cached in CACHE_DIR, keyed by a hash of the package
list, the suite and the sources (about 25 s to 2 min to build; a key that
changed replaces the old tree). Each run gets a fresh copy of it: an overlay
mount whose upper layer lives in a temporary directory, so nothing a run does
reaches the cache and a run costs no copying. Then:

1. ``apt-get install ./muxd_*.deb`` in a non-booted nspawn on the host network
   (the one step that may use it);
2. boot: ``systemd-nspawn -b --private-network`` (ports clash with nothing, and
   nothing reaches out). The host's PID 1 need not be systemd: nspawn runs with
   --register=no --keep-unit from a cgroup of its own, made for each nspawn
   under the cgroup2 root and removed after it; CAP_BPF and the bpf syscall let
   the guest's systemd enforce DevicePolicy=;
3. every check runs inside through ``nsenter -t <guest PID 1> -a``, and the
   test's own client sockets are opened in the guest's network namespace
   (setns), so they are real TCP clients of the guest's 127.0.0.1.

At the end, whatever happened: the guest is powered off, nspawn is killed by
PID if it has not exited, every process left in its cgroups is killed by PID,
the cgroups, the overlay and the temporary directory are removed. Each phase's
time is printed (pytest -s shows it).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deb_package import built_deb, control_fields, relations
from tests.helpers import wait_for

# A cold cache builds the rootfs (up to ~2-3 minutes on a slow mirror) before the boot.
pytestmark = pytest.mark.timeout(600)

CACHE_DIR = Path(os.environ.get("MUXD_TEST_CACHE", "/var/cache/muxd-tests"))
SUITE = "bookworm"
# What the guest needs besides muxd's own Depends/Recommends: an init, a bus, logind's peers.
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "python3")
APT_SOURCES = (Path("/etc/apt/sources.list"), Path("/etc/apt/sources.list.d"))
TOOLS = ("systemd-nspawn", "mmdebstrap", "nsenter", "mount", "umount")
MAX_EXPOSURE = 2.0  # systemd-analyze security, measured on the guest's real unit (1.7 on 252)
LISTENER = 7000  # the shipped config's serial0-tcp, and the shipped muxd.socket's ListenStream=
CLONE_NEWNET = 0x40000000  # setns(2): the fd is a network namespace
# apt's words for sources it cannot reach (no network, no DNS, a mirror down).
UNREACHABLE = "Temporary failure resolving|Could not resolve|Failed to fetch|Unable to connect|unreachable"


def _why_not() -> str | None:
    if os.geteuid() != 0:
        return "needs root (mmdebstrap, overlay mounts, cgroups, systemd-nspawn)"
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        return f"needs {' '.join(missing)} (apt install systemd-container mmdebstrap util-linux)"
    if _cgroup2_root() is None:
        return "needs a cgroup2 (unified) hierarchy"
    return None


def _cgroup2_root() -> Path | None:
    """Where the unified hierarchy is mounted: /sys/fs/cgroup, or its /unified on a hybrid host."""
    for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
        if (root / "cgroup.procs").exists() and (root / "cgroup.subtree_control").exists():
            return root
    return None


def _phase(timings: dict[str, float], name: str, t0: float) -> None:
    timings[name] = time.monotonic() - t0
    print(f"[systemd-real] {name}: {timings[name]:.1f} s", flush=True)


# -- the rootfs ------------------------------------------------------------------------------------


def _sources() -> list[Path]:
    files: list[Path] = []
    for src in APT_SOURCES:
        if src.is_file() and src.stat().st_size:
            files.append(src)
        elif src.is_dir():
            files += sorted(p for p in src.iterdir() if p.suffix in (".list", ".sources"))
    return files


def _packages(deb: Path) -> list[str]:
    """The guest's packages: the base, and the .deb's Depends and Recommends."""
    fields = control_fields(deb)
    wanted = set(BASE_PACKAGES)
    for field in ("Depends", "Pre-Depends", "Recommends"):
        wanted.update(relations(fields.get(field, "")))
    wanted.discard("muxd")
    return sorted(wanted)


def _rootfs(packages: list[str], timings: dict[str, float]) -> Path:
    """The cached rootfs for these packages, built on a miss (under a lock)."""
    sources = _sources()
    key = hashlib.sha256(
        json.dumps([SUITE, packages, [p.read_text() for p in sources]]).encode()
    ).hexdigest()[:16]
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tree = CACHE_DIR / f"rootfs-{SUITE}-{key}"
    t0 = time.monotonic()
    with open(CACHE_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another session building the same tree: wait for it
        if not (tree / "usr" / "bin" / "python3").exists():
            for old in CACHE_DIR.glob("rootfs-*"):  # another key's tree, or a half-built one
                shutil.rmtree(old)
            building = tree.with_name(tree.name + ".building")
            proc = subprocess.run(
                [
                    "mmdebstrap",
                    "--variant=minbase",
                    "--format=directory",
                    "--include=" + ",".join(packages),
                    SUITE,
                    str(building),
                    *map(str, sources),
                ],
                capture_output=True,
                text=True,
                timeout=480,
                check=False,
            )
            if proc.returncode != 0:
                shutil.rmtree(building, ignore_errors=True)
                offline = re.search(f"^.*(?:{UNREACHABLE}).*$", proc.stderr, re.M)
                if offline:  # the machine's, not muxd's: say exactly what apt said
                    pytest.skip(f"mmdebstrap cannot reach the apt sources: {offline[0].strip()}")
                raise AssertionError(f"mmdebstrap failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            building.rename(tree)
            _phase(timings, "rootfs (mmdebstrap, cache miss)", t0)
        else:
            _phase(timings, "rootfs (cache hit)", t0)
    return tree


# -- the guest -------------------------------------------------------------------------------------


class Nspawn:
    """One systemd-nspawn process, started from a cgroup made for it."""

    def __init__(self, args: list[str], cgroup: Path, log: Path) -> None:
        self.cgroup = cgroup
        cgroup.mkdir()
        # The shell moves itself into the cgroup, then becomes nspawn: nspawn starts in it.
        enter = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(cgroup / "cgroup.procs")]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [*enter, "systemd-nspawn", "--register=no", "--keep-unit", *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1", "SYSTEMD_LOG_COLOR": "0"},
                start_new_session=True,
            )

    def pids(self) -> list[int]:
        """Every process in nspawn's cgroup and below it (host PIDs)."""
        out: list[int] = []
        for procs in self.cgroup.rglob("cgroup.procs"):
            with contextlib.suppress(FileNotFoundError):
                out += [int(x) for x in procs.read_text().split()]
        return out

    def guest_init(self) -> int | None:
        """The host PID of the guest's PID 1, once it runs."""
        for pid in self.pids():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                status = Path(f"/proc/{pid}/status").read_text()
                nspid = re.search(r"^NSpid:\s+(.*)$", status, re.M)
                if nspid and nspid[1].split()[-1] == "1" and len(nspid[1].split()) > 1:
                    return pid
        return None

    def stop(self, timeout: float) -> None:
        """nspawn killed by PID unless it exited; what is left in its cgroups killed
        by PID; the cgroups removed."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        wait_for(lambda: not self.pids(), 10.0, "the guest's processes to go")
        for path in [*sorted(self.cgroup.rglob("*"), key=lambda p: -len(p.parts)), self.cgroup]:
            if path.is_dir():
                path.rmdir()


class Guest:
    """The booted guest: commands through nsenter, clients in its network namespace."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-a", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check:
            assert proc.returncode == 0, f"{args}: {proc.returncode}\n{proc.stdout}{proc.stderr}"
        return proc.stdout

    def ok(self, *args: str) -> bool:
        """Whether the command succeeds in the guest."""
        cmd = ["nsenter", "-t", str(self.pid), "-a", *args]
        return subprocess.run(cmd, capture_output=True, timeout=60, check=False).returncode == 0

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={p}" for p in props))
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def connect(self, port: int) -> socket.socket:
        """A TCP client of the guest's 127.0.0.1:port, made from this process."""
        libc = ctypes.CDLL(None, use_errno=True)
        own = os.open("/proc/self/ns/net", os.O_RDONLY)
        guest = os.open(f"/proc/{self.pid}/ns/net", os.O_RDONLY)
        try:
            if libc.setns(guest, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns into the guest's network")
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=5)
            finally:
                if libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - the kernel refused our own
                    raise OSError(ctypes.get_errno(), "setns back")
        finally:
            os.close(own)
            os.close(guest)

    def journal(self, *args: str) -> list[dict[str, str]]:
        out = self.run("journalctl", "--no-pager", "-o", "json", *args)
        return [json.loads(line) for line in out.splitlines() if line.strip()]


def _still_open(sock: socket.socket) -> bool:
    """Connected, nothing pending from the peer: no EOF, no reset."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        sock.setblocking(True)


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    deb = built_deb(tmp_path_factory)
    _phase(timings, "deb (packaging/build-deb.sh, once per session)", t0)
    lower = _rootfs(_packages(deb), timings)
    cgroups = _cgroup2_root()
    assert cgroups is not None
    work = Path(tempfile.mkdtemp(prefix="muxd-systemd-"))
    root = work / "root"
    name = f"muxd-test-{os.getpid()}"
    mounted = False
    booted: Nspawn | None = None
    try:
        t0 = time.monotonic()
        for d in ("upper", "work", "root"):
            (work / d).mkdir()
        overlay = f"lowerdir={lower},upperdir={work / 'upper'},workdir={work / 'work'}"
        subprocess.run(
            ["mount", "-t", "overlay", "overlay", "-o", overlay, str(root)], check=True, timeout=30
        )
        mounted = True
        _phase(timings, "fresh copy (overlay)", t0)

        t0 = time.monotonic()
        install = Nspawn(
            [
                "--quiet",
                f"--machine={name}",
                f"--directory={root}",
                f"--bind-ro={deb.parent}:/srv/muxd-deb",
                "--setenv=DEBIAN_FRONTEND=noninteractive",
                "--pipe",
                "apt-get",
                "install",
                "-y",
                "-q",
                "--no-install-recommends",
                f"/srv/muxd-deb/{deb.name}",
            ],
            cgroups / f"{name}-install",
            work / "install.log",
        )
        install.stop(timeout=300)
        assert install.proc.returncode == 0, (work / "install.log").read_text()[-4000:]
        _phase(timings, "apt install ./muxd.deb", t0)

        t0 = time.monotonic()
        booted = Nspawn(
            [
                "--boot",
                "--private-network",
                "--capability=CAP_BPF",
                "--system-call-filter=bpf",
                f"--machine={name}",
                f"--directory={root}",
            ],
            cgroups / name,
            work / "boot.log",
        )
        pid = wait_for(booted.guest_init, 30.0, "the guest's PID 1")
        g = Guest(pid)
        state = wait_for(
            lambda: (
                g.run("systemctl", "is-system-running", check=False).strip() in ("running", "degraded")
                and g.run("systemctl", "is-system-running", check=False).strip()
            ),
            60.0,
            "the guest's boot to finish",
        )
        _phase(timings, f"boot (systemd as PID 1: {state})", t0)
        if state == "degraded":
            print(g.run("systemctl", "--failed", "--no-pager", check=False), flush=True)
        t0 = time.monotonic()
        yield g
        _phase(timings, "checks", t0)
    finally:
        t0 = time.monotonic()
        if booted is not None:
            init = booted.guest_init()
            if init is not None:
                subprocess.run(
                    ["nsenter", "-t", str(init), "-a", "systemctl", "poweroff"],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            booted.stop(timeout=30)
        if mounted:
            subprocess.run(["umount", str(root)], check=True, timeout=30)
        shutil.rmtree(work)
        # nspawn leaves its mount-propagation directory behind when /run is not a tmpfs.
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(f"/run/systemd/nspawn/propagate/{name}")
        _phase(timings, "power off and clean up", t0)
        print(f"[systemd-real] total: {sum(timings.values()):.1f} s", flush=True)


# -- the checks ------------------------------------------------------------------------------------


def test_service_starts_ready_with_its_status(guest: Guest) -> None:
    guest.run("systemctl", "start", "muxd.service")  # Type=notify: returns once READY=1 came
    # READY=1 comes after every listener is bound: a client is accepted at once.
    guest.connect(LISTENER).close()
    shown = guest.show("muxd.service", "Type", "ActiveState", "SubState", "StatusText")
    assert shown["Type"] == "notify"
    assert (shown["ActiveState"], shown["SubState"]) == ("active", "running")
    assert guest.run("systemctl", "is-active", "muxd.service").strip() == "active"
    # The shipped config's device is absent here: the port says so, and waits for it.
    assert shown["StatusText"] == "serial0 backing-off 0 clients"
    # The control socket that ser2net mode (labgrid's exporter) joins: the
    # service's user and group, and no one else.
    control = "/run/muxd/control.sock"
    assert guest.run("stat", "-c", "%F %a %U %G", control).strip() == "socket 660 muxd muxd"


def test_journal_has_muxd_fields(guest: Guest) -> None:
    guest.run("systemctl", "start", "muxd.service")
    entries = wait_for(
        lambda: [e for e in guest.journal("MUXD_PORT=serial0") if e.get("SYSLOG_IDENTIFIER") == "muxd"],
        10.0,
        "a journal entry with MUXD_PORT=serial0",
    )
    absent = next(e for e in entries if "device absent" in e["MESSAGE"])
    assert absent["PRIORITY"] == "4"  # a warning, as a syslog priority
    assert absent["MESSAGE"].startswith("serial0 upstream backing-off")  # no timestamp of ours
    unit = guest.journal("-u", "muxd.service", "SYSLOG_IDENTIFIER=muxd")
    assert any(e["MESSAGE"] == "serial0: listening on 127.0.0.1:7000 (rw)" for e in unit)


def test_security_exposure(guest: Guest) -> None:
    out = guest.run("systemd-analyze", "security", "--no-pager", "muxd.service")
    match = re.search(r"Overall exposure level for muxd\.service: (\d+\.\d+)", out)
    assert match, out
    print(f"[systemd-real] systemd-analyze security muxd.service: {match[1]}", flush=True)
    assert float(match[1]) <= MAX_EXPOSURE


def test_reload_keeps_a_connected_client(guest: Guest) -> None:
    guest.run("systemctl", "start", "muxd.service")
    main = guest.show("muxd.service", "MainPID")["MainPID"]
    client = guest.connect(LISTENER)
    try:
        wait_for(
            lambda: guest.show("muxd.service", "StatusText")["StatusText"] == "serial0 backing-off 1 client",
            10.0,
            "STATUS= with the client",
        )
        cursor = guest.show("muxd.service", "InvocationID")["InvocationID"]
        guest.run("systemctl", "reload", "muxd.service")
        wait_for(
            lambda: any(
                e["MESSAGE"] == "reloaded /etc/muxd/muxd.yaml"
                for e in guest.journal("-u", "muxd.service", f"_SYSTEMD_INVOCATION_ID={cursor}")
            ),
            10.0,
            "muxd's 'reloaded' line",
        )
        assert guest.show("muxd.service", "MainPID")["MainPID"] == main
        assert _still_open(client)
        assert guest.show("muxd.service", "StatusText")["StatusText"] == "serial0 backing-off 1 client"
    finally:
        client.close()


def test_watchdog_kills_and_restarts_a_stopped_loop(guest: Guest) -> None:
    dropin = "/etc/systemd/system/muxd.service.d"
    # A short watchdog for speed; the abort (SIGABRT, then SIGCONT) is not waited on for long.
    guest.run(
        "sh",
        "-c",
        f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=2s\\nTimeoutAbortSec=5s\\n' "
        f"> {dropin}/watchdog.conf && systemctl daemon-reload && systemctl restart muxd.service",
    )
    try:
        before = guest.show("muxd.service", "MainPID", "NRestarts", "WatchdogUSec")
        assert before["WatchdogUSec"] == "2s"
        guest.run("systemctl", "kill", "--signal=SIGSTOP", "--kill-who=main", "muxd.service")
        restarts = str(int(before["NRestarts"]) + 1)

        def restarted() -> dict[str, str] | None:
            now = guest.show("muxd.service", "MainPID", "NRestarts", "ActiveState", "StatusText")
            ready = now["ActiveState"] == "active" and now["StatusText"] != ""
            return now if now["NRestarts"] == restarts and ready else None

        after = wait_for(restarted, 30.0, "the watchdog's restart")
        assert after["MainPID"] not in ("0", before["MainPID"])
        said = [e["MESSAGE"] for e in guest.journal("-u", "muxd.service", "SYSLOG_IDENTIFIER=systemd")]
        assert "muxd.service: Watchdog timeout (limit 2s)!" in said
    finally:
        guest.run("sh", "-c", f"rm -r {dropin} && systemctl daemon-reload")


def test_socket_activation_with_the_shipped_files(guest: Guest) -> None:
    """muxd.socket and /etc/muxd/muxd.yaml as installed, unchanged: systemd holds
    127.0.0.1:7000, the first client starts muxd, which serves it on the passed
    socket although /dev/ttyUSB0 is absent (clients stay while the device is away)."""
    guest.run("systemctl", "stop", "muxd.service")
    guest.run("systemctl", "start", "muxd.socket")
    assert guest.run("systemctl", "is-active", "muxd.service", check=False).strip() == "inactive"
    assert not guest.ok("test", "-e", "/dev/ttyUSB0")
    client = guest.connect(LISTENER)
    try:
        try:
            wait_for(
                lambda: (
                    guest.show("muxd.service", "StatusText")["StatusText"] == "serial0 backing-off 1 client"
                ),
                20.0,
                "muxd started by the socket, serving its first client",
            )
        except AssertionError as exc:
            said = guest.run(
                "journalctl", "--no-pager", "-o", "cat", "-u", "muxd.service", "-u", "muxd.socket"
            )
            raise AssertionError(f"{exc}; the journal says:\n{said[-3000:]}") from None
        assert guest.show("muxd.service", "ActiveState")["ActiveState"] == "active"
        assert guest.show("muxd.socket", "ActiveState")["ActiveState"] == "active"
        assert _still_open(client)
    finally:
        client.close()
    refusals = [
        e["MESSAGE"] for e in guest.journal("-u", "muxd.service") if "cannot start" in e.get("MESSAGE", "")
    ]
    assert not refusals, refusals
