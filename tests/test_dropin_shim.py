"""``install("MySQLdb")`` after ``pymysql.install_as_MySQLdb()`` (Django without a C
compiler): MySQLdb is PyMySQL, and connguard pools it as PyMySQL, against a real MariaDB.

Run in a subprocess: the shim puts PyMySQL into ``sys.modules["MySQLdb"]`` for the rest of
the process, which would hide mysqlclient from every later test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.mariadb import MariaDB

ROOT = Path(__file__).resolve().parent.parent

# What Django's MySQL backend does: MySQLdb.connect(**kwargs) with mysqlclient's spellings.
SCRIPT = """
import json, os, sys
import pymysql
pymysql.install_as_MySQLdb()
import connguard
connguard.install("MySQLdb")
import MySQLdb
kwargs = dict(host="127.0.0.1", port=int(sys.argv[1]), user=sys.argv[2], db=sys.argv[3],
              passwd=os.environ["SHIM_TEST_PASSWORD"])
threads, rows = [], []
for _ in range(3):
    conn = MySQLdb.connect(**kwargs)
    cur = conn.cursor()
    cur.execute("SELECT CONNECTION_ID(), 6 * 7")
    thread, answer = cur.fetchone()
    threads.append(thread)
    rows.append(answer)
    cur.close()
    conn.close()
print(json.dumps({"threads": threads, "rows": rows, "repr": repr(MySQLdb.connect),
                  "installed": [connguard.installed("MySQLdb"), connguard.installed("pymysql")]}))
"""


def test_install_mysqldb_under_the_pymysql_shim_pools_pymysql(mariadb: MariaDB) -> None:
    kwargs = mariadb.connect_kwargs()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHIM_TEST_PASSWORD": kwargs["password"]}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(kwargs["port"]), kwargs["user"], kwargs["database"]],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert found["rows"] == [42, 42, 42]
    assert len(set(found["threads"])) == 1  # pooled: one server connection for three connects
    assert found["repr"].startswith("<pymysql.") and "pooled by connguard" in found["repr"]
    assert found["installed"] == [True, True]
