"""census() and own_sockets() against real loopback sockets, checked with ``ss``."""

import errno
import importlib
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import pytest

from connguard.census import Impl, NetlinkUnavailable, census, local_port_range, own_sockets
from connguard.tcpstates import STATE_NAMES

# connguard.census is also the public function of that name: reach the module itself.
census_module = importlib.import_module("connguard.census")

IMPLS: List[Impl] = ["netlink", "proc"]
SS = shutil.which("ss")
needs_ss = pytest.mark.skipif(SS is None, reason="ss (iproute2) not installed")

# How many client sockets of each kind the big scenario makes toward the destination.
N_ESTABLISHED = 150
N_CLOSE_WAIT = 100
N_TIME_WAIT = 100
N_MAPPED = 20  # IPv6 sockets talking to ::ffff:127.0.0.1
N_DECOY = 30  # same port, other address (127.0.0.2): must not be counted

# ss prints state names its own way.
SS_STATES = {
    "ESTAB": "established",
    "SYN-SENT": "syn_sent",
    "SYN-RECV": "syn_recv",
    "FIN-WAIT-1": "fin_wait1",
    "FIN-WAIT-2": "fin_wait2",
    "TIME-WAIT": "time_wait",
    "UNCONN": "close",
    "CLOSE-WAIT": "close_wait",
    "LAST-ACK": "last_ack",
    "LISTEN": "listen",
    "CLOSING": "closing",
}


def counts(**nonzero: int) -> Dict[str, int]:
    """A census-shaped result: every state name, zero unless given."""
    result = dict.fromkeys(STATE_NAMES.values(), 0)
    result.update(nonzero)
    return result


def ss_census(destination: str) -> Dict[str, int]:
    """What ``ss`` counts toward ``destination`` ("127.0.0.1:PORT" or "[::1]:PORT")."""
    assert SS is not None
    output = subprocess.run(
        [SS, "-tanH", "state", "all", "dst", destination],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    result = counts()
    for line in output.splitlines():
        if line.strip():
            result[SS_STATES[line.split()[0]]] += 1
    return result


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.01)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def ipv6_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


