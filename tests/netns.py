"""Run a test body inside a private network namespace (``unshare -n``).

The namespace has only loopback, which we bring up, and its own ``ip_local_port_range`` and
``tcp_tw_reuse`` (both are per network namespace), so a test can exhaust a range of a few ports
and see errno 99 without touching the host. A mariadbd started inside listens on the
namespace's loopback; the datadir template of the session is reused.

Usage from a test::

    result = run_in_netns("tests.test_harness:body", template, port_range=(40000, 40009),
                          server_options={"max_connections": 100}, kwargs={"n": 20})

``body(server, **kwargs)`` runs in the child and returns something JSON-serialisable.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import traceback
from typing import Any, Dict, Optional, Tuple

import pytest

RESULT_MARKER = "@@NETNS-RESULT@@"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def netns_available() -> Optional[str]:
    """None when namespaces can be made here, else the reason they cannot."""
    if shutil.which("unshare") is None:
        return "unshare not found (util-linux)"
    if shutil.which("ip") is None:
        return "ip not found (iproute2)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare -n failed: {probe.stderr.strip()}"
    return None


def run_in_netns(target: str, template: Any, *, port_range: Optional[Tuple[int, int]] = None,
                 tw_reuse: Optional[int] = None, server_options: Optional[Dict[str, Any]] = None,
                 kwargs: Optional[Dict[str, Any]] = None, timeout: float = 600) -> Any:
    """Run ``module:function`` in a fresh network namespace; return what it returned."""
    reason = netns_available()
    if reason is not None:
        pytest.fail(f"network namespace runner unavailable: {reason}")
    spec = {"target": target, "template_root": template.root, "port_range": port_range,
            "tw_reuse": tw_reuse, "server_options": server_options, "kwargs": kwargs or {}}
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(["unshare", "-n", "--", sys.executable, "-m", "tests.netns"],
                          input=json.dumps(spec), capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise AssertionError(f"netns body {target} failed (exit {proc.returncode}):\n"
                         f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def _write_sysctl(name: str, value: str) -> None:
    with open("/proc/sys/" + name.replace(".", "/"), "w") as f:
        f.write(value)


def _child() -> None:
    from tests.mariadb import MariaDB, Template

    spec = json.loads(sys.stdin.read())
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    if spec["port_range"]:
        low, high = spec["port_range"]
        _write_sysctl("net.ipv4.ip_local_port_range", f"{low} {high}")
    if spec["tw_reuse"] is not None:
        _write_sysctl("net.ipv4.tcp_tw_reuse", str(spec["tw_reuse"]))
    module_name, func_name = spec["target"].split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    server = None
    if spec["server_options"] is not None:
        # The namespace is private, so 3306 is free; it also lies outside any narrow
        # ephemeral range a test sets, which must stay whole for the client's connects.
        server = MariaDB(Template(spec["template_root"]), spec["server_options"],
                         port=3306).start()
    try:
        result = func(server, **spec["kwargs"])
    finally:
        if server is not None:
            server.destroy()
    print(RESULT_MARKER + json.dumps(result), flush=True)


if __name__ == "__main__":
    try:
        _child()
    except BaseException:
        traceback.print_exc()
        sys.exit(1)
