"""A handshake cap shared by every process of one user on the host (opt-in): flock'd slots.

Sixteen gunicorn workers each with their own pool would run sixteen times ``max_handshakes``
connects at once after a restart or a mass KILL. With ``host_gate=True`` the pools of all
processes of this user that name the same destination share one cap: each handshake holds
one of ``max_handshakes`` slot files, locked with ``flock(LOCK_EX | LOCK_NB)``.

Why this shape (what another user of the host must not be able to do):

* the slot files live in a directory of this user's own, ``connguard-<uid>`` under
  ``$XDG_RUNTIME_DIR`` (else ``/dev/shm``, else the temp dir) or under the directory given,
  created 0700 and checked with ``lstat`` (a directory, not a symlink, owned by this uid,
  no access for group or others) before every use: a directory planted by someone else is
  refused;
* files are opened with ``O_NOFOLLOW`` (a planted symlink is refused, never followed) and
  checked with ``fstat`` (owner); nothing is ever read from them, so there is nothing to
  poison;
* the kernel drops a flock when the last descriptor of the file closes, so a process killed
  with SIGKILL mid-handshake frees its slot at once: no pid bookkeeping, no PID reuse;
* waiting for a slot polls ``LOCK_NB`` until the caller's deadline (GateTimeout then);
* a gate that cannot be used (a foreign or unsafe directory, a planted file, no space) logs
  one WARNING and stands aside: connects go on under the process's own gate.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import logging
import os
import stat
import tempfile
import threading
import time
from typing import Any, Callable, Hashable, List, Optional, Set

from connguard import errors

log = logging.getLogger("connguard.hostgate")

#: How often a caller waiting for a slot looks again (handshakes take milliseconds).
POLL = 0.01

_held: Set[int] = set()  # slot descriptors this process holds (closed in a forked child)
_held_lock = threading.Lock()
_warned: Set[str] = set()


def base_directory() -> str:
    """Where the per-user directory goes by default."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR") or "", "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return tempfile.gettempdir()


def gate_directory(base: Optional[str] = None) -> str:
    """This user's directory of slot files under ``base`` (default: base_directory())."""
    return os.path.join(base or base_directory(), f"connguard-{os.getuid()}")


def check_option(value: Any) -> Any:
    """``host_gate``: True/False, or the absolute path of a directory. ValueError otherwise."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    if isinstance(value, str) and os.path.isabs(value):
        return value
    raise ValueError("host_gate must be True, False or the absolute path of a directory for "
                     f"the shared handshake slots; got {value!r}")


class UnsafeDirectory(Exception):
    """The gate's directory is not this user's alone."""


def _ensure_directory(path: str) -> None:
    """Create ``path`` 0700 if missing; raise UnsafeDirectory unless it is a real directory
    owned by this user with no access for anyone else."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UnsafeDirectory(f"{path} is not a directory (a symlink or a file)")
    if info.st_uid != os.getuid():
        raise UnsafeDirectory(f"{path} belongs to uid {info.st_uid}, not to this user "
                              f"(uid {os.getuid()})")
    if info.st_mode & 0o077:
        raise UnsafeDirectory(f"{path} is open to others (mode {info.st_mode & 0o777:o}, "
                              "want 700)")


class HostGate:
    """``max_handshakes`` slots toward one destination, shared by this user's processes.

    The shared-gate protocol of :class:`connguard.storm.SharedGate`: ``admit`` takes a
    slot (or gives up at the deadline with GateTimeout), ``finished`` gives it back.
    """

    def __init__(self, host: str, port: int, max_handshakes: int,
                 directory: Optional[str] = None) -> None:
        self.directory = gate_directory(directory)
        digest = hashlib.sha1(f"{host}:{port}".encode()).hexdigest()[:16]
        self.slots = [os.path.join(self.directory, f"{digest}.{i}.lock")
                      for i in range(max_handshakes)]
        self._local = threading.local()  # the slot this thread's attempt holds

    @property
    def key(self) -> Hashable:
        return ("host", self.directory, self.slots[0], len(self.slots))

    @property
    def path(self) -> str:
        return self.slots[0]

    def admit(self, deadline: float, clock: Callable[[], float] = time.monotonic,
              sleep: Callable[[float], None] = time.sleep) -> None:
        """Take a slot, waiting until ``deadline`` (then GateTimeout). A gate that cannot be
        used admits at once (one WARNING): it must never break connects."""
        try:
            _ensure_directory(self.directory)
            while True:
                fd = self._try_slots()
                if fd is not None:
                    self._local.slot = (os.getpid(), fd)
                    return None
                wait = POLL
                if clock() + wait > deadline:
                    raise errors.GateTimeout(wait, scope="host-wide")
                sleep(wait)
        except (OSError, UnsafeDirectory) as exc:
            self._stand_aside(exc)
            return None

    def _try_slots(self) -> Optional[int]:
        """A slot's descriptor, locked; None when all are taken."""
        for path in self.slots:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_uid != os.getuid():
                    raise UnsafeDirectory(f"{path} belongs to another user")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            except BaseException:
                os.close(fd)
                raise
            with _held_lock:
                _held.add(fd)
            return fd
        return None

    def _stand_aside(self, exc: BaseException) -> None:
        if self.directory not in _warned:
            _warned.add(self.directory)
            log.warning("connguard: host-wide gate in %s unusable (%s); connects go on under "
                        "this process's own gate", self.directory, exc)

    def finished(self, outcome: str, error: Optional[BaseException] = None) -> None:
        """However the attempt ended, its slot goes back (closing drops the flock)."""
        slot = getattr(self._local, "slot", None)
        self._local.slot = None
        # A slot taken before a fork is the parent's: the child closed its copy already,
        # and that number may name another file by now.
        if slot is not None and slot[0] == os.getpid():
            _close(slot[1])

    release = finished  # the attempt is over: the same thing


def _close(fd: int) -> None:
    with _held_lock:
        _held.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


def _after_fork_in_child() -> None:
    """The child's copies of the parent's slot descriptors: closed (the parent's locks stay,
    held by the parent's descriptors)."""
    global _held_lock
    _held_lock = threading.Lock()
    inherited: List[int] = list(_held)
    _held.clear()
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
