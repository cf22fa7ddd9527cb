"""Stand-ins for pure-logic tests: a clock and sleep that advance only when told, and the
translated errors the policies react to (built as PyMySQL builds them; no database)."""

from __future__ import annotations

from typing import List

import pymysql

import connguard


class FakeClock:
    """``clock()`` returns ``now``; ``clock.sleep(s)`` records the wait and advances ``now``."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: List[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def refused(host: str = "127.0.0.1", port: int = 3306) -> BaseException:
    """A translated 2003/ECONNREFUSED, as connecting to a stopped server gives."""
    exc = pymysql.err.OperationalError(
        2003, f"Can't connect to MySQL server on '{host}' ([Errno 111] Connection refused)")
    exc.original_exception = ConnectionRefusedError(111, "Connection refused")  # type: ignore
    return connguard.translate(exc, host=host, port=port, diagnose=False)


def server_error(code: int, text: str) -> BaseException:
    """A translated server error such as ``(1040, "Too many connections")``."""
    return connguard.translate(pymysql.err.OperationalError(code, text), diagnose=False)
