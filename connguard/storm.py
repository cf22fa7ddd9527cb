"""Reconnect-storm control: a connect gate per destination (token bucket, backoff, breaker).

After a restart or a mass KILL every thread of every worker reconnects at once; a server at
``max_connections`` answers each try with 1040 and the client retries in a tight loop. The
gate sits in front of every new connection a pool opens and keeps that loop bounded:

* while attempts fail (and only then: a server that answers is never taxed) a **token
  bucket** caps the connect rate toward one destination (``rate``/s, ``burst``); the first
  success lifts it;
* from the second transient failure in a row the next attempt waits a **backoff with
  jitter** (tenacity's exponential wait plus random jitter);
* after ``breaker_threshold`` outage failures in a row the **breaker** opens: only one
  attempt (the probe) goes out per backoff interval; callers wait for it within their own
  deadline and connect the moment it succeeds, or get
  :class:`~connguard.errors.ServerUnavailable` (last cause, how long connects have failed)
  when their deadline comes first. With ``fail_fast`` they get
  :class:`~connguard.errors.CircuitOpen` at once instead, without touching the network;
* errors that retrying cannot fix (1045 access denied, 1129 host blocked) pass straight
  through and never count: one attempt, one answer.

The pool keeps the other half (handshake cap, adaptive ceiling): see ``connguard/pool.py``.
Clock and sleep are injectable so the policies are tested with a fake clock.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from collections import deque
from typing import (
    Any,
    Deque,
    Dict,
    Hashable,
    Iterable,
    List,
    Optional,
    Tuple,
)

import tenacity  # with the pool, never on a failure: at errno 24 an import has no fd

from connguard import errors, events
from connguard.breaker import (  # noqa: F401 - re-exported: the gate's parts
    CAPACITY_CODES,
    CLOSED,
    HALF_OPEN,
    OPEN,
    PROBE_LAPSE,
    Breaker,
    ReportedFailure,
)
from connguard.clock import Clock, Sleep
from connguard.concurrency import ProcessLock
from connguard.options import HOUR, RULES, check_number
from connguard.storm_report import GateReport
from connguard.storm_shared import SharedGate, SharedHalves  # noqa: F401 - re-exported

log = logging.getLogger("connguard.storm")


@dataclasses.dataclass(frozen=True)
class StormPolicy:
    """How hard a process may knock on one server. Defaults protect a user who sets nothing.

    ``rate``/``burst``: connects per second toward one destination and how many may go at
    once after a quiet spell. ``max_handshakes``: connects one pool runs concurrently.
    ``backoff_initial``/``backoff_max``: the wait after consecutive failures grows from the
    first to the second, plus up to ``backoff_jitter`` seconds at random so processes do not
    retry in step. ``breaker_threshold``: outage failures in a row that open the breaker; it
    stays open for the current backoff, then lets one probe through. ``backoff_max`` also
    bounds how long after a server comes back the first probe finds it (0.2 + up to 0.05 s:
    a restarted server is found within 0.25 s, at about 4.4 attempts/s per process while it
    is down). ``ceiling_probe``: seconds between attempts to grow past a ceiling learnt from
    1040. ``fail_fast``: while the breaker is open, answer callers at once with CircuitOpen
    instead of letting them wait for the next probe within their own timeout.
    ``reconnect_rate``/``reconnect_burst``: how fast connections that died (KILL, a server
    restart, wait_timeout) are replaced, per destination, while the server answers: a mass
    KILL of every connection of every thread turns into a paced trickle (2 at once, then
    20/s: at most 4 in any 100 ms) instead of a burst of handshakes. Growth that replaces
    nothing is not paced.
    """

    rate: float = 10.0
    burst: int = 5
    max_handshakes: int = 4
    backoff_initial: float = 0.1
    backoff_max: float = 0.2
    backoff_jitter: float = 0.05
    breaker_threshold: int = 3
    ceiling_probe: float = 2.0
    fail_fast: bool = False
    reconnect_rate: float = 20.0
    reconnect_burst: int = 2

    def __post_init__(self) -> None:
        # Named as the pool options that set them (max_connect_rate, not rate).
        for option, field in POOL_OPTION_FIELDS.items():
            RULES[option].check(option, getattr(self, field))
        check_number("backoff_jitter", self.backoff_jitter, 0, kind="a number of seconds",
                     maximum=HOUR)

    def backoff(self, failures: int) -> float:
        """Seconds to wait after ``failures`` consecutive failures (>= 1), jitter included."""
        # wait_exponential + wait_random rather than wait_exponential_jitter, whose
        # arguments changed between tenacity releases.
        wait = (tenacity.wait_exponential(multiplier=self.backoff_initial, max=self.backoff_max)
                + tenacity.wait_random(0, self.backoff_jitter))
        state = tenacity.RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = max(1, failures)
        return float(wait(state))


#: Pool options that configure the storm policy, and the StormPolicy field each one sets.
POOL_OPTION_FIELDS = {
    "max_connect_rate": "rate",
    "connect_burst": "burst",
    "max_handshakes": "max_handshakes",
    "backoff_initial": "backoff_initial",
    "backoff_max": "backoff_max",
    "breaker_threshold": "breaker_threshold",
    "ceiling_probe": "ceiling_probe",
    "fail_fast": "fail_fast",
    "reconnect_rate": "reconnect_rate",
    "reconnect_burst": "reconnect_burst",
}


def policy_from_options(options: Dict[str, Any]) -> StormPolicy:
    """A StormPolicy from pool options (``max_connect_rate=20`` ...), defaults elsewhere."""
    return StormPolicy(**{field: options[name] for name, field in POOL_OPTION_FIELDS.items()
                          if name in options})


@dataclasses.dataclass
class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. Pure: the caller passes now."""

    rate: float
    burst: int
    tokens: float = -1.0
    stamp: float = 0.0

    def take(self, now: float) -> float:
        """Take a token; return 0, or the seconds until one is due (nothing taken then)."""
        if self.tokens < 0:  # first use: a full bucket
            self.tokens, self.stamp = float(self.burst), now
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        # The epsilon absorbs float rounding: a refill computed as 0.9999999999 must count
        # as a token, or a caller would sleep for 1e-17 s that the clock cannot even show.
        if self.tokens >= 1.0 - 1e-9:
            self.tokens = max(0.0, self.tokens - 1.0)
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclasses.dataclass
class Ceiling:
    """How many connections the server lets one pool hold, learnt from "too many connections".

    After a 1040/1203 the pool stops growing past what it holds (``value``) and serves
    waiting callers with the connections that come back, so demand above the server's
    capacity turns into waits instead of errors. Every ``probe_interval`` seconds one
    attempt may go one past the ceiling; when it succeeds the ceiling rises by one.
    """

    probe_interval: float
    value: Optional[int] = None
    probe_at: float = 0.0

    def allows(self, count: int, now: float) -> bool:
        """May the pool open one more when it holds/opens ``count``? Consumes a probe."""
        if self.value is None or count < self.value:
            return True
        if count == self.value and now >= self.probe_at:
            self.probe_at = now + self.probe_interval
            return True
        return False

    def hit(self, held: int, now: float, interval: Optional[float] = None) -> None:
        """The server refused one more: hold at ``held`` until the next probe (in
        ``interval`` seconds, default ``probe_interval``)."""
        self.value = held
        self.probe_at = now + (self.probe_interval if interval is None else interval)

    def lift(self) -> None:
        """The limit is gone (e.g. a lease was granted): grow freely again."""
        self.value = None

    def grew(self, held: int, max_size: float) -> None:
        """A connect succeeded with ``held`` now open: lift the ceiling with it."""
        if self.value is not None and held > self.value:
            self.value = None if held >= max_size else held

    def seconds_to_probe(self, now: float) -> Optional[float]:
        return None if self.value is None else max(0.0, self.probe_at - now)


