"""Throwaway MariaDB and Redis servers, for testing only: the test suite, the benchmarks and
``connguard bench`` start them. The library never imports this module, and the wheel does
not hold it (it lives in the repository, beside ``tests/`` and ``benchmarks/``).

A fresh datadir copied from a template made once by ``mariadb-install-db``, a random free TCP
port on 127.0.0.1 plus a unix socket, server options per instance, an application account
with a password (no SUPER, like a production application account). Helpers put a server
into the failure modes users hit: ``kill()`` (CLOSE_WAIT on the client), ``stop()``/
``start()`` (restart on the same port), ``freeze()``/``thaw()`` (SIGSTOP: the unix-socket
backlog fills and connects fail with errno 11), and ``nproc_headroom`` (start under
``prlimit --nproc`` so the server's thread budget runs out with 1135).

Everything started here is stopped by ``destroy()``; nothing depends on a server it did not
start. The application account's password is made at random for each run (and handed to
child processes through ``CONNGUARD_SANDBOX_PASSWORD``, so that processes a run spawns
share it): there is no fixed password to find in the package.
"""


from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import pymysql

APP_USER = "app"
def _run_secret(name: str) -> str:
    """A password made at random for this run, shared with the processes it spawns."""
    return os.environ.setdefault(name, "cg-" + secrets.token_urlsafe(12))


#: Random per run; tests assert it never shows up in connguard's text.
APP_PASSWORD = _run_secret("CONNGUARD_SANDBOX_PASSWORD")
#: The servers' root account: unix socket only (the TCP root accounts the installer makes
#: are dropped), with a random password, so no other local user can log in as root.
ROOT_PASSWORD = _run_secret("CONNGUARD_SANDBOX_ROOT_PASSWORD")


def _server_env() -> Dict[str, str]:
    """The environment for server processes: without this run's passwords."""
    return {k: v for k, v in os.environ.items() if not k.startswith("CONNGUARD_SANDBOX_")}
APP_DATABASE = "app"
SERVER_USER = "mysql"
START_DEADLINE = 60.0  # seconds; generous for a loaded 2-core machine
STOP_DEADLINE = 60.0
INSTALL_HINT = (
    "mariadbd not found: connguard's tests and benchmarks start throwaway MariaDB servers. "
    "Install it with `apt-get install mariadb-server` (Debian/Ubuntu)."
)

# Options every test server gets unless the test overrides them: small memory, no name
# resolution (loopback only), no binary log, quick shutdown.
BASE_OPTIONS: Dict[str, Any] = {
    "innodb_buffer_pool_size": "16M",
    "innodb_log_file_size": "4M",
    "innodb_fast_shutdown": 2,
    "skip_name_resolve": True,
    "performance_schema": "OFF",
    "max_connections": 151,
    "bind_address": "127.0.0.1",
    "character_set_server": "utf8mb4",
}


def find_binary(name: str) -> Optional[str]:
    """Locate a server binary on PATH or in the sbin directories a non-root PATH may lack."""
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/local/sbin:/sbin"
    return shutil.which(name, path=path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02,
               message: str = "condition") -> Any:
    """Poll ``predicate`` until it is truthy; raise naming ``message`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {message}")
        time.sleep(interval)


def _running_as_root() -> bool:
    return os.geteuid() == 0


def _server_uid() -> Optional[int]:
    if not _running_as_root():
        return None
    try:
        return pwd.getpwnam(SERVER_USER).pw_uid
    except KeyError:
        return None


def user_thread_count(uid: int) -> int:
    """Threads owned by ``uid`` right now: what RLIMIT_NPROC counts against."""
    count = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
            count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            continue  # the process exited while we counted
    return count


def option_args(options: Dict[str, Any]) -> List[str]:
    """Turn ``{"max_connections": 16, "skip_name_resolve": True}`` into mariadbd flags."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            args.append(flag)
        elif value is False or value is None:
            continue
        else:
            args.append(f"{flag}={value}")
    return args


