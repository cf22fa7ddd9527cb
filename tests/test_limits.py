"""limits(), fds_in_use() and raise_fd_soft_limit() against the real process and kernel."""

import importlib
import json
import os
import resource
import subprocess
import sys
from typing import List

import pytest

from connguard.limits import (
    TIME_WAIT_SECONDS,
    fds_in_use,
    limits,
    max_connect_rate,
    raise_fd_soft_limit,
)

# connguard.limits is also the public function of that name: reach the module itself.
limits_module = importlib.import_module("connguard.limits")

EXPECTED_KEYS = {
    "port_range",
    "port_range_size",
    "tcp_tw_reuse",
    "tcp_fin_timeout",
    "tcp_max_tw_buckets",
    "somaxconn",
    "fd_soft",
    "fd_hard",
    "fd_in_use",
    "file_max",
    "nr_open",
    "file_nr",
    "time_wait_seconds",
    "max_connect_rate",
}


def read_ints(path: str) -> List[int]:
    with open(path) as handle:
        return [int(word) for word in handle.read().split()]


def test_has_every_key() -> None:
    assert set(limits()) >= EXPECTED_KEYS


def test_fd_limits_match_getrlimit() -> None:
    snapshot = limits()
    assert (snapshot["fd_soft"], snapshot["fd_hard"]) == resource.getrlimit(
        resource.RLIMIT_NOFILE
    )


def test_sysctls_match_proc() -> None:
    snapshot = limits()
    low, high = read_ints("/proc/sys/net/ipv4/ip_local_port_range")
    assert snapshot["port_range"] == (low, high)
    assert snapshot["port_range_size"] == high - low + 1
    assert snapshot["tcp_tw_reuse"] == read_ints("/proc/sys/net/ipv4/tcp_tw_reuse")[0]
    assert snapshot["tcp_fin_timeout"] == read_ints("/proc/sys/net/ipv4/tcp_fin_timeout")[0]
    assert snapshot["somaxconn"] == read_ints("/proc/sys/net/core/somaxconn")[0]
    assert snapshot["file_max"] == read_ints("/proc/sys/fs/file-max")[0]
    allocated, max_files = snapshot["file_nr"]
    assert max_files == read_ints("/proc/sys/fs/file-nr")[2]
    assert allocated > 0


def test_time_wait_and_connect_rate() -> None:
    snapshot = limits()
    assert snapshot["time_wait_seconds"] == TIME_WAIT_SECONDS == 60
    assert snapshot["max_connect_rate"] == pytest.approx(snapshot["port_range_size"] / 60)
    # The default range 32768-60999 sustains about 470 new connections/s per destination.
    assert max_connect_rate(60999 - 32768 + 1) == pytest.approx(470.5, abs=0.1)
    assert max_connect_rate(None) is None
    assert max_connect_rate(0) is None


def test_fds_in_use_counts_an_opened_file() -> None:
    before = fds_in_use()
    assert before is not None and before >= 3  # at least stdin, stdout, stderr
    with open(os.devnull):
        assert fds_in_use() == before + 1
        assert limits()["fd_in_use"] == before + 1
    assert fds_in_use() == before


def test_fds_in_use_matches_an_independent_count() -> None:
    # fstat() every descriptor number up to the highest listed: the ones that answer are open.
    listed = [int(name) for name in os.listdir("/proc/self/fd")]
    open_fds = 0
    for fd in range(max(listed) + 1):
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_fds += 1
    # The listing's own directory descriptor is closed by now, so fstat does not see it.
    assert fds_in_use() == open_fds


def test_missing_files_read_as_none(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "/nonexistent/connguard-test"
    monkeypatch.setattr(limits_module, "_FD_DIR", missing)
    monkeypatch.setattr(limits_module, "_FILE_NR", missing)
    monkeypatch.setattr(
        limits_module, "_SYSCTLS", dict.fromkeys(limits_module._SYSCTLS, missing)
    )
    monkeypatch.setattr(
        limits_module, "local_port_range", lambda: read_ints(missing)  # raises OSError
    )
    snapshot = limits()
    assert set(snapshot) >= EXPECTED_KEYS
    for key in EXPECTED_KEYS - {"fd_soft", "fd_hard", "time_wait_seconds"}:
        assert snapshot[key] is None, key
    assert fds_in_use() is None


def test_raise_fd_soft_limit_in_a_subprocess() -> None:
    # Lowering our own soft limit would be irreversible for this test process's neighbours
    # (other tests), so do it in a child.
    code = (
        "import json, resource\n"
        "from connguard.limits import raise_fd_soft_limit\n"
        "_, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "result = raise_fd_soft_limit()\n"
        "result['now'] = list(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "print(json.dumps(result))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(proc.stdout)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert result["before"] == 64
    assert result["after"] == result["hard"] == hard
    assert result["now"] == [hard, hard]


def test_raise_fd_soft_limit_is_idempotent() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        pytest.skip("soft limit below hard here; covered by the subprocess test")
    assert raise_fd_soft_limit() == {"before": hard, "after": hard, "hard": hard}
