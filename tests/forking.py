"""Run a body in a forked child (as a pre-fork server does) and bring back its answer."""

from __future__ import annotations

import os
import signal
import time
from typing import Callable, Optional


def in_forked_child(body: Callable[[], int], deadline: float = 60.0) -> int:
    """Fork; the child runs ``body`` and leaves with ``os._exit`` (no cleanup, no atexit,
    as a worker process would); the parent gets the integer it returned.

    Raises AssertionError if the child failed, or hung past ``deadline`` seconds (it is
    killed then: a hang must fail the test, not the suite).
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.write(write_end, str(body()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    status = _wait(pid, deadline)
    answer = os.read(read_end, 64).decode()
    os.close(read_end)
    assert status is not None, f"child still running after {deadline:.0f}s: killed"
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed: {status}"
    return int(answer)


def _wait(pid: int, deadline: float) -> Optional[int]:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None