class Template:
    """A datadir made once per session (install + app user) that servers copy."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.datadir = os.path.join(root, "template")

    def build(self) -> None:
        install = find_binary("mariadb-install-db") or find_binary("mysql_install_db")
        if install is None:
            raise RuntimeError(INSTALL_HINT)
        tmpdir = os.path.join(self.root, "install-tmp")
        os.makedirs(tmpdir, exist_ok=True)
        uid = _server_uid()
        if uid is not None:
            os.chown(tmpdir, uid, -1)
        cmd = [install, "--no-defaults", f"--datadir={self.datadir}",
               "--auth-root-authentication-method=normal", "--skip-test-db",
               "--innodb-log-file-size=4M", f"--tmpdir={tmpdir}"]
        if uid is not None:
            cmd.append(f"--user={SERVER_USER}")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"mariadb-install-db failed:\n{out.stdout}\n{out.stderr}")
        server = MariaDB(self, {}, datadir=self.datadir)
        server.root_password = ""  # as the installer left it, until set below
        server.start()
        try:
            with server.admin() as cur:
                _lock_down_root(cur)
                server.root_password = ROOT_PASSWORD
                for host in ("%%", "localhost"):
                    cur.execute(f"CREATE USER '{APP_USER}'@'{host}' IDENTIFIED BY %s",
                                (APP_PASSWORD,))
                    # Like a production application account: no SUPER, so the server's
                    # extra admin slot above max_connections is not the app's to take.
                    account = f"'{APP_USER}'@'{host}'".replace("%%", "%")
                    cur.execute(f"GRANT ALL ON {APP_DATABASE}.* TO {account}")
                    cur.execute(f"GRANT PROCESS ON *.* TO {account}")
                cur.execute(f"CREATE DATABASE {APP_DATABASE}")
        finally:
            server.stop()


def _terminate(proc: subprocess.Popen, deadline: float) -> None:
    """SIGTERM, then SIGKILL if the process is still there after ``deadline`` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=deadline)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=deadline)


def _lock_down_root(cur: Any) -> None:
    """Root over the unix socket only, with this run's password; no anonymous accounts."""
    cur.execute("SELECT User, Host FROM mysql.user WHERE User IN ('root', '')")
    for user, host in cur.fetchall():
        if user == "root" and host == "localhost":
            continue
        cur.execute("DROP USER %s@%s", (user, host))
    cur.execute("ALTER USER 'root'@'localhost' IDENTIFIED BY %s", (ROOT_PASSWORD,))


