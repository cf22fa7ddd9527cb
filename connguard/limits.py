"""The kernel and process limits that bound how many connections we can open, and how fast.

Two resources run out under connection churn: ephemeral ports toward one destination
(each closed connection parks its port in TIME_WAIT for 60 s on the side that closed first)
and file descriptors.  :func:`limits` gathers the numbers that decide both; every value is
``None`` when its source is missing (another OS, a sandbox hiding ``/proc``), never an error.
"""

import os
import resource
from typing import Any, Dict, List, Optional, Tuple

from connguard.census import local_port_range

# Linux's TIME_WAIT length is the compile-time constant TCP_TIMEWAIT_LEN (60 s); no sysctl
# changes it (tcp_fin_timeout governs FIN_WAIT2, not TIME_WAIT).
TIME_WAIT_SECONDS = 60

_FD_DIR = "/proc/self/fd"
_SYSCTLS = {
    "tcp_tw_reuse": "/proc/sys/net/ipv4/tcp_tw_reuse",
    "tcp_fin_timeout": "/proc/sys/net/ipv4/tcp_fin_timeout",
    "tcp_max_tw_buckets": "/proc/sys/net/ipv4/tcp_max_tw_buckets",
    "somaxconn": "/proc/sys/net/core/somaxconn",
    "file_max": "/proc/sys/fs/file-max",
    "nr_open": "/proc/sys/fs/nr_open",
}
_FILE_NR = "/proc/sys/fs/file-nr"


def _read_ints(path: str) -> Optional[List[int]]:
    """The whitespace-separated integers in ``path``; None if it is missing or unreadable."""
    try:
        with open(path, encoding="ascii") as handle:
            return [int(word) for word in handle.read().split()]
    except (OSError, ValueError):
        return None


def _read_int(path: str) -> Optional[int]:
    """The single integer in ``path``; None if it is missing or unreadable."""
    values = _read_ints(path)
    return values[0] if values else None


def _port_range() -> Optional[Tuple[int, int]]:
    """The ephemeral port range, or None if it cannot be read."""
    try:
        return local_port_range()
    except (OSError, ValueError):
        return None


def _file_nr() -> Optional[Tuple[int, int]]:
    """System-wide (allocated, max) file handles from ``fs/file-nr``.

    The file holds three numbers: allocated, free (always 0 since Linux 2.6), max.
    """
    values = _read_ints(_FILE_NR)
    if values is None or len(values) < 3:
        return None
    return values[0], values[2]


def fds_in_use() -> Optional[int]:
    """How many file descriptors this process has open; None without ``/proc``.

    The listing opens a descriptor of its own on the directory, which appears in the
    listing; it is not counted.
    """
    try:
        return len(os.listdir(_FD_DIR)) - 1
    except OSError:
        return None


def max_connect_rate(port_range_size: Optional[int]) -> Optional[float]:
    """Sustainable new connections per second toward one destination (ip, port).

    Every connection we close first holds its local port in TIME_WAIT for 60 s, so at most
    ``port_range_size`` of them fit in any 60 s window.  (``tcp_tw_reuse`` can let connect()
    reuse such a port early; this is the rate that needs no such help.)
    """
    if not port_range_size:
        return None
    return port_range_size / TIME_WAIT_SECONDS


def limits() -> Dict[str, Any]:
    """A snapshot of the limits that bound connection churn; missing sources read None.

    Keys: ``port_range`` (low, high), ``port_range_size``, ``tcp_tw_reuse``,
    ``tcp_fin_timeout``, ``tcp_max_tw_buckets``, ``somaxconn``, ``fd_soft``, ``fd_hard``
    (``resource.RLIM_INFINITY`` when unlimited), ``fd_in_use``, ``file_max``, ``nr_open``,
    ``file_nr`` (allocated, max), ``time_wait_seconds``, ``max_connect_rate`` (per second,
    toward one destination).  The network values are those of the caller's network namespace.
    """
    port_range = _port_range()
    port_range_size = port_range[1] - port_range[0] + 1 if port_range else None
    fd_soft, fd_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    snapshot: Dict[str, Any] = {
        "port_range": port_range,
        "port_range_size": port_range_size,
        "fd_soft": fd_soft,
        "fd_hard": fd_hard,
        "fd_in_use": fds_in_use(),
        "file_nr": _file_nr(),
        "time_wait_seconds": TIME_WAIT_SECONDS,
        "max_connect_rate": max_connect_rate(port_range_size),
    }
    snapshot.update({key: _read_int(path) for key, path in _SYSCTLS.items()})
    return snapshot


def raise_fd_soft_limit() -> Dict[str, int]:
    """Raise this process's RLIMIT_NOFILE soft limit to its hard limit (opt-in).

    Returns ``{"before": soft, "after": soft, "hard": hard}``.  An unlimited hard limit
    (not possible on Linux, where ``fs.nr_open`` caps it) is left alone rather than guessed.
    Raises ``ValueError``/``OSError`` from ``setrlimit`` if the kernel refuses.
    """
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if before != hard and hard != resource.RLIM_INFINITY:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    after, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"before": before, "after": after, "hard": hard}