def fresh_listener(host: str, stack: ExitStack, port: int = 0) -> socket.socket:
    """A listening socket owned by ``stack``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
    listener.bind((host, port))
    listener.listen(512)
    return listener


class Destination:
    """A listener on 127.0.0.1:PORT, a decoy on 127.0.0.2:PORT, and sockets toward them.

    Every socket is registered with an ExitStack, so one close() releases all of them.
    """

    def __init__(self, stack: ExitStack) -> None:
        self.stack = stack
        self.listener, self.decoy = self._bind_pair()
        self.port: int = self.listener.getsockname()[1]

    def _bind_pair(self) -> Tuple[socket.socket, socket.socket]:
        # Retry until the port is also free on 127.0.0.2 and nothing (e.g. old TIME_WAIT
        # sockets from an earlier listener on this port) already points at it.
        for _ in range(20):
            with ExitStack() as attempt:
                listener = fresh_listener("127.0.0.1", attempt)
                port = listener.getsockname()[1]
                try:
                    decoy = fresh_listener("127.0.0.2", attempt, port)
                except OSError as err:
                    if err.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                        continue
                    raise
                if SS is not None and any(ss_census(f"127.0.0.1:{port}").values()):
                    continue
                self.stack.enter_context(attempt.pop_all())
                return listener, decoy
        raise AssertionError("no usable listener port in 20 attempts")

    def connect(
        self, family: int = socket.AF_INET, address: str = "127.0.0.1"
    ) -> Tuple[socket.socket, socket.socket]:
        """Open one connection; return (client, accepted server side), both stack-owned."""
        listener = self.decoy if address == "127.0.0.2" else self.listener
        client = self.stack.enter_context(socket.socket(family, socket.SOCK_STREAM))
        client.settimeout(5)
        client.connect((address, self.port))
        server, _ = listener.accept()
        self.stack.enter_context(server)
        server.settimeout(5)
        return client, server

    def established(
        self, n: int, family: int = socket.AF_INET, address: str = "127.0.0.1"
    ) -> None:
        for _ in range(n):
            self.connect(family, address)

    def close_wait(self, n: int) -> None:
        """Server closes, client does not: the client sits in CLOSE_WAIT."""
        for _ in range(n):
            client, server = self.connect()
            server.close()
            assert client.recv(1) == b""  # the FIN has arrived

    def time_wait(self, n: int) -> None:
        """Client closes first, then the server: the client keeps the TIME_WAIT."""
        for _ in range(n):
            client, server = self.connect()
            client.close()
            assert server.recv(1) == b""  # the client's FIN has arrived
            server.close()


Populated = Tuple[Destination, Dict[str, int]]


@pytest.fixture
def no_fd_leak() -> Iterator[None]:
    before = fd_count()
    yield
    assert fd_count() == before, "file descriptors leaked"


@pytest.fixture
def destination(no_fd_leak: None) -> Iterator[Destination]:
    with ExitStack() as stack:
        yield Destination(stack)


@pytest.fixture
def populated(destination: Destination) -> Populated:
    """The destination with hundreds of sockets in several states; the expected census."""
    destination.established(N_ESTABLISHED)
    destination.close_wait(N_CLOSE_WAIT)
    destination.established(N_DECOY, address="127.0.0.2")
    mapped = N_MAPPED if ipv6_available() else 0
    destination.established(mapped, family=socket.AF_INET6, address="::ffff:127.0.0.1")
    # Last, so that no later connect() toward the port can recycle one of them.
    destination.time_wait(N_TIME_WAIT)
    expected = counts(
        established=N_ESTABLISHED + mapped, close_wait=N_CLOSE_WAIT, time_wait=N_TIME_WAIT
    )
    # The last server-side closes may still be in flight: wait for the kernel to settle,
    # judged by ss when we have it.
    if SS is not None:
        wait_for(lambda: ss_census(f"127.0.0.1:{destination.port}") == expected)
    else:
        wait_for(lambda: census("127.0.0.1", destination.port, impl="proc") == expected)
    return destination, expected


@pytest.mark.parametrize("impl", IMPLS)
def test_census_counts_every_state(populated: Populated, impl: Impl) -> None:
    destination, expected = populated
    assert census("127.0.0.1", destination.port, impl=impl) == expected


@needs_ss
def test_census_agrees_with_ss_and_between_impls(
    populated: Populated,
) -> None:
    destination, _ = populated
    target = f"127.0.0.1:{destination.port}"
    seen_by_ss = ss_census(target)
    by_netlink = census("127.0.0.1", destination.port, impl="netlink")
    by_proc = census("127.0.0.1", destination.port, impl="proc")
    assert ss_census(target) == seen_by_ss, "sockets changed state during the comparison"
    assert by_netlink == seen_by_ss
    assert by_proc == seen_by_ss
    assert census("127.0.0.1", destination.port) == by_netlink  # auto


@pytest.mark.parametrize("impl", IMPLS)
def test_census_filters_by_address(populated: Populated, impl: Impl) -> None:
    destination, expected = populated
    port = destination.port
    decoys = counts(established=N_DECOY)
    assert census("127.0.0.2", port, impl=impl) == decoys
    assert census("127.0.0.3", port, impl=impl) == counts()
    # IPv4 given in its mapped IPv6 spelling matches the same sockets.
    assert census("::ffff:127.0.0.1", port, impl=impl) == expected
    # No address filter: both the real and the decoy destination, nothing on other ports.
    everything = {k: expected[k] + decoys[k] for k in expected}
    assert census(None, port, impl=impl) == everything


@pytest.mark.parametrize("impl", IMPLS)
def test_census_sees_other_processes(destination: Destination, impl: Impl) -> None:
    # A child's connection counts in the namespace-wide census but is not one of ours.
    code = (
        "import socket, sys\n"
        f"s = socket.create_connection(('127.0.0.1', {destination.port}))\n"
        "print('connected', flush=True)\n"
        "sys.stdin.read()\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as child:
        assert child.stdout is not None and child.stdin is not None
        try:
            assert child.stdout.readline().strip() == "connected"
            server, _ = destination.listener.accept()
            destination.stack.enter_context(server)
            assert census("127.0.0.1", destination.port, impl=impl) == counts(
                established=1
            )
            assert own_sockets(destination.port, impl=impl) == counts()
        finally:
            child.stdin.close()
            child.wait(timeout=30)
            child.stdout.close()


@pytest.mark.parametrize("impl", IMPLS)
def test_own_sockets(populated: Populated, impl: Impl) -> None:
    destination, expected = populated
    port = destination.port
    # TIME_WAIT sockets belong to no process any more, so they are not "ours".
    mine = dict(expected, time_wait=0)
    assert own_sockets(port, "127.0.0.1", impl=impl) == mine
    with_decoys = dict(mine, established=mine["established"] + N_DECOY)
    assert own_sockets(port, impl=impl) == with_decoys
    everything = own_sockets(impl=impl)
    # Our server sides are ours too (their remote port is the client's), and both listeners.
    assert everything["established"] >= 2 * with_decoys["established"]
    assert everything["listen"] >= 2


@needs_ss
@pytest.mark.skipif(not ipv6_available(), reason="no IPv6 loopback")
@pytest.mark.parametrize("impl", IMPLS)
def test_census_ipv6(no_fd_leak: None, impl: Impl) -> None:
    with ExitStack() as stack:
        listener = fresh_listener("::1", stack)
        port = listener.getsockname()[1]
        for _ in range(5):
            stack.enter_context(socket.create_connection(("::1", port)))
            stack.enter_context(listener.accept()[0])
        expected = ss_census(f"[::1]:{port}")
        assert expected == counts(established=5)
        assert census("::1", port, impl=impl) == expected
        assert census("127.0.0.1", port, impl=impl) == counts()


def test_netlink_missing_falls_back_to_proc(
    populated: Populated, monkeypatch: pytest.MonkeyPatch
) -> None:
    destination, expected = populated

    def refuse() -> socket.socket:
        raise NetlinkUnavailable(errno.EACCES, "netlink forbidden here")

    monkeypatch.setattr(census_module, "_open_diag_socket", refuse)
    assert census("127.0.0.1", destination.port) == expected
    assert own_sockets(destination.port, "127.0.0.1")["close_wait"] == N_CLOSE_WAIT
    with pytest.raises(NetlinkUnavailable):
        census("127.0.0.1", destination.port, impl="netlink")


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        census("127.0.0.1", 0)
    with pytest.raises(ValueError):
        census("127.0.0.1", 70000)
    with pytest.raises(ValueError):
        census("127.0.0.1", 3306, impl="psutil")  # type: ignore[arg-type]


def test_local_port_range() -> None:
    low, high = local_port_range()
    with open("/proc/sys/net/ipv4/ip_local_port_range") as handle:
        assert [low, high] == [int(word) for word in handle.read().split()]
    assert 0 < low <= high < 65536


def test_names_cover_every_kernel_state() -> None:
    found: List[Optional[str]] = [STATE_NAMES.get(n) for n in range(1, 12)]
    assert None not in found
    assert len(set(found)) == 11