class MariaDB:
    """One throwaway mariadbd: its datadir, port, socket, options and process."""

    def __init__(self, template: Template, options: Dict[str, Any],
                 nproc_headroom: Optional[int] = None, datadir: Optional[str] = None,
                 port: Optional[int] = None) -> None:
        self.template = template
        self.options = dict(options)
        self.root_password = ROOT_PASSWORD
        self.nproc_headroom = nproc_headroom
        self.workdir = tempfile.mkdtemp(prefix="mariadb-", dir=template.root)
        os.chmod(self.workdir, 0o755)
        self.datadir = datadir or os.path.join(self.workdir, "data")
        self.socket_path = os.path.join(self.workdir, "mysqld.sock")
        self.error_log = os.path.join(self.workdir, "error.log")
        self.port = port or free_port()
        self.process: Optional[subprocess.Popen] = None
        self.start_seconds: Optional[float] = None
        self._copied = datadir is not None
        uid = _server_uid()
        if uid is not None:
            os.chown(self.workdir, uid, -1)

    # -- lifecycle -------------------------------------------------------------------------
    def command(self) -> List[str]:
        mariadbd = find_binary("mariadbd") or find_binary("mysqld")
        if mariadbd is None:
            raise RuntimeError(INSTALL_HINT)
        cmd = [mariadbd, "--no-defaults", f"--datadir={self.datadir}", f"--port={self.port}",
               f"--socket={self.socket_path}", f"--log-error={self.error_log}",
               f"--pid-file={os.path.join(self.workdir, 'mysqld.pid')}",
               # A private tmpdir: servers started in parallel (other test runs, namespaces)
               # must not collide on temporary table names in a shared /tmp.
               f"--tmpdir={self.workdir}",
               # LOAD_FILE / INTO OUTFILE only inside the server's own directory.
               f"--secure-file-priv={self.workdir}"]
        if _server_uid() is not None:
            cmd.append(f"--user={SERVER_USER}")
        cmd += option_args({**BASE_OPTIONS, **self.options})
        if self.nproc_headroom is not None:
            cmd = self._prlimit_prefix() + cmd
        return cmd

    def _prlimit_prefix(self) -> List[str]:
        # RLIMIT_NPROC counts every thread of the server's user, including other servers
        # running as that user, so the limit is set relative to what that user has now.
        uid = _server_uid()
        if uid is None:
            uid = os.getuid()
        limit = user_thread_count(uid) + int(self.nproc_headroom or 0)
        return ["prlimit", f"--nproc={limit}", "--"]

    def start(self) -> MariaDB:
        """Start (or restart) on the same datadir, port and socket; wait until it answers."""
        if self.process is not None and self.process.poll() is None:
            return self
        if not self._copied:
            shutil.copytree(self.template.datadir, self.datadir, symlinks=True)
            uid = _server_uid()
            if uid is not None:
                subprocess.run(["chown", "-R", f"{uid}", self.datadir], check=True)
            self._copied = True
        began = time.monotonic()
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                        env=_server_env())
        wait_until(self._ready, START_DEADLINE, message=f"mariadbd on port {self.port}")
        self.start_seconds = time.monotonic() - began
        return self

    def _ready(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            code = self.process.returncode
            raise RuntimeError(f"mariadbd exited with {code}:\n{self.log_tail()}")
        # Probe with a raw socket first: PyMySQL does not close its unix socket when the
        # connect itself fails, and the suite turns that ResourceWarning into an error.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.socket_path)
            except OSError:
                return False
        try:
            conn = pymysql.connect(unix_socket=self.socket_path, user="root",
                                   password=self.root_password, connect_timeout=2)
        except pymysql.err.OperationalError:
            return False
        conn.close()
        return True

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL past the deadline); a thawed server first."""
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        self.thaw()
        _terminate(proc, STOP_DEADLINE)

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)

    @property
    def pid(self) -> int:
        """The mariadbd pid (prlimit execs the server, so the pid is the same through it)."""
        assert self.process is not None, "server not started"
        return self.process.pid

    def freeze(self) -> None:
        """SIGSTOP the server: it accepts nothing, so connects queue in the listen backlog."""
        os.kill(self.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.error_log, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no error log)"

    # -- clients ---------------------------------------------------------------------------
    def connect_kwargs(self, **overrides: Any) -> Dict[str, Any]:
        """Arguments for ``pymysql.connect`` as the application user over TCP."""
        kwargs: Dict[str, Any] = dict(host="127.0.0.1", port=self.port, user=APP_USER,
                                      password=APP_PASSWORD, database=APP_DATABASE,
                                      connect_timeout=10)
        kwargs.update(overrides)
        return kwargs

    def url(self, driver: str = "mysql+pymysql") -> str:
        return (f"{driver}://{APP_USER}:{APP_PASSWORD}@127.0.0.1:{self.port}/{APP_DATABASE}")

    def admin_connection(self) -> pymysql.connections.Connection:
        return pymysql.connect(unix_socket=self.socket_path, user="root",
                               password=self.root_password, autocommit=True,
                               connect_timeout=10)

    def admin(self) -> _AdminCursor:
        """``with server.admin() as cur:`` — a root cursor over the unix socket."""
        return _AdminCursor(self)

    def query(self, sql: str, args: Any = None) -> List[tuple]:
        with self.admin() as cur:
            cur.execute(sql, args)
            return list(cur.fetchall())

    def status(self, name: str) -> int:
        """A global status counter, e.g. ``status("Threads_connected")``."""
        rows = self.query("SHOW GLOBAL STATUS LIKE %s", (name,))
        return int(rows[0][1])

    def variable(self, name: str) -> str:
        rows = self.query("SHOW GLOBAL VARIABLES LIKE %s", (name,))
        return str(rows[0][1])

    def app_threads(self) -> List[int]:
        """Thread ids of the application user's connections."""
        rows = self.query("SELECT id FROM information_schema.processlist WHERE user = %s",
                          (APP_USER,))
        return [int(r[0]) for r in rows]

    def kill(self, thread_id: int) -> None:
        self.query(f"KILL {int(thread_id)}")

    def kill_app_connections(self) -> int:
        ids = self.app_threads()
        for tid in ids:
            with contextlib.suppress(pymysql.err.OperationalError):  # already gone
                self.kill(tid)
        return len(ids)

    def __repr__(self) -> str:
        state = "running" if self.process and self.process.poll() is None else "stopped"
        return f"<MariaDB port={self.port} {state} options={self.options}>"


class _AdminCursor:
    def __init__(self, server: MariaDB) -> None:
        self.server = server
        self.conn: Optional[pymysql.connections.Connection] = None

    def __enter__(self) -> pymysql.cursors.Cursor:
        self.conn = self.server.admin_connection()
        return self.conn.cursor()

    def __exit__(self, *exc: Any) -> None:
        assert self.conn is not None
        self.conn.close()


REDIS_INSTALL_HINT = "redis-server is not on PATH: apt-get install redis-server"


class RedisServer:
    """One redis-server process: start, stop and start again on the same port."""

    def __init__(self, port: Optional[int] = None) -> None:
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix="connguard-redis-")
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(REDIS_INSTALL_HINT)
        return [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--daemonize", "no", "--dir", self.workdir,
                "--protected-mode", "no", "--logfile", ""]

    def start(self) -> RedisServer:
        if self.running:
            return self
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                                        env=_server_env())
        wait_until(self.ping, 30, message=f"redis-server on port {self.port}")
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ping(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited with {self.process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        proc = self.process
        if proc is None or proc.poll() is not None:
            return
        _terminate(proc, 10)

    def client(self) -> Any:
        """A redis-py client (the caller closes it)."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)

    def commands(self) -> int:
        """Commands Redis has served so far, not counting INFO and PING (the probes)."""
        with self.client() as client:
            stats = client.info("commandstats")
        return sum(v["calls"] for k, v in stats.items()
                   if k not in ("cmdstat_info", "cmdstat_ping"))

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
