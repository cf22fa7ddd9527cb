"""connguard under gevent, whichever comes first: ``import connguard`` or ``patch_all()``.

Monkey patching is process-wide, so every case runs in a process of its own: greenlets on a
pool (tests/gevent_load.py), then a real ``gunicorn --preload -k gevent`` serving
tests/gevent_app.py. A hang is a subprocess timeout: the test fails, it never hangs.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, Iterator, List

import pytest

from tests.mariadb import MariaDB, free_port, wait_until
from tests.optional import optional

optional("gevent")
optional("gunicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ORDERS = ["import-first", "patch-first"]
#: Seconds a case may take before it counts as hung (it takes about one).
DEADLINE = 120


def _env(**extra: str) -> Dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def _run_load(module: str, order: str, front: str, mariadb: MariaDB) -> Dict[str, Any]:
    """Run a load script (tests.gevent_load, tests.eventlet_load) in a process of its own:
    its JSON result, after what every hub must show: patched, no error, every checkout done,
    no hang (a subprocess timeout fails the test)."""
    try:
        out = subprocess.run([sys.executable, "-m", module, order, front, mariadb.url()],
                             capture_output=True, text=True, cwd=ROOT, env=_env(),
                             timeout=DEADLINE)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{order} {front}: no answer in {DEADLINE} s (hung): {exc.stderr!r}")
    assert out.returncode == 0, out.stderr[-3000:]
    result: Dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["patched"]
    assert result["errors"] == 0, result["first_error"]
    assert result["done"] == 1000
    return result


@pytest.mark.parametrize("front", ["pool", "connect", "plugin"])
@pytest.mark.parametrize("order", ORDERS)
def test_greenlets_share_a_pool(mariadb: MariaDB, order: str, front: str) -> None:
    """200 greenlets, a pool of 10, five checkout + SELECT 1 + return each: no error, no
    hang, and no greenlet keeps the hub for 50 ms (gevent's monitor thread)."""
    result = _run_load("tests.gevent_load", order, front, mariadb)
    assert result["blocked"] == 0, result["first_block"]


@pytest.mark.parametrize("front", ["pool", "connect", "plugin"])
@pytest.mark.parametrize("order", ORDERS)
def test_eventlet_green_threads_share_a_pool(mariadb: MariaDB, order: str, front: str) -> None:
    """The same load under ``eventlet.monkey_patch()`` (deprecated, bugfix-only, but still
    deployed): no error, no hang, in both orders. Eventlet has no monitor thread; a hub that
    a blocking call held would show as the ticker's lag, bounded generously (a loaded 2-core
    machine delays a tick by tens of ms; a lock taken on the hub would stall it for good)."""
    if importlib.util.find_spec("eventlet") is None:  # not imported here: it is patched
        pytest.skip("optional module eventlet cannot be imported (pip install eventlet)")
    result = _run_load("tests.eventlet_load", order, front, mariadb)
    assert result["max_lag"] < 2.0, result


# -- a real pre-forking server -------------------------------------------------------------------
class Gunicorn:
    """``gunicorn --preload -k gevent -w 2`` on a free port; stopped whatever happens."""

    def __init__(self, url: str, order: str, workdir: str) -> None:
        self.port = free_port()
        self.log_path = os.path.join(workdir, "gunicorn.log")
        cmd = [sys.executable, "-m", "gunicorn", "--preload", "-k", "gevent", "-w", "2",
               "--worker-connections", "100", "-b", f"127.0.0.1:{self.port}",
               "--control-socket", os.path.join(workdir, "gunicorn.ctl"),
               "--graceful-timeout", "5", "tests.gevent_app:app"]
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed by stop()
        self.process = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=self._log,
                                        env=_env(CONNGUARD_TEST_URL=url,
                                                 CONNGUARD_TEST_ORDER=order))

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
        try:
            return get(self.port, "/connect")[0] == 200
        except OSError:
            return False

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()[-4000:]

    def stop(self) -> None:
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(timeout=15)
        finally:
            self._log.close()