#: Seconds a lost connection stays owed a paced replacement (after that, a new connection is
#: growth again, not a reconnect).
REPLACEMENT_WINDOW = 5.0


#: How often a caller that waits on an event loop looks at the gate again (it cannot be woken
#: by a condition): a probe's success reaches it this much later at most.
ASYNC_POLL = 0.02

#: The longest a waiting caller sleeps before it looks at the breaker again (a probe that
#: never reports, a deadline of "forever").
MAX_PAUSE = 1.0


class ConnectGate(SharedHalves, GateReport):
    """The gate for one destination, shared by every pool of the process that goes there.

    ``sleep``: how a caller waits for its turn. None (the default) waits on a condition
    that the end of every attempt signals, so callers waiting for a probe's outcome go the
    moment it is known; tests pass a fake clock's sleep instead.
    """

    def __init__(self, policy: StormPolicy, host: str = "", port: int = 0,
                 clock: Clock = time.monotonic, sleep: Optional[Sleep] = None,
                 host_gate: Any = None, shared: Iterable[SharedGate] = ()) -> None:
        self.policy = policy
        self.host, self.port = host, port
        self._clock, self._sleep = clock, sleep
        # Re-entrant for its owner check: a wait interrupted by a signal handler's exception
        # may leave the lock released, and _pause must know to take it again (see there).
        self._lock = threading.RLock()
        self._settled = threading.Condition(self._lock)  # an attempt ended
        self._bucket = TokenBucket(policy.rate, policy.burst)
        self._reconnects = TokenBucket(policy.reconnect_rate, policy.reconnect_burst)
        self._owed = 0  # connections lost lately, to be replaced at the reconnect pace
        self._owed_until = 0.0
        self._breaker = Breaker(policy.breaker_threshold)
        self._not_before = 0.0  # backoff after a failure: no attempt before this time
        self._failing_since: Optional[float] = None  # first failure of the current streak
        self._failed_at = 0.0  # the latest failure
        self._announced = False  # the breaker's opening was logged (its closing will be)
        self.reached = False  # a connect succeeded once: failures now mean an outage
        # Shared halves, asked in this order after the local gate: the host-wide file, then
        # the cluster-wide coordinator.
        self._shared: Tuple[SharedGate, ...] = tuple(
            b for b in (host_gate, *shared) if b is not None)
        self.attempts = 0
        self.failures = 0
        self.fast_failures = 0
        self.outage_waits = 0  # callers that waited for a probe instead of failing at once
        self.opens = 0  # times the breaker opened (from closed)
        self.shared_refusals = 0  # fast failures because a shared breaker was open
        # Monotonic times of recent attempts: how a storm (or its absence) looks over time.
        self.attempt_times: Deque[float] = deque(maxlen=1024)

    # -- the protocol the connector follows: admit(), then succeeded() or failed() ----------
    def admit(self, deadline: float, fail_fast: bool = False,
              started: Optional[float] = None, pause: Optional[Sleep] = None) -> bool:
        """Wait for permission to connect; return whether this attempt is the breaker's probe.

        While the breaker is open the caller waits for the next probe and its outcome, up
        to ``deadline``; then (or at once, when the next chance comes after the deadline)
        it gets :class:`~connguard.errors.ServerUnavailable` with the last cause and how
        long connects have been failing. ``fail_fast=True`` answers an open breaker at once
        with :class:`~connguard.errors.CircuitOpen` instead, without touching the network.
        ``started``: when the caller began waiting (its checkout), for the error's
        ``waited``; default now. ``pause``: how this caller waits, when it must not block its
        thread (an event loop's: it sleeps a little at a time, the lock released), instead
        of the gate's condition.
        """
        if started is None:
            started = self._clock()
        waits = [False]  # counted in outage_waits yet (once per call)
        while True:
            probe = self._admit_local(started, deadline, fail_fast, waits, pause)
            shared_open = self._admit_shared(deadline, pause)
            if shared_open is None:
                break
            # Another process found the server down; the local breaker now holds open as
            # long as the shared one: wait for its probe too, unless failing fast.
            if fail_fast:
                raise shared_open
        with self._lock:
            self.attempts += 1
            self.attempt_times.append(self._clock())
        if probe and events.active:
            events.dispatch(None, self._target(), "breaker_half_open",
                            failures=self._breaker.failures)
        return probe

    def _admit_local(self, started: float, deadline: float, fail_fast: bool,
                     waits: List[bool], pause: Optional[Sleep] = None) -> bool:
        """This process's half of admit(): breaker, backoff, bucket, reconnect pace."""
        with self._lock:
            while True:
                now = self._clock()
                allowed, probe = self._breaker.admit(now)
                if not allowed:
                    if fail_fast:
                        self.fast_failures += 1
                        raise self._circuit_open(now)
                    if not waits[0]:
                        self.outage_waits += 1
                        waits[0] = True
                    self._wait_for_probe(now, started, deadline, pause)
                    continue
                # A server that answers is never taxed: the bucket paces attempts only while
                # they fail (an outage, a full server), and relaxes at the first success.
                storming = self._breaker.failures > 0
                wait = max(self._not_before - now, 0.0) or (
                    self._bucket.take(now) if storming else 0.0)
                if wait <= 0 and self._owed and now < self._owed_until:
                    wait = self._replacement_wait(now, deadline)
                if wait <= 0:
                    return probe
                if probe:
                    self._breaker.probing = False  # give the probe back while we wait
                if now + wait > deadline:
                    raise self._unavailable(now, started)
                self._pause(wait, pause)

    def _replacement_wait(self, now: float, deadline: float) -> float:
        """Under the lock: seconds until a replacement may go (0: go now, one owed less).
        A caller whose deadline comes first goes anyway: pacing must not fail it."""
        wait = self._reconnects.take(now)
        if wait <= 0 or now + wait > deadline:
            self._owed -= 1
            return 0.0
        return wait

    def connection_lost(self) -> None:
        """A pool found one of its connections to this destination dead (the server closed
        it): the connect that replaces it is paced by ``reconnect_rate``."""
        with self._lock:
            now = self._clock()
            if now >= self._owed_until:
                self._owed = 0
            self._owed += 1
            self._owed_until = now + REPLACEMENT_WINDOW

    def _wait_for_probe(self, now: float, started: float, deadline: float,
                        pause: Optional[Sleep] = None) -> None:
        """Under the lock: the breaker is open (or its probe is out); wait for the probe's
        turn or outcome, or raise ServerUnavailable if that comes after ``deadline``."""
        breaker = self._breaker
        resume = breaker.open_until if breaker.state == OPEN else deadline
        if resume > deadline or now >= deadline:
            raise self._unavailable(now, started)
        # Bounded by the caller's deadline; an attempt's end wakes everyone earlier.
        self._pause(min(max(resume - now, 0.001), MAX_PAUSE), pause)

    def _pause(self, seconds: float, pause: Optional[Sleep] = None) -> None:
        """Under the lock: let others in for ``seconds`` (or until an attempt ends). A
        caller's own ``pause`` (an event loop's) is not woken by the end of an attempt: it
        looks again every ASYNC_POLL seconds instead."""
        sleep = self._sleep if pause is None else pause
        try:
            if sleep is None:
                self._settled.wait(seconds)
                return
            self._lock.release()
            sleep(seconds if pause is None else min(seconds, ASYNC_POLL))
            self._lock.acquire()
        except BaseException:
            # A signal handler that raises can leave Condition.wait (or the sleep above)
            # without the lock, between its release and its re-acquire: the caller's
            # ``with`` would then release a lock it does not hold.
            if not self._lock._is_owned():  # type: ignore[attr-defined]
                self._lock.acquire()
            raise

    def _release_probe(self) -> None:
        """Under the lock: an attempt ended without a verdict; the next waiter may probe."""
        self._breaker.probing = False
        self._settled.notify_all()

    def succeeded(self) -> None:
        with self._lock:
            announced, since = self._announced, self._failing_since
            self._breaker.succeeded()
            self._not_before = 0.0
            self._failing_since = None
            self._announced = False
            self.reached = True
            self._settled.notify_all()
        if announced and since is not None:
            log.info("connguard: connecting to %s closed the breaker again after %.1f s of "
                     "failures", self._target(), self._clock() - since)
            if events.active:
                events.dispatch(None, self._target(), "breaker_closed", failures=0)
        self._finish_shared("succeeded")

    def abandoned(self) -> None:
        """The attempt ended without an answer from the server (e.g. KeyboardInterrupt)."""
        with self._lock:
            self._release_probe()
        self._finish_shared("abandoned")

    def failed(self, error: BaseException) -> None:
        """Record a failed attempt (``error`` translated). Permanent errors do not count."""
        code = error.args[0] if error.args else None
        kept = errors.detached(error)  # the gate outlives its callers: keep no frame alive
        if errors.is_transient(error) is False:
            with self._lock:
                self._release_probe()
            self._finish_shared("permanent", error)
            return
        with self._lock:
            self.failures += 1
            now = self._clock()
            self._failed_at = now
            if self._failing_since is None:
                self._failing_since = now
            failures = self._breaker.failures + 1
            wait = self.policy.backoff(failures)
            # One failure alone (a dropped SYN, a restart's first refusal) is retried at once,
            # paced by the bucket; backoff starts with the second in a row.
            self._not_before = now + wait if failures >= 2 else 0.0
            opened = False
            if code in CAPACITY_CODES:
                self._breaker.probing = False  # the server is up, only full: no breaker
                self._breaker.failures += 1
                self._breaker.last_error = kept
            else:
                was = self._breaker.state
                self._breaker.failed(now, wait, kept)
                opened = was == CLOSED and self._breaker.state == OPEN
                self._announced = self._announced or opened
                self.opens += opened
            self._settled.notify_all()
        if opened:  # once per outage: re-opening after a failed probe is routine
            log.warning("connguard: breaker open for %s after %d failures in a row (%s); "
                        "one attempt per backoff interval until one succeeds",
                        self._target(), failures, errors.summary(error))
            if events.active:
                events.dispatch(None, self._target(), "breaker_open", failures=failures,
                                cause=errors.redact(errors.summary(error) or ""))
        self._finish_shared("capacity" if code in CAPACITY_CODES else "outage", error)


