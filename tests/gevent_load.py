"""Run as a script by tests/test_gevent.py: greenlets hammering a pool in a patched process.

``python -m tests.gevent_load ORDER FRONT URL`` where ORDER is ``import-first`` (connguard
imported before ``gevent.monkey.patch_all()``, gunicorn ``--preload``'s order) or
``patch-first``, and FRONT is ``pool`` (``connguard.Pool``), ``connect`` (the drop-in
``connguard.connect``) or ``plugin`` (``create_engine(url, plugins=["connguard"])``).
Prints one JSON line: errors, checkouts done, seconds, the hub's worst lag. Monkey patching is
process-wide, hence a process per case; the caller's timeout turns a hang into a failure.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any, Callable, Dict, List
from urllib.parse import unquote, urlsplit

GREENLETS = 200
POOL_SIZE = 10
ROUNDS = 5
#: The hub is sampled every TICK seconds; a late tick is time the hub could not run.
TICK = 0.005
#: Seconds a greenlet may run without yielding before gevent's monitor reports it.
MAX_BLOCKING = 0.05


def main(order: str, front: str, url: str) -> Dict[str, Any]:
    if order == "import-first":
        import connguard  # noqa: F401 - the point: imported before the patch
        import connguard.sqlalchemy_plugin  # noqa: F401
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import gevent.events
    import zope.event

    # gevent's monitor thread reports any greenlet that runs MAX_BLOCKING seconds without
    # yielding to the hub; the ticker greenlet measures how late the hub serves it.
    blocked: List[str] = []
    gevent.config.max_blocking_time = MAX_BLOCKING
    zope.event.subscribers.append(
        lambda event: blocked.append("".join(event.info[:8]))
        if isinstance(event, gevent.events.EventLoopBlocked) else None)
    gevent.get_hub().start_periodic_monitoring_thread()

    result = hammer(_front(front, url), gevent.spawn, gevent.sleep, gevent.joinall)
    result.update(blocked=len(blocked), first_block=blocked[:1],
                  patched=monkey.is_module_patched("threading"))
    return result


def hammer(checkout: Callable[[], None], spawn: Callable[..., Any],
           sleep: Callable[[float], None],
           wait_all: Callable[[List[Any]], None]) -> Dict[str, Any]:
    """GREENLETS green threads doing ROUNDS checkouts each, on the hub that ``spawn`` and
    ``sleep`` belong to (gevent's or eventlet's), with a ticker measuring the hub's lag:
    errors, checkouts done, seconds, the worst lag."""
    checkout()  # imports and first-use setup belong to start-up, not to the load
    lags: List[float] = []
    done = [0]
    errors: List[str] = []

    def ticker() -> None:
        while True:
            before = time.monotonic()
            sleep(TICK)
            lags.append(time.monotonic() - before - TICK)

    def worker() -> None:
        for _ in range(ROUNDS):
            try:
                checkout()
                done[0] += 1
            except Exception:  # noqa: BLE001 - counted and shown, the test asserts none
                errors.append(traceback.format_exc(limit=3))

    tick = spawn(ticker)
    began = time.monotonic()
    wait_all([spawn(worker) for _ in range(GREENLETS)])
    seconds = time.monotonic() - began
    tick.kill()
    return {"errors": len(errors), "first_error": errors[:1], "done": done[0],
            "seconds": round(seconds, 3), "max_lag": round(max(lags, default=0.0), 4)}


def _front(front: str, url: str) -> Callable[[], None]:
    if front == "plugin":
        import sqlalchemy

        engine = sqlalchemy.create_engine(url, plugins=["connguard"], pool_size=POOL_SIZE,
                                          max_overflow=0, pool_timeout=30)

        def plugin_query() -> None:
            with engine.connect() as conn:
                assert conn.exec_driver_sql("SELECT 1").scalar() == 1
        return plugin_query
    import connguard

    kwargs = _connect_kwargs(url)
    if front == "pool":
        pool = connguard.Pool(max_size=POOL_SIZE, checkout_timeout=30, **kwargs)
        return lambda: _query(pool.connect())
    if front == "connect":
        connguard.configure(max_size=POOL_SIZE, max_overflow=0, checkout_timeout=30)
        return lambda: _query(connguard.connect(**kwargs))
    raise SystemExit(f"front must be pool, connect or plugin, got {front!r}")


def _query(conn: Any) -> None:
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


def _connect_kwargs(url: str) -> Dict[str, Any]:
    parts = urlsplit(url)
    return dict(host=parts.hostname, port=parts.port, user=unquote(parts.username or ""),
                password=unquote(parts.password or ""), database=parts.path.lstrip("/"),
                connect_timeout=10)


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
