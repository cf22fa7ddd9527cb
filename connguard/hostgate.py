"""A handshake cap shared by every process of one user on the host (opt-in): flock'd slots.

Sixteen gunicorn workers each with their own pool would run sixteen times ``max_handshakes``
connects at once after a restart or a mass KILL. With ``host_gate=True`` the pools of all
processes of this user that name the same destination share one cap: each handshake holds
one of ``max_handshakes`` slot files, locked with ``flock(LOCK_EX | LOCK_NB)``.

Why this shape (what another user of the host must not be able to do):

* the slot files live in a directory of this user's own, ``connguard-<uid>`` under
  ``$XDG_RUNTIME_DIR`` (else ``/dev/shm``, else the temp dir) or under the directory given,
  whose base must be this user's or root's and sticky if others may write to it. The
  directory is created 0700, opened with ``O_NOFOLLOW`` and checked through its descriptor
  (this user's, no access for others) before every use; a directory planted by someone
  else is refused;
* slot files are opened relative to that descriptor with ``O_NOFOLLOW`` (a planted symlink
  is refused, never followed; swapping the directory after the check changes nothing) and
  checked with ``fstat``; nothing is ever read from them, so there is nothing to poison;
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
import random
import stat
import tempfile
import threading
import time
from typing import Callable, Hashable, List, Optional, Set

from connguard import errors
from connguard.concurrency import ProcessLock

log = logging.getLogger("connguard.hostgate")

#: How often a caller waiting for a slot looks again (handshakes take milliseconds), at
#: first; the interval doubles up to MAX_POLL, with jitter.
POLL = 0.005
MAX_POLL = 0.05

_held: Set[int] = set()  # slot descriptors this process holds (closed in a forked child)
_held_lock = ProcessLock()  # re-made after a fork and once threading is patched
_warned: Set[str] = set()


def base_directory() -> str:
    """Where the per-user directory goes by default."""
    for candidate in (os.environ.get("XDG_RUNTIME_DIR") or "", "/dev/shm"):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK | os.X_OK):
            return candidate
    return tempfile.gettempdir()


def gate_directory(base: Optional[str] = None) -> str:
    """This user's directory of slot files under ``base`` (default: base_directory())."""
    return os.path.join(base or base_directory(), f"connguard-{os.geteuid()}")


class UnsafeDirectory(Exception):
    """The gate's directory is not this user's alone."""


def _open_directory(path: str) -> int:
    """A descriptor of ``path``, this user's own directory (created 0700 if missing).

    The base it lives in must be this user's or root's, and sticky if others may write to
    it (as /dev/shm and /tmp are): then nobody else can rename or replace ``path``. The
    directory is opened with O_NOFOLLOW and checked through its descriptor, and the slot
    files are opened relative to that descriptor, so a swap after the check changes
    nothing."""
    uid = os.geteuid()
    base = os.stat(os.path.dirname(path))
    if base.st_uid not in (0, uid):
        raise UnsafeDirectory(f"{os.path.dirname(path)} belongs to uid {base.st_uid}")
    if base.st_mode & 0o002 and not base.st_mode & stat.S_ISVTX:
        raise UnsafeDirectory(f"{os.path.dirname(path)} is writable by others and not sticky")
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise UnsafeDirectory(f"{path} is not a directory (a symlink or a file)") from None
        raise
    info = os.fstat(fd)
    problem = (f"{path} belongs to uid {info.st_uid}, not to this user (uid {uid})"
               if info.st_uid != uid else
               f"{path} is open to others (mode {info.st_mode & 0o777:o}, want 700)"
               if info.st_mode & 0o077 else None)
    if problem is not None:
        os.close(fd)
        raise UnsafeDirectory(problem)
    return fd


class HostGate:
    """``max_handshakes`` slots toward one destination, shared by this user's processes.

    The shared-gate protocol of :class:`connguard.storm.SharedGate`: ``admit`` takes a
    slot (or gives up at the deadline with GateTimeout), ``finished`` gives it back.
    """

    def __init__(self, host: str, port: int, max_handshakes: int,
                 directory: Optional[str] = None) -> None:
        self.directory = gate_directory(directory)
        self.host, self.port = host, port
        digest = hashlib.sha1(f"{host}:{port}".encode()).hexdigest()[:16]
        self.names = [f"{digest}.{i}.lock" for i in range(max_handshakes)]
        self.slots = [os.path.join(self.directory, name) for name in self.names]
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
        self.finished("abandoned")  # a slot this thread still holds: its attempt is over
        try:
            directory = _open_directory(self.directory)
        except (OSError, UnsafeDirectory) as exc:
            self._stand_aside(exc)
            return None
        try:
            wait = POLL
            while True:
                fd = self._try_slots(directory)
                if fd is not None:
                    self._local.slot = (os.getpid(), fd)
                    return None
                if clock() + wait > deadline:
                    raise errors.GateTimeout(wait, scope="host-wide", host=self.host,
                                             port=self.port or None, slots=len(self.names))
                sleep(wait * (1.0 + random.random()))  # jitter: waiters do not poll in step
                wait = min(wait * 2, MAX_POLL)
        except (OSError, UnsafeDirectory) as exc:
            self._stand_aside(exc)
            return None
        finally:
            os.close(directory)

    def _try_slots(self, directory: int) -> Optional[int]:
        """A slot's descriptor, locked; None when all are taken."""
        for name in self.names:
            with _held_lock:  # opened and tracked at once: a fork never copies it untracked
                fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=directory)
                _held.add(fd)
            try:
                if os.fstat(fd).st_uid != os.geteuid():
                    raise UnsafeDirectory(f"{name} belongs to another user")
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                _close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue
                raise
            except BaseException:
                _close(fd)
                raise
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


def _close(fd: int) -> None:
    with _held_lock:
        _held.discard(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


def _before_fork() -> None:
    _held_lock.acquire()  # no slot half-opened while the process is copied


def _after_fork_in_parent() -> None:
    _held_lock.release()


def _after_fork_in_child() -> None:
    """The child's copies of the parent's slot descriptors: closed (the parent's locks stay,
    held by the parent's descriptors)."""
    inherited: List[int] = list(_held)
    _held.clear()
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent,
                        after_in_child=_after_fork_in_child)
