"""The one path every new server connection takes: guard, connect, translate.

Order matters: the OS resource guard refuses *before* the kernel is asked for a port or an
fd (so the caller gets numbers and remedies instead of errno 99/24), then PyMySQL connects
with the cached SSL context, and any failure leaves here translated.
"""

from __future__ import annotations

import socket
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import pymysql

from connguard import driver, errors
from connguard.guard import ResourceGuard
from connguard.storm import ConnectGate

#: Connect failures of a server that is down or restarting (refused, unreachable, timed out,
#: cut off during the handshake, shutting down, listen queue full): worth waiting out.
OUTAGE_ERRORS = (errors.ServerUnavailable, errors.ConnectionLost, errors.ServerShuttingDown,
                 errors.ResourceTemporarilyUnavailable)


def _timeouts() -> Tuple[type, ...]:
    """A connect timeout's classes: socket's, and asyncio's (its own class before Python 3.11)
    once a driver has imported asyncio (read then, so connguard itself never imports it)."""
    aio = sys.modules.get("asyncio")
    return (socket.timeout,) if aio is None else (socket.timeout, aio.TimeoutError)


#: A caller retries a failed attempt only with at least this much of its time left.
MIN_RETRY_TIME = 0.01
#: A failure this close to the caller's deadline may be the deadline's doing.
DEADLINE_SLACK = 0.005

#: MySQL codes whose message is worth the server's own numbers (max_connections, ...).
SERVER_FACT_CODES = frozenset({1040, 1129, 1135, 1203, 1226})

FactSource = Callable[[], Dict[str, Any]]


class Connector:
    """Opens connections for one pool (one destination, one set of credentials)."""

    def __init__(self, connect_kwargs: Dict[str, Any], driver: Any = driver,
                 guard: Optional[ResourceGuard] = None,
                 gate: Optional[ConnectGate] = None,
                 server_facts: Optional[FactSource] = None,
                 keepalive: Optional[Tuple[float, float, int]] = None,
                 fail_fast: bool = False) -> None:
        self.kwargs = connect_kwargs
        self.fail_fast = fail_fast  # how this pool's callers take an open breaker
        self.keepalive = keepalive
        self.driver = driver  # the seam (connguard.drivers) our own connects go through
        self.host, self.port = driver.destination(connect_kwargs)
        self.guard = guard
        self.gate = gate
        self.server_facts = server_facts

    def open(self, deadline: float = float("inf"),
             connect: Optional[Callable[[], Any]] = None,
             started: Optional[float] = None,
             pause: Optional[Callable[[float], None]] = None) -> pymysql.connections.Connection:
        """Open a connection, waiting for the gate until ``deadline`` (monotonic) at most;
        the handshake is bounded by ``connect_timeout`` and by the deadline.

        ``connect``: what opens it, instead of connguard's own PyMySQL connection (the
        SQLAlchemy plugin passes the dialect's connect); guard, gate and translation stay.
        ``started``: when the caller's checkout began (monotonic), for how long it waited.
        ``pause``: how the caller waits for the gate when it must not block its thread (an
        event loop's sleep; see ConnectGate.admit).

        During an outage of a server this process has reached before, a failed attempt is
        not the caller's answer: it waits for the gate's next attempt (backoff, breaker
        probe) until ``deadline``, then gets ServerUnavailable with the last cause. A
        server never reached (a wrong port, a typo in the host) answers at once, as
        ``pymysql.connect`` would; so does every error retrying cannot fix.
        """
        began = time.monotonic() if started is None else started
        while True:
            if self.guard is not None:
                self.guard.preflight()
            if self.gate is not None:
                self.gate.admit(deadline, self.fail_fast, began, pause)  # refusals are final
            try:
                return self._attempt(deadline, connect)
            except errors.ConnGuardError as exc:
                if not self._wait_out(exc, deadline):
                    raise

    def _wait_out(self, exc: errors.ConnGuardError, deadline: float) -> bool:
        """Should the caller wait for the next attempt rather than get ``exc``?"""
        gate = self.gate
        return (gate is not None and not self.fail_fast and gate.reached
                and isinstance(exc, OUTAGE_ERRORS) and exc.transient
                and deadline - time.monotonic() > MIN_RETRY_TIME)

    def _attempt(self, deadline: float,
                 connect: Optional[Callable[[], Any]]) -> pymysql.connections.Connection:
        """One connect the gate admitted; its outcome is reported to the gate."""
        # A handshake cut short by the caller's deadline (not by connect_timeout) says
        # nothing about the server: reported as abandoned, so a breaker's probe given to a
        # caller with little time left cannot keep a slow-to-greet server "down".
        # Only our own connect bounds the handshake by the deadline, and only while some of
        # it is left (past it, the handshake gets the whole connect_timeout).
        cut = False
        try:
            left = deadline - time.monotonic()
            cut = connect is None and 0 < left < float(self.kwargs.get("connect_timeout") or 10)
            conn = (connect() if connect is not None else
                    self.driver.open_connection(self.kwargs, deadline, self.keepalive))
        except UnicodeEncodeError as exc:  # a password PyMySQL cannot encode: not shown
            if self.gate is not None:
                self.gate.abandoned()
            raise UnicodeEncodeError(exc.encoding, "", 0, 0, f"{exc.reason} (a connect "
                                     "argument, perhaps the password: not shown)") from None
        except Exception as exc:
            # The server's answer, or the network's: a driver's error, or a connect timeout a
            # driver let through unwrapped (asyncmy, on Python < 3.11 asyncio's own class).
            if not (errors.is_driver_error(exc) or isinstance(exc, _timeouts())):
                self._abandon(exc)
                raise
            translated = self.translate(exc, during_connect=True)
            deadline_cut = cut and time.monotonic() >= deadline - DEADLINE_SLACK
            if deadline_cut:
                errors.note_deadline_cut(translated, left)
            if self.gate is not None:
                if deadline_cut:
                    self.gate.abandoned()
                else:
                    self.gate.failed(translated)
            if translated is exc:
                raise
            raise translated from exc
        except BaseException as exc:  # e.g. a missing ssl file, Ctrl-C: not the server's doing
            self._abandon(exc)
            raise
        if self.gate is not None:
            self.gate.succeeded()
        return conn

    def _abandon(self, exc: BaseException) -> None:
        """An attempt ended by something that says nothing about the server."""
        if self.gate is not None:
            self.gate.abandoned()
        errors.redact_exception(exc, self.kwargs.get("password"))

    def translate(self, exc: BaseException, during_connect: bool = False,
                  extra: Optional[Dict[str, Any]] = None) -> BaseException:
        """The actionable form of ``exc`` for this destination, with server numbers when the
        error is about server capacity and another pooled connection can still ask."""
        code = exc.args[0] if getattr(exc, "args", None) else None
        if self.server_facts is not None and code in SERVER_FACT_CODES:
            extra = {**self.server_facts(), **(extra or {})}
        return errors.translate(exc, host=self.host, port=self.port or None, extra=extra,
                                password=self.kwargs.get("password"),
                                during_connect=during_connect)
