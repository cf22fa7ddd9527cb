"""Run as a script by tests/test_gevent.py: green threads hammering a pool under eventlet.

``python -m tests.eventlet_load ORDER FRONT URL``, as tests/gevent_load.py but with
``eventlet.monkey_patch()`` (eventlet is in bugfix-only maintenance; connguard supports it as
far as it still runs PyMySQL). Prints one JSON line: errors, checkouts done, seconds, the
hub's worst lag (a ticker green thread: eventlet has no monitor thread).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from typing import Any, Dict, List

GREENLETS = 200
ROUNDS = 5
TICK = 0.005


def main(order: str, front: str, url: str) -> Dict[str, Any]:
    warnings.simplefilter("ignore")  # eventlet's deprecation notice
    if order == "import-first":
        import connguard  # noqa: F401 - the point: imported before the patch
        import connguard.sqlalchemy_plugin  # noqa: F401
    import eventlet
    import eventlet.patcher

    eventlet.monkey_patch()
    from tests.gevent_load import _front

    checkout = _front(front, url)
    checkout()  # first-use setup belongs to start-up, not to the load
    lags: List[float] = []
    done = [0]
    errors: List[str] = []

    def ticker() -> None:
        while True:
            before = time.monotonic()
            eventlet.sleep(TICK)
            lags.append(time.monotonic() - before - TICK)

    def worker() -> None:
        for _ in range(ROUNDS):
            try:
                checkout()
                done[0] += 1
            except Exception:  # noqa: BLE001 - counted and shown, the test asserts none
                errors.append(traceback.format_exc(limit=3))

    tick = eventlet.spawn(ticker)
    began = time.monotonic()
    for thread in [eventlet.spawn(worker) for _ in range(GREENLETS)]:
        thread.wait()
    seconds = time.monotonic() - began
    tick.kill()
    return {"errors": len(errors), "first_error": errors[:1], "done": done[0],
            "seconds": round(seconds, 3), "max_lag": round(max(lags, default=0.0), 4),
            "patched": eventlet.patcher.is_monkey_patched("thread")}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