_gates: Dict[Hashable, ConnectGate] = {}
_gates_lock = ProcessLock()  # re-made after a fork and once threading is patched


def gate_for(host: str, port: int, policy: StormPolicy, host_gate: Any = None,
             shared: Iterable[SharedGate] = ()) -> ConnectGate:
    """The process-wide gate for (destination, policy, shared backends): pools with the same
    policy toward the same server share one bucket and one breaker."""
    shared = tuple(shared)
    # fail_fast is how one pool's callers take an open breaker, not the gate's state: pools
    # that differ only in it share the gate (admit() is told per call).
    policy = dataclasses.replace(policy, fail_fast=False)
    key = (host, port, policy, host_gate.path if host_gate is not None else None,
           tuple(b.key for b in shared))
    with _gates_lock:
        gate = _gates.get(key)
        if gate is None:
            gate = _gates[key] = ConnectGate(policy, host, port, host_gate=host_gate,
                                             shared=shared)
        return gate


def _after_fork_in_child() -> None:
    for gate in _gates.values():
        gate._lock = threading.RLock()
        gate._settled = threading.Condition(gate._lock)
        # A parent thread's probe in flight at fork time never finishes here: without this
        # the child's breaker would stay half-open, refusing every connect, for good.
        breaker = gate._breaker
        if breaker.probing:
            breaker.probing = False
            breaker.state, breaker.open_until = OPEN, 0.0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
