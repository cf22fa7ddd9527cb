"""A connect gate shared by every process of the host (opt-in): state in a file, fcntl locks.

Sixteen gunicorn workers each with their own gate would let sixteen times the rate through
after a restart. With ``host_gate=True`` the pools of all processes that name the same
destination share one token bucket and one cap on concurrent handshakes, kept in a small
file under ``/dev/shm`` (or ``$XDG_RUNTIME_DIR``, or the temp dir) and updated under an
exclusive ``flock``. A process that dies mid-handshake cannot leak its slots: slots are held
per pid and pids that no longer exist are dropped on the next update.

The bucket uses CLOCK_MONOTONIC, which on Linux is one clock for every process of the host.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
import time
from typing import Any, Callable, Dict, Hashable, Optional

from connguard import errors


def default_directory() -> str:
    for candidate in ("/dev/shm", os.environ.get("XDG_RUNTIME_DIR") or ""):
        if candidate and os.path.isdir(candidate) and os.access(candidate, os.W_OK):
            return candidate
    return tempfile.gettempdir()


def gate_path(host: str, port: int, directory: Optional[str] = None) -> str:
    digest = hashlib.sha1(f"{host}:{port}".encode()).hexdigest()[:16]
    return os.path.join(directory or default_directory(), f"connguard-gate-{digest}.json")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class HostGate:
    """Token bucket + handshake slots for one destination, shared across processes."""

    def __init__(self, path: str, rate: float, burst: int, max_handshakes: int) -> None:
        self.path = path
        self.rate, self.burst, self.max_handshakes = rate, burst, max_handshakes

    @property
    def key(self) -> Hashable:
        return ("host", self.path)

    def _update(self, change: Callable[[Dict[str, Any], float], float]) -> float:
        """Apply ``change`` to the shared state under an exclusive lock; return its result."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            raw = os.pread(fd, 65536, 0)
            try:
                state = json.loads(raw) if raw else {}
            except ValueError:
                state = {}  # a torn or foreign file: start over rather than fail connects
            result = change(state, time.monotonic())
            data = json.dumps(state).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            return result
        finally:
            os.close(fd)  # closing releases the flock

    def _take(self, state: Dict[str, Any], now: float) -> float:
        slots = {int(pid): n for pid, n in state.get("slots", {}).items() if _alive(int(pid))}
        state["slots"] = slots
        if sum(slots.values()) >= self.max_handshakes:
            return 0.01  # handshakes are short: look again soon
        tokens = state.get("tokens", float(self.burst))
        tokens = min(float(self.burst), tokens + (now - state.get("stamp", now)) * self.rate)
        state["stamp"] = now
        if tokens < 1.0 - 1e-9:  # epsilon: see TokenBucket.take
            state["tokens"] = tokens
            return (1.0 - tokens) / self.rate
        state["tokens"] = tokens - 1.0
        slots[os.getpid()] = slots.get(os.getpid(), 0) + 1
        return 0.0

    def _give_back(self, state: Dict[str, Any], now: float) -> float:
        slots = {int(pid): n for pid, n in state.get("slots", {}).items()}
        pid = os.getpid()
        if slots.get(pid, 0) > 1:
            slots[pid] -= 1
        else:
            slots.pop(pid, None)
        state["slots"] = slots
        return 0.0

    def admit(self, deadline: float, clock: Callable[[], float],
              sleep: Callable[[float], None]) -> None:
        """Block until this process may start a handshake; raise GateTimeout at deadline."""
        while True:
            wait = self._update(self._take)
            if wait <= 0:
                return
            if clock() + wait > deadline:
                raise errors.GateTimeout(wait, scope="host-wide")
            sleep(wait)

    def release(self) -> None:
        """The handshake this process started is over (either way)."""
        self._update(self._give_back)

    def finished(self, outcome: str, error: Optional[BaseException] = None) -> None:
        """The shared-gate protocol (:class:`connguard.storm.SharedGate`): however the
        attempt ended, its handshake slot goes back."""
        self.release()
