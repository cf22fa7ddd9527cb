"""TLS contexts are cached per ssl settings and rebuilt when a certificate, key or CA file
changes (checked at most every TLS_RECHECK seconds): rotated certificates are picked up."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any, Dict

import pytest

from connguard import driver


def _make_ca(directory: str, name: str) -> str:
    """A self-signed CA certificate (PEM) made with the openssl CLI."""
    cert = os.path.join(directory, f"{name}.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-keyout", os.path.join(directory, f"{name}.key"),
                    "-out", cert], check=True, capture_output=True, timeout=120)
    return cert


def _context(sslp: Dict[str, Any]) -> Any:
    conn = driver.GuardedConnection.__new__(driver.GuardedConnection)
    return conn._create_ssl_ctx(sslp)


def _subjects(ctx: Any) -> set:
    return {dict(item[0] for item in cert["subject"])["commonName"]
            for cert in ctx.get_ca_certs()}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_a_rotated_ca_file_gives_a_new_context(tmp_path: Any, monkeypatch: Any) -> None:
    first, second = _make_ca(str(tmp_path), "first-ca"), _make_ca(str(tmp_path), "second-ca")
    live = str(tmp_path / "ca.pem")
    shutil.copy(first, live)
    sslp = {"ca": live, "check_hostname": False}
    clock = [1000.0]
    monkeypatch.setattr(driver.time, "monotonic", lambda: clock[0])
    ctx = _context(sslp)
    assert _subjects(ctx) == {"first-ca"}
    assert _context(sslp) is ctx  # cached

    shutil.copy(second, str(tmp_path / "next.pem"))
    os.replace(str(tmp_path / "next.pem"), live)  # rotated the way deploy tools do it
    clock[0] += 1.0
    assert _context(sslp) is ctx  # not looked at again within TLS_RECHECK
    clock[0] += driver.TLS_RECHECK
    rotated = _context(sslp)
    assert rotated is not ctx and _subjects(rotated) == {"second-ca"}
    clock[0] += driver.TLS_RECHECK
    assert _context(sslp) is rotated  # unchanged files: the same context again


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
def test_a_rotation_caught_half_done_keeps_the_last_good_context(
        tmp_path: Any, monkeypatch: Any, caplog: Any) -> None:
    cert = _make_ca(str(tmp_path), "only-ca")
    sslp = {"ca": cert, "check_hostname": False}
    clock = [2000.0]
    monkeypatch.setattr(driver.time, "monotonic", lambda: clock[0])
    ctx = _context(sslp)
    with open(cert, "w") as f:
        f.write("not a certificate yet")  # caught between two steps of a rotation
    clock[0] += driver.TLS_RECHECK
    assert _context(sslp) is ctx  # connects go on with what worked
    assert "could not be loaded" in caplog.text
    shutil.copy(_make_ca(str(tmp_path), "next-ca"), cert)
    clock[0] += driver.TLS_RECHECK
    assert _subjects(_context(sslp)) == {"next-ca"}


def test_without_a_context_yet_a_missing_file_is_pymysqls_error(tmp_path: Any) -> None:
    with pytest.raises(OSError):
        _context({"ca": str(tmp_path / "missing.pem"), "check_hostname": False})
