"""Run a body in a forked child (as a pre-fork server does) and bring back its answer."""

from __future__ import annotations

import os
from typing import Callable


def in_forked_child(body: Callable[[], int]) -> int:
    """Fork; the child runs ``body`` and leaves with ``os._exit`` (no cleanup, no atexit,
    as a worker process would); the parent gets the integer it returned.

    Raises AssertionError if the child failed.
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
    _, status = os.waitpid(pid, 0)
    answer = os.read(read_end, 64).decode()
    os.close(read_end)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, f"child failed: {status}"
    return int(answer)
