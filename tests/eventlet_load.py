"""Run as a script by tests/test_gevent.py: green threads hammering a pool under eventlet.

``python -m tests.eventlet_load ORDER FRONT URL``, as tests/gevent_load.py but with
``eventlet.monkey_patch()`` (eventlet is in bugfix-only maintenance; connguard supports it as
far as it still runs PyMySQL). Prints one JSON line: errors, checkouts done, seconds, the
hub's worst lag (a ticker green thread: eventlet has no monitor thread).
"""

from __future__ import annotations

import json
import sys
import warnings
from typing import Any, Dict, List


def main(order: str, front: str, url: str) -> Dict[str, Any]:
    warnings.simplefilter("ignore")  # eventlet's deprecation notice
    if order == "import-first":
        import connguard  # noqa: F401 - the point: imported before the patch
        import connguard.sqlalchemy_plugin  # noqa: F401
    import eventlet
    import eventlet.patcher

    eventlet.monkey_patch()
    from tests.gevent_load import _front, hammer

    def wait_all(threads: List[Any]) -> None:
        for thread in threads:
            thread.wait()

    result = hammer(_front(front, url), eventlet.spawn, eventlet.sleep, wait_all)
    result["patched"] = eventlet.patcher.is_monkey_patched("thread")
    return result


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])), flush=True)