def get(port: int, path: str, conn: Any = None) -> tuple:
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        if own:
            conn.close()


@pytest.fixture(params=ORDERS)
def gunicorn(request: pytest.FixtureRequest, mariadb: MariaDB) -> Iterator[Gunicorn]:
    workdir = tempfile.mkdtemp(prefix="connguard-gunicorn-")
    server = Gunicorn(mariadb.url(), request.param, workdir)
    try:
        wait_until(server.ready, 60, message="gunicorn to answer")
        yield server
    finally:
        server.stop()


REQUESTS = 5000
CLIENTS = 50


#: What a request whose query was in flight when its session was KILLed may answer.
LOST = ("2013", "2006", "Lost connection", "gone away", "ConnectionLost", "QueryInterrupted")


@pytest.mark.parametrize("kill", [False, True], ids=["steady", "kill-mid-load"])
def test_gunicorn_preload_gevent_serves_load(gunicorn: Gunicorn, mariadb: MariaDB,
                                             kill: bool) -> None:
    """5,000 requests (half through ``connguard.connect``, half through the plugin engine)
    from 50 keep-alive clients, not one failed; with ``kill``, every pooled server connection
    KILLed a third of the way. A query in flight when its session is killed has an unknown
    outcome (it may have run): it fails as a lost connection, and no pool may replay it. So
    with ``kill``: at most one failed request per killed session, each a lost connection,
    none once the kill is over (idle pooled connections are replaced unseen)."""
    done = [0]
    failures: List[tuple] = []  # (requests done when it failed, what it said)
    counted = threading.Lock()
    killed = threading.Event()
    sessions = [0]  # [sessions killed, requests done when the killing was over]

    def client(n: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", gunicorn.port, timeout=30)
        try:
            for i in range(REQUESTS // CLIENTS):
                path = "/connect" if (n + i) % 2 else "/plugin"
                status, body = get(gunicorn.port, path, conn)
                with counted:
                    done[0] += 1
                    if status != 200:
                        failures.append((done[0], f"{path}: {status} {body[:1500]!r}"))
        finally:
            conn.close()

    def killer() -> None:
        if not kill:
            killed.set()
            return
        wait_until(lambda: done[0] >= REQUESTS // 3, DEADLINE, message="a third of the load")
        sessions[0] = mariadb.kill_app_connections()
        with counted:
            sessions.append(done[0])  # requests done when the last KILL had been sent
        assert sessions[0] > 0
        killed.set()

    began = time.monotonic()
    with ThreadPoolExecutor(CLIENTS + 1) as workers:
        kill_job = workers.submit(killer)
        for future in [workers.submit(client, n) for n in range(CLIENTS)]:
            future.result(timeout=DEADLINE)
        kill_job.result(timeout=DEADLINE)
    seconds = time.monotonic() - began
    assert killed.is_set()
    assert done[0] == REQUESTS
    # Nothing of connguard's died in a worker (a reaper thread's crash leaves only a
    # traceback in the log: the requests still succeed).
    with open(gunicorn.log_path) as f:
        logged = f.read()
    assert "Traceback" not in logged and "Exception in thread" not in logged, logged[-4000:]
    assert seconds < DEADLINE
    if not kill:
        assert failures == [], (failures[:5], gunicorn.log())
        return
    print(f"kill-mid-load: {len(failures)} of {REQUESTS} requests failed, "
          f"{sessions[0]} sessions killed")  # shown with -s: the closing numbers
    lost = [text for _, text in failures if any(mark in text for mark in LOST)]
    assert lost == [text for _, text in failures], (failures[:5], gunicorn.log())
    assert len(failures) <= sessions[0], (len(failures), sessions[0], failures[:5])
    # Recovered: once the last KILL was sent, what was in flight then (a request per client
    # at most) may still fail; no request after it.
    late = [f for f in failures if f[0] > sessions[1] + CLIENTS]
    assert late == [], (late[:5], sessions, gunicorn.log())
