"""What the parts of :class:`connguard.sqlalchemy_pool.GuardedQueuePool` share: the state
``GuardedQueuePool.__init__`` sets and the methods one part calls on another, declared for
the type checker only (at run time the parts are plain mixins of the one pool object, so no
call on the checkout path takes a hop more)."""

from __future__ import annotations

import threading
from collections import Counter
from typing import TYPE_CHECKING, Any, Optional

from sqlalchemy.pool import QueuePool

from connguard import coordination
from connguard.admission import Admission
from connguard.clock import Clock
from connguard.metrics import Histogram

# For the type checker the parts are QueuePools (they call its methods and super()'s);
# at run time they are plain classes ahead of QueuePool in GuardedQueuePool's MRO.
_Base: Any = QueuePool if TYPE_CHECKING else object


class GuardedPoolState(_Base):
    """The state every part of the guarded pool reads, and what one part calls on another."""

    if TYPE_CHECKING:
        _clock: Clock
        _cond: threading.Condition
        _opening: int
        _waiting: int
        _in_place_waiting: int
        _local: Any
        _counts: Counter
        _waited: Histogram
        _budget: Optional[coordination.Budget]
        _admission: Admission

        @staticmethod
        def _new_local() -> Any: ...
        def _wait_locked(self, timeout: Optional[float], for_record: bool = ...) -> None: ...
        def _held(self) -> int: ...
        def _max_total(self) -> int: ...
        def _slot_freed(self) -> None: ...
        def _server_failing(self) -> bool: ...
        def _drop_empty(self, record: Any, counted: bool = ...) -> None: ...
        def _timeout_error(self, in_place_refusal: Optional[BaseException] = ...
                           ) -> BaseException: ...
