"""Pool policies as small value objects: configured once, validated once, pure to evaluate."""

from __future__ import annotations

import dataclasses
import random
from typing import Any, Callable, Optional, Tuple

# The rules of every option: connguard.options (RESET_MODES re-exported, where it was).
from connguard.options import RESET_MODES, RULES, check_keepalive  # noqa: F401


@dataclasses.dataclass(frozen=True)
class ResetPolicy:
    """What happens to a connection's session when it returns to the pool.

    ``rollback`` (default): roll back only if the server reports an open transaction, and
    restore autocommit if the borrower changed it — zero round trips in the common case.
    ``full``: also COM_RESET_CONNECTION (user variables, temporary tables, session settings
    go back to defaults), one round trip per return. ``none``: trust the borrower.
    """

    mode: str = "rollback"

    def __post_init__(self) -> None:
        RULES["reset"].check("reset", self.mode)


@dataclasses.dataclass(frozen=True)
class LifetimePolicy:
    """When a pooled connection is retired.

    ``max_lifetime`` seconds after it opened, shortened by a random fraction up to ``jitter``
    so connections opened together (after a restart) do not all expire together and reconnect
    as a herd. ``idle_timeout`` caps how long one may sit idle; the pool lowers it below the
    server's ``wait_timeout`` so the server never gets to kill an idle connection first.
    """

    max_lifetime: Optional[float] = 1800.0
    jitter: float = 0.2
    idle_timeout: Optional[float] = 600.0

    def __post_init__(self) -> None:
        RULES["max_lifetime"].check("max_lifetime", self.max_lifetime)
        RULES["idle_timeout"].check("idle_timeout", self.idle_timeout)
        RULES["lifetime_jitter"].check("lifetime_jitter", self.jitter)

    def expiry(self, opened_at: float, rand: Callable[[], float] = random.random) -> float:
        """The monotonic time at which a connection opened at ``opened_at`` retires."""
        if self.max_lifetime is None:
            return float("inf")
        return opened_at + self.max_lifetime * (1.0 - self.jitter * rand())

    def for_server(self, wait_timeout: Optional[float]) -> LifetimePolicy:
        """This policy with idle_timeout kept safely below the server's wait_timeout."""
        if not wait_timeout:
            return self
        # Leave a margin of 10% (at least 1 s, at most 30 s) for clocks and the reaper's period.
        margin = min(30.0, max(1.0, wait_timeout * 0.1))
        limit = max(0.5, wait_timeout - margin)
        if self.idle_timeout is not None and self.idle_timeout <= limit:
            return self
        return dataclasses.replace(self, idle_timeout=limit)


@dataclasses.dataclass(frozen=True)
class PoolSettings:
    """Sizing and waiting: how many connections, and how long a caller waits for one.

    ``max_size`` connections are kept; ``max_overflow`` more may be opened when all are in
    use (-1: no limit), and are closed when they come back, as SQLAlchemy's QueuePool does.
    Drop-in pools default to -1, so unchanged code that holds many connections at once
    never waits where ``pymysql.connect`` would not have."""

    @property
    def limit(self) -> float:
        """How many connections may exist at once."""
        return float("inf") if self.max_overflow < 0 else self.max_size + self.max_overflow

    max_size: int = 10
    max_overflow: int = 0
    min_idle: int = 0
    checkout_timeout: float = 30.0
    leak_threshold: Optional[float] = None

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # every field is the option of its name
            RULES[field.name].check(field.name, getattr(self, field.name))
        if self.min_idle > self.max_size:
            raise ValueError(f"min_idle ({self.min_idle}) must not exceed max_size "
                             f"({self.max_size})")


@dataclasses.dataclass(frozen=True)
class KeepalivePolicy:
    """How fast a pooled connection notices a peer that vanished without FIN or RST.

    TCP keepalive probes an idle connection after ``idle`` seconds, every ``interval``
    seconds, ``count`` times; ``TCP_USER_TIMEOUT`` gives up on unacknowledged data after as
    long. A query waiting on a silent server (a partition, a host that lost power) then
    fails with a transient ``ConnectionLost`` after about ``bound`` seconds (40 by default)
    instead of the kernel's ~15 minutes. A healthy server's kernel answers the probes even
    during a long query, so long queries are not cut short.
    """

    idle: float = 20.0
    interval: float = 5.0
    count: int = 4

    def __post_init__(self) -> None:
        check_keepalive("keepalive", self.idle, self.interval, self.count)

    @property
    def bound(self) -> float:
        return self.idle + self.interval * self.count

    def as_tuple(self) -> Tuple[float, float, int]:
        return (self.idle, self.interval, self.count)


def keepalive_from_option(value: Any) -> Optional[KeepalivePolicy]:
    """``keepalive``: True (the defaults), False/None (the OS defaults: off), or a tuple
    ``(idle, interval, count)``."""
    RULES["keepalive"].check("keepalive", value)
    if value is True:
        return KeepalivePolicy()
    if value is False or value is None:
        return None
    return KeepalivePolicy(*value)
