"""Clients on another host: a network namespace behind a veth pair, and child processes.

Some failures need a client that is not on loopback (MariaDB keeps no host cache for
127.0.0.1, so never blocks it) or a link that can be cut (a partition: no FIN, no RST, just
silence). :func:`veth` makes a namespace reached through a veth pair; :func:`run_child` runs
a function of a test module in a child process (optionally inside that namespace, with
``prefix=["ip", "netns", "exec", ns]``) and brings back its JSON answer.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys
from typing import Any, Iterator, NamedTuple, Sequence

import pytest

from tests.netns import REPO_ROOT

RESULT = "@@PEERS-RESULT@@"

_CHILD = (
    "import importlib, json, sys\n"
    "m = importlib.import_module(sys.argv[1])\n"
    "result = getattr(m, sys.argv[2])(**json.loads(sys.argv[3]))\n"
    f"print({RESULT!r} + json.dumps(result), flush=True)\n"
)


def run_child(module: str, function: str, prefix: Sequence[str] = (), timeout: float = 120,
              **kwargs: Any) -> Any:
    """Run ``module.function(**kwargs)`` in a child; warnings are errors there too (after
    this interpreter's own ``-W`` options)."""
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    options = ["-W", "error", *(f"-W{option}" for option in sys.warnoptions)]
    proc = subprocess.run([*prefix, sys.executable, *options, "-c", _CHILD, module, function,
                           json.dumps(kwargs)], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO_ROOT, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise AssertionError(f"child {function} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


class Veth(NamedTuple):
    namespace: str
    server_ip: str  # this side (the server binds it)
    client_ip: str  # inside the namespace
    link: str  # this side's interface: ``ip link set <link> down`` cuts the namespace off


def _free_link_local_30() -> ipaddress.IPv4Network:
    """A /30 of 169.254.0.0/16 that no interface of this host uses."""
    out = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True,
                         check=True).stdout
    used = [ipaddress.ip_interface(word).network for word in out.split() if "/" in word
            and word[0].isdigit()]
    for _ in range(100):
        third, fourth = random.randint(1, 254), 4 * random.randint(0, 63)
        net = ipaddress.ip_network(f"169.254.{third}.{fourth}/30")
        if not any(net.overlaps(other) for other in used):
            return net
    raise AssertionError("no free /30 in 169.254.0.0/16")


@pytest.fixture
def veth() -> Iterator[Veth]:
    """A network namespace reached from here through a veth pair; removed afterwards."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.fail("this test needs root and iproute2 (ip netns, veth)")
    tag = f"{os.getpid() % 100_000:05d}{random.randrange(16 ** 3):03x}"
    namespace, here, there = f"connguard-{tag}", f"cg{tag}h", f"cg{tag}n"
    net = _free_link_local_30()
    server_ip, client_ip = (str(host) for host in net.hosts())
    steps = [
        ["ip", "netns", "add", namespace],
        ["ip", "link", "add", here, "type", "veth", "peer", "name", there],
        ["ip", "link", "set", there, "netns", namespace],
        ["ip", "addr", "add", f"{server_ip}/30", "dev", here],
        ["ip", "link", "set", here, "up"],
        ["ip", "netns", "exec", namespace, "ip", "addr", "add", f"{client_ip}/30", "dev", there],
        ["ip", "netns", "exec", namespace, "ip", "link", "set", there, "up"],
        ["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"],
    ]
    try:
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True, timeout=30)
        yield Veth(namespace, server_ip, client_ip, here)
    finally:
        # Deleting the namespace deletes its end of the pair, and with it this end.
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", here], capture_output=True, timeout=30)
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True,
                               timeout=30).stdout
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                               timeout=30).stdout
        assert here not in links and namespace not in netns, "veth/netns left behind"
