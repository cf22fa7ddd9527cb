"""Admission: may a pool open one more connection now, and what does a refusal mean?

Both pools ask the same object: :class:`connguard.Pool` and the SQLAlchemy plugin's
:class:`~connguard.sqlalchemy_pool.GuardedQueuePool`. Each keeps its own bookkeeping (idle
queue, connections in use, waiting callers: SQLAlchemy's ``_do_get``/``_do_return_conn``
split) and calls :class:`Admission` under its own lock with the counts it holds:

* :meth:`~Admission.may_open`: growth up to the pool's limit, at most ``max_handshakes``
  connects at once, and the ceilings learnt from the server ("too many connections") and
  from a global budget (no lease to be had);
* :meth:`~Admission.pause`: how long a waiting caller sleeps before it asks again (its
  deadline, or the next ceiling probe);
* :meth:`~Admission.opened` / :meth:`~Admission.refused`: what a connect's outcome
  teaches; ``refused`` says whether the caller should wait (the server is full, no lease:
  a connection coming back or the next probe will serve it) instead of getting the error.

The connect gate (:mod:`connguard.storm`) decides the other half, per destination: when an
attempt may go out at all (backoff, breaker, rate while failing).
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Optional, Tuple

from connguard import coordination, errors
from connguard.storm import CAPACITY_CODES, MAX_PAUSE, Ceiling, StormPolicy

log = logging.getLogger("connguard.admission")

#: Ceiling probe interval when storm control is off (no policy).
PROBE_WITHOUT_POLICY = 1.0
#: How long past its own timeout a caller held back only by the handshake cap may wait.
HANDSHAKE_GRACE = 1.0
#: The shortest a waiting caller sleeps when a probe is due but something else (the
#: handshake cap) holds it back: it looks again after this, not in a busy loop.
MIN_PAUSE = 0.01


def capacity_code(exc: BaseException) -> Optional[int]:
    """The MySQL code when ``exc`` says the server is full (1040, 1135, 1203, 1226), else None.

    Works for connguard's translated errors and the driver's own (the code is ``args[0]``),
    and for an error that gave up waiting after such a refusal (``CircuitOpen``, or
    ``ServerUnavailable`` at a caller's deadline), whose ``last_cause`` is the refusal.
    """
    cause = getattr(exc, "last_cause", None)
    if isinstance(exc, errors.ConnGuardError) and cause is not None and cause is not exc:
        return capacity_code(cause)
    code = exc.args[0] if isinstance(exc, Exception) and exc.args else None
    return code if isinstance(code, int) and code in CAPACITY_CODES else None


@dataclasses.dataclass
class Admission:
    """The growth policy of one pool. Not thread-safe: the pool calls it under its lock.

    ``limit``: connections the pool may hold at once (size + overflow; ``inf`` unlimited).
    ``max_handshakes``: connects running at once. ``budget``: the pool takes a lease from a
    global budget before each connect (adds the lease ceiling).
    """

    limit: float
    max_handshakes: float
    ceiling: Ceiling
    lease_ceiling: Optional[Ceiling] = None
    #: The refusal that keeps the pool from growing (server full, no lease), for the
    #: timeout error; cleared by the next successful connect.
    last_refusal: Optional[BaseException] = None

    @classmethod
    def for_policy(cls, policy: Optional[StormPolicy], limit: float,
                   budget: bool = False) -> Admission:
        """The admission of a pool with storm ``policy`` (None: storm control off, so no
        handshake cap) holding at most ``limit`` connections."""
        return cls(limit=limit,
                   max_handshakes=policy.max_handshakes if policy else sys.maxsize,
                   ceiling=Ceiling(policy.ceiling_probe if policy else PROBE_WITHOUT_POLICY),
                   lease_ceiling=Ceiling(coordination.LEASE_PROBE) if budget else None)

    def may_open(self, held: int, opening: int, now: float) -> bool:
        """May one more connection be opened now, with ``held`` connections (idle, in use
        and being opened) and ``opening`` handshakes running? Consumes a ceiling probe."""
        return (held < self.limit and opening < self.max_handshakes
                and (self.lease_ceiling is None or self.lease_ceiling.allows(held, now))
                and self.ceiling.allows(held, now))

    def handshakes_only(self, held: int, opening: int, overrun: float = 0.0) -> bool:
        """Is the handshake cap all that keeps the pool from growing? Then a caller waits
        for a handshake to finish even past its own timeout (0 included), ``overrun``
        seconds so far, up to HANDSHAKE_GRACE: a server that answers must not turn a cold
        start into errors (the pool asks only while its connects succeed; see
        ``ConnectGate.failing``), and a queue of slow handshakes must not hold callers
        without bound."""
        return (overrun < HANDSHAKE_GRACE and held < self.limit
                and opening >= self.max_handshakes
                and self.ceiling.value is None
                and (self.lease_ceiling is None or self.lease_ceiling.value is None))

    def time_left(self, deadline: float, now: float, held: int, opening: int,
                  server_failing: bool, growing: bool = True) -> Optional[float]:
        """How long a waiting caller may wait now: until its ``deadline``; past it, a
        MAX_PAUSE at a time (a finished handshake wakes it earlier) while only the handshake
        cap holds it back from a server that answers (see :meth:`handshakes_only`); None when
        its time is up. ``growing=False``: a reconnect in place (the pool does not grow), for
        which only the cap and the grace count."""
        remaining = deadline - now
        if remaining > 0:
            return remaining
        overrun = -remaining
        if server_failing or overrun >= HANDSHAKE_GRACE or (
                growing and not self.handshakes_only(held, opening, overrun)):
            return None
        return MAX_PAUSE

    def next_probe(self, now: float) -> Optional[float]:
        """Seconds until a ceiling lets one more connect try, if one holds."""
        times = [t for t in (self.ceiling.seconds_to_probe(now),
                             self.lease_ceiling.seconds_to_probe(now)
                             if self.lease_ceiling is not None else None) if t is not None]
        return min(times) if times else None

    def pause(self, remaining: float, now: float) -> Optional[float]:
        """How long a caller with ``remaining`` seconds left sleeps before asking again
        (a returned connection or a freed slot wakes it earlier); None: until woken."""
        probe_in = self.next_probe(now)
        wait = remaining if probe_in is None else min(remaining, max(probe_in, MIN_PAUSE))
        return None if wait == float("inf") else wait

    def opened(self, held: int) -> None:
        """A connect succeeded and the pool now holds ``held``: ceilings rise with it."""
        self.ceiling.grew(held, self.limit)
        if self.lease_ceiling is not None:
            self.lease_ceiling.lift()
        self.last_refusal = None

    def refusal_text(self) -> Optional[str]:
        """What keeps the pool from growing, in a phrase for a timeout message."""
        exc = self.last_refusal
        if exc is None:
            return None
        code = capacity_code(exc)
        if code is not None:
            return f"the server refused a new connection with {code} ({errors.summary(exc)})"
        return f"no connection lease ({errors.summary(exc)})"

    def refused(self, exc: BaseException, held: int, now: float) -> Tuple[bool, Optional[str]]:
        """A connect failed with ``exc``; the pool (its slot freed) holds ``held``.

        Returns (wait, news): ``wait`` when the caller should wait for a returned connection
        or the next probe instead of getting ``exc``: the server is full and the pool holds
        connections that will come back (the ceiling now holds at ``held``), or the global
        budget has no lease (or its coordinator is down while the pool holds connections:
        failing closed). ``news``: a line for the log,
        once per ceiling learnt, for the pool to write after it leaves its lock.
        """
        if isinstance(exc, (coordination.LeaseUnavailable,
                            coordination.CoordinatorUnavailable)):
            if self.lease_ceiling is None:
                # Not the budget's answer (the shared gate's coordinator is down, failing
                # closed): nothing would hold the next attempt back, so no wait.
                return False, None
            wait = isinstance(exc, coordination.LeaseUnavailable) or held > 0
            if wait:
                # Hold at what the pool has; ask again after the coordinator's hint.
                retry = max(float(getattr(exc, "retry_after", 0.0) or 0.0), 0.05)
                self.lease_ceiling.hit(held, now, retry)
                self.last_refusal = exc
            return wait, None
        code = capacity_code(exc)
        if code is None or held == 0:
            # Holding nothing, nothing would come back to a waiting caller: the server's own
            # answer (translated, with its numbers) now beats a timeout later.
            return False, None
        first = self.ceiling.value is None
        self.ceiling.hit(held, now)
        self.last_refusal = exc
        news = (f"the server refused connection {held + 1} with {code}: holding at {held} "
                f"until the next probe in {self.ceiling.probe_interval:.1f} s"
                if first else None)
        return True, news
