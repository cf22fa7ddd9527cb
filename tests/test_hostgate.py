"""The host-wide handshake cap (connguard.hostgate): flock'd slot files in a directory of the
user's own. Other users cannot block, redirect or poison it; a killed holder frees its slot
at once; a gate that cannot be used stands aside with one warning."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Iterator, List, Tuple

import pytest

import connguard
from connguard import hostgate
from connguard.hostgate import HostGate, gate_directory
from tests.mariadb import MariaDB

#: The second user of the host, one per test run: runs side by side never share (nor remove)
#: each other's.
OTHER_USER = f"cg-other-{os.getpid()}"


@pytest.fixture
def base() -> Iterator[str]:
    """A world-writable, sticky base directory, as /dev/shm is."""
    path = tempfile.mkdtemp(prefix="connguard-gate-base-")
    os.chmod(path, 0o1777)
    hostgate._warned.clear()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        hostgate._warned.clear()


def test_slots_cap_handshakes_and_wait_until_the_deadline(base: str) -> None:
    first, second = HostGate("db", 3306, 1, base), HostGate("db", 3306, 1, base)
    first.admit(time.monotonic() + 5)
    began = time.monotonic()
    with pytest.raises(connguard.GateTimeout):
        second.admit(time.monotonic() + 0.1)
    assert 0.05 <= time.monotonic() - began < 2
    first.finished("succeeded")
    second.admit(time.monotonic() + 5)  # the slot is free again
    second.finished("succeeded")
    info = os.lstat(gate_directory(base))
    assert info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700


def _hold_a_slot(base: str, ready: Any) -> None:
    HostGate("db", 3306, 1, base).admit(time.monotonic() + 5)
    ready.set()
    time.sleep(600)


def test_a_holder_killed_with_sigkill_frees_its_slot_at_once(base: str) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold_a_slot, args=(base, ready))
    child.start()
    try:
        assert ready.wait(60)
        with pytest.raises(connguard.GateTimeout):
            HostGate("db", 3306, 1, base).admit(time.monotonic() + 0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.join(30)
        gate = HostGate("db", 3306, 1, base)
        gate.admit(time.monotonic() + 5)  # no pid bookkeeping to wait for
        gate.finished("succeeded")
    finally:
        if child.is_alive():
            child.kill()


def test_a_planted_symlink_is_refused_with_one_warning(base: str, caplog: Any) -> None:
    gate = HostGate("db", 3306, 1, base)
    os.makedirs(gate.directory, mode=0o700, exist_ok=True)
    victim = os.path.join(base, "victim.txt")
    with open(victim, "w") as f:
        f.write("keep me")
    os.symlink(victim, gate.slots[0])
    with caplog.at_level(logging.WARNING, logger="connguard.hostgate"):
        for _ in range(3):
            gate.admit(time.monotonic() + 1)  # stands aside: connects go on
            gate.finished("succeeded")
    with open(victim) as f:
        assert f.read() == "keep me"  # never followed
    assert len([r for r in caplog.records if "unusable" in r.getMessage()]) == 1


def test_a_directory_open_to_others_is_refused(base: str, caplog: Any) -> None:
    gate = HostGate("db", 3306, 1, base)
    os.makedirs(gate.directory, exist_ok=True)
    os.chmod(gate.directory, 0o777)
    with caplog.at_level(logging.WARNING, logger="connguard.hostgate"):
        gate.admit(time.monotonic() + 1)
    assert "open to others" in caplog.text
    assert not os.listdir(gate.directory)  # nothing created in it


@pytest.mark.parametrize("value", ["relative/dir", 1, "yes"])
def test_bad_host_gate_values_are_named(value: Any) -> None:
    with pytest.raises(ValueError, match="host_gate must be True, False or the absolute path"):
        connguard.Pool(host="127.0.0.1", port=1, user="u", password="p", host_gate=value)


# --- another user of the host ---------------------------------------------------------------


@pytest.fixture(scope="session")
def other_user() -> Iterator[str]:
    """A system user made for the run and removed at its end (only if this run made it)."""
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as a second user")
    try:
        pwd.getpwnam(OTHER_USER)
        made = False
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/bin/false",
                        OTHER_USER], check=True)
        made = True
    yield OTHER_USER
    if made:
        subprocess.run(["userdel", OTHER_USER], check=True, capture_output=True)


def _as_other(user: str, code: str) -> Tuple[int, str]:
    # The system interpreter: the other user may not reach this venv's; stdlib only.
    python = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
    proc = subprocess.run(["runuser", "-u", user, "--", python, "-c", code],
                          capture_output=True, text=True, timeout=60, cwd="/")
    return proc.returncode, proc.stdout + proc.stderr


def test_another_user_cannot_take_or_poison_our_slots(base: str, other_user: str) -> None:
    gate = HostGate("db", 3306, 1, base)
    gate.admit(time.monotonic() + 5)
    gate.finished("succeeded")
    code, out = _as_other(other_user, (
        "import fcntl, os, sys\n"
        f"path = {gate.slots[0]!r}\n"
        "try:\n"
        "    fd = os.open(path, os.O_RDWR)\n"
        "except PermissionError:\n"
        "    print('refused'); sys.exit(0)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX); print('took it')\n"))
    assert "refused" in out, out
    gate.admit(time.monotonic() + 1)  # still ours, immediately
    gate.finished("succeeded")


def test_a_directory_planted_by_another_user_is_refused_and_connects_go_on(
        base: str, other_user: str, caplog: Any) -> None:
    target = gate_directory(base)  # where our gate will look
    code, out = _as_other(other_user, f"import os; os.mkdir({target!r}, 0o777)")
    assert code == 0, out
    gate = HostGate("db", 3306, 1, base)
    with caplog.at_level(logging.WARNING, logger="connguard.hostgate"):
        for _ in range(3):
            gate.admit(time.monotonic() + 1)  # one warning, never an error
            gate.finished("succeeded")
    assert "belongs to uid" in caplog.text
    assert len(caplog.records) == 1
    assert not os.listdir(target)  # we created nothing in their directory


# --- the cap across processes, against a real server ---------------------------------------


def _open_many(kwargs: Any, base: str, n: int, out: Any) -> None:
    spans: List[Tuple[float, float]] = []
    original_admit, original_finished = HostGate.admit, HostGate.finished

    def admit(self: HostGate, *args: Any, **kw: Any) -> None:
        original_admit(self, *args, **kw)
        self._local.began = time.monotonic()

    def finished(self: HostGate, *args: Any, **kw: Any) -> None:
        if getattr(self._local, "slot", None) is not None:  # a slot was held: its span
            spans.append((self._local.began, time.monotonic()))
        original_finished(self, *args, **kw)

    HostGate.admit, HostGate.finished = admit, finished  # type: ignore[method-assign]
    pool = connguard.Pool(**kwargs, max_size=n, host_gate=base, max_handshakes=2,
                          checkout_timeout=120)
    held = []
    try:
        for _ in range(n):
            held.append(pool.connect())
    finally:
        for conn in held:
            conn.close()
        pool.close()
    out.put(spans)


def test_the_cap_holds_for_four_processes(mariadb: MariaDB, base: str) -> None:
    ctx = multiprocessing.get_context("spawn")  # fresh interpreters, like gunicorn workers
    out = ctx.Queue()
    procs = [ctx.Process(target=_open_many, args=(mariadb.connect_kwargs(), base, 8, out))
             for _ in range(4)]
    for p in procs:
        p.start()
    spans = [s for _ in procs for s in out.get(timeout=120)]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(spans) == 32
    events = sorted([(b, 1) for b, _ in spans] + [(e, -1) for _, e in spans])
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    assert peak <= 2, f"{peak} handshakes at once across 4 processes (cap 2)"


def test_a_slot_is_never_held_twice_by_one_thread(base: str) -> None:
    gate, other = HostGate("db", 3306, 1, base), HostGate("db", 3306, 1, base)
    gate.admit(time.monotonic() + 1)
    gate.admit(time.monotonic() + 1)  # the first attempt never reported: its slot goes back
    gate.finished("succeeded")
    other.admit(time.monotonic() + 1)  # free: nothing leaked
    other.finished("succeeded")
    assert not hostgate._held


def test_an_attempt_that_breaks_before_connecting_gives_its_slot_back(base: str) -> None:
    from connguard.connector import Connector
    from connguard.storm import ConnectGate, StormPolicy

    slots = HostGate("db", 3306, 1, base)
    gate = ConnectGate(StormPolicy(), "127.0.0.1", 1, host_gate=slots)
    connector = Connector({"host": "127.0.0.1", "port": 1, "user": "u", "password": "p",
                           "connect_timeout": "ten"}, gate=gate)
    with pytest.raises(ValueError):
        connector.open(time.monotonic() + 5)
    other = HostGate("db", 3306, 1, base)
    other.admit(time.monotonic() + 0.5)  # not GateTimeout: the slot came back
    other.finished("succeeded")


def test_a_base_others_may_write_to_without_the_sticky_bit_is_refused(
        base: str, caplog: Any) -> None:
    os.chmod(base, 0o777)  # anyone could rename our directory away and plant another
    with caplog.at_level(logging.WARNING, logger="connguard.hostgate"):
        HostGate("db", 3306, 1, base).admit(time.monotonic() + 1)
    assert "writable by others and not sticky" in caplog.text
    assert not os.path.exists(gate_directory(base))


def test_the_suite_removes_the_user_it_made() -> None:
    if os.geteuid() != 0 or shutil.which("runuser") is None:
        pytest.skip("needs root and runuser to act as a second user")
    before = {p.pw_name for p in pwd.getpwall()}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
         "-k", "another_user_cannot_take"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "1 passed" in out, out  # the user was made and used
    # That run's user (named by its pid), or the fixed name older suites used.
    left = {name for name in {p.pw_name for p in pwd.getpwall()} - before
            if name.endswith(f"-{proc.pid}") or name == "connguard-other"}
    assert not left, f"users left behind: {sorted(left)}"
