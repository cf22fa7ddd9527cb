"""peer_closed() against real sockets: loopback TCP pairs and AF_UNIX socket pairs."""

import os
import select
import socket
import struct
import time
from typing import Callable, Iterator, Tuple

import pytest

from connguard import tcpstates
from connguard.liveness import Probe, SocketLike, peer_closed, tcp_state

Pair = Tuple[socket.socket, socket.socket]

# Generous: a non-blocking check takes microseconds; a blocking one would take the 5 s
# socket timeout.  The gap leaves room for a loaded CI machine.
NEVER_BLOCKS_BOUND = 1.0


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll ``condition`` until it holds; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.001)


def wait_readable(sock: socket.socket, timeout: float = 5.0) -> None:
    """Block until ``sock`` has something to read, independently of peer_closed()."""
    readable, _, _ = select.select([sock], [], [], timeout)
    assert readable, f"socket not readable within {timeout} s"


def tcp_pair() -> Pair:
    """A connected loopback TCP pair: (client, accepted server side)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        server, _ = listener.accept()
    return client, server


def unix_pair() -> Pair:
    """A connected AF_UNIX stream socket pair."""
    return socket.socketpair()


@pytest.fixture(params=["tcp", "unix"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    """(ours, peer) for each socket kind; both closed afterwards."""
    ours, peer = tcp_pair() if request.param == "tcp" else unix_pair()
    try:
        yield ours, peer
    finally:
        ours.close()
        peer.close()


@pytest.fixture
def tcp() -> Iterator[Pair]:
    """(client, server) loopback TCP pair; both closed afterwards."""
    client, server = tcp_pair()
    try:
        yield client, server
    finally:
        client.close()
        server.close()


def timed_peer_closed(sock: SocketLike) -> bool:
    """Call peer_closed() and assert it returned promptly."""
    started = time.monotonic()
    result = peer_closed(sock)
    elapsed = time.monotonic() - started
    assert elapsed < NEVER_BLOCKS_BOUND, f"peer_closed blocked for {elapsed:.3f} s"
    return result


def test_healthy_idle_connection_is_alive(pair: Pair) -> None:
    ours, peer = pair
    assert peer_closed(ours) is False
    assert peer_closed(peer) is False
    assert peer_closed(ours.fileno()) is False


def test_healthy_tcp_is_established(tcp: Pair) -> None:
    client, server = tcp
    assert tcp_state(client) == tcpstates.ESTABLISHED
    assert tcp_state(server.fileno()) == tcpstates.ESTABLISHED


def test_unix_socket_has_no_tcp_state(pair: Pair) -> None:
    ours, _ = pair
    if ours.family == socket.AF_UNIX:
        assert tcp_state(ours) is None
        assert tcp_state(ours.fileno()) is None
    else:
        assert tcp_state(ours) == tcpstates.ESTABLISHED


def test_peer_shutdown_write_is_seen(pair: Pair) -> None:
    ours, peer = pair
    peer.shutdown(socket.SHUT_WR)
    wait_readable(ours)
    assert peer_closed(ours) is True
    assert peer_closed(ours.fileno()) is True


def test_peer_close_is_seen(pair: Pair) -> None:
    ours, peer = pair
    peer.close()
    wait_readable(ours)
    assert peer_closed(ours) is True


def test_tcp_fin_moves_to_close_wait(tcp: Pair) -> None:
    client, server = tcp
    server.close()
    wait_for(lambda: tcp_state(client) == tcpstates.CLOSE_WAIT)
    assert peer_closed(client) is True
    assert peer_closed(client.fileno()) is True


def test_tcp_fin_is_seen_even_after_eof_was_read(tcp: Pair) -> None:
    # Once the EOF is consumed, the state (CLOSE_WAIT) is what still tells.
    client, server = tcp
    server.close()
    wait_for(lambda: tcp_state(client) == tcpstates.CLOSE_WAIT)
    assert client.recv(1) == b""
    assert tcp_state(client) == tcpstates.CLOSE_WAIT
    assert peer_closed(client) is True


def test_our_own_half_close_is_dead(tcp: Pair) -> None:
    # Nothing is readable after we shut down our sending side; only the state (FIN_WAIT1/2)
    # says this connection can no longer carry a query.
    client, server = tcp
    client.shutdown(socket.SHUT_WR)
    wait_for(lambda: tcp_state(client) == tcpstates.FIN_WAIT2)
    assert select.select([client], [], [], 0)[0] == []
    assert peer_closed(client) is True
    assert peer_closed(client.fileno()) is True


def test_tcp_reset_is_seen(tcp: Pair) -> None:
    client, server = tcp
    # Linger on with a zero timeout makes close() send an RST instead of a FIN.
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()
    wait_for(lambda: tcp_state(client) == tcpstates.CLOSE)
    assert peer_closed(client) is True
    assert peer_closed(client.fileno()) is True


def test_unsolicited_bytes_mean_dead(pair: Pair) -> None:
    ours, peer = pair
    # The shape of a MySQL error packet ("Too many connections") sent before the FIN.
    peer.sendall(b"\x17\x00\x00\x00\xff\x10\x04Too many connections")
    wait_readable(ours)
    if ours.family != socket.AF_UNIX:
        # Still ESTABLISHED: it is the pending bytes alone that give it away.
        assert tcp_state(ours) == tcpstates.ESTABLISHED
    assert peer_closed(ours) is True
    assert peer_closed(ours.fileno()) is True


def test_never_blocks_with_a_socket_timeout(pair: Pair) -> None:
    ours, peer = pair
    ours.settimeout(5)
    assert timed_peer_closed(ours) is False
    assert timed_peer_closed(ours.fileno()) is False
    peer.sendall(b"x")
    wait_readable(ours)
    assert timed_peer_closed(ours) is True
    peer.shutdown(socket.SHUT_WR)
    assert timed_peer_closed(ours) is True
    # The socket is still ours and usable afterwards: the check consumed nothing.
    assert ours.recv(1) == b"x"


def test_checking_a_descriptor_does_not_close_it(tcp: Pair) -> None:
    client, server = tcp
    for _ in range(3):
        assert peer_closed(client.fileno()) is False
    client.sendall(b"ping")
    assert server.recv(4) == b"ping"


def test_closed_socket_is_dead(pair: Pair) -> None:
    ours, _ = pair
    ours.close()
    assert ours.fileno() == -1
    assert timed_peer_closed(ours) is True
    assert tcp_state(ours) is None


def test_closed_descriptor_is_dead(pair: Pair) -> None:
    ours, _ = pair
    fd = os.dup(ours.fileno())
    os.close(fd)
    assert timed_peer_closed(fd) is True
    assert timed_peer_closed(-1) is True
    assert tcp_state(fd) is None


def test_non_socket_descriptor_uses_poll() -> None:
    read_end, write_end = os.pipe()
    try:
        assert peer_closed(read_end) is False
        os.write(write_end, b"x")
        assert peer_closed(read_end) is True
    finally:
        os.close(read_end)
        os.close(write_end)


def test_probe_sees_what_peer_closed_sees(pair: Pair) -> None:
    ours, peer = pair
    ours.settimeout(5)
    probe = Probe()
    assert probe.dead(ours) is False
    assert probe.dead(ours) is False  # cached registration, same answer
    peer.sendall(b"x")
    wait_readable(ours)
    assert probe.dead(ours) is True
    assert ours.recv(1) == b"x"
    assert probe.dead(ours) is False
    peer.close()
    wait_readable(ours)
    assert probe.dead(ours) is True


def test_probe_follows_a_new_socket(tcp: Pair) -> None:
    client, server = tcp
    probe = Probe()
    assert probe.dead(client) is False
    server.close()
    wait_for(lambda: tcp_state(client) == tcpstates.CLOSE_WAIT)
    assert probe.dead(client) is True
    # The driver reconnects: the probe must watch the new descriptor, not the old one.
    fresh_client, fresh_server = tcp_pair()
    try:
        assert probe.dead(fresh_client) is False
        assert probe.dead(client) is True
    finally:
        fresh_client.close()
        fresh_server.close()
    client.close()
    assert probe.dead(client) is True


# -- green hubs: the OS's poll whatever was patched or imported ------------------------------
_GREEN_CHECK = """
import socket, sys, warnings
warnings.simplefilter("ignore")  # eventlet's deprecation notice
{setup}
from connguard.liveness import Probe, peer_closed
a, b = socket.socketpair()
alive = not peer_closed(a) and not Probe().dead(a)
b.close()
print(alive and peer_closed(a) and Probe().dead(a))
"""


@pytest.mark.parametrize("setup", [
    "import gevent.monkey; gevent.monkey.patch_all()",
    "import gevent.monkey",  # imported, never patched
    "import eventlet; eventlet.monkey_patch()",
    # eventlet's patch with gevent.monkey imported by some library (sentry-sdk does, to ask
    # is_object_patched): gevent's get_original read select.poll, which eventlet deleted,
    # and importing connguard raised AttributeError.
    "import eventlet; eventlet.monkey_patch(); import gevent.monkey",
], ids=["gevent", "gevent-imported", "eventlet", "eventlet-and-gevent-imported"])
def test_the_check_works_under_green_hubs(setup: str) -> None:
    import importlib.util
    import subprocess
    import sys

    for module in ("gevent", "eventlet"):  # not imported here: they patch
        if module in setup and importlib.util.find_spec(module) is None:
            pytest.skip(f"optional module {module} cannot be imported (pip install {module})")
    out = subprocess.run([sys.executable, "-c", _GREEN_CHECK.format(setup=setup)],
                         capture_output=True, text=True, timeout=120,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip() == "True", out.stderr[-2000:]
