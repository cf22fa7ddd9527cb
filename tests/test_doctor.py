"""``connguard doctor``: verdict rules as pure functions, then the command against real servers."""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pymysql
import pytest

from connguard import cli, doctor
from connguard.doctor import GREEN, RED, YELLOW, Check, parse_dsn
from connguard.tcpstates import STATE_NAMES
from tests.mariadb import APP_PASSWORD, MariaDB, socket_states, wait_until

DOCS = Path(__file__).resolve().parent.parent / "docs" / "doctor.md"

# The documented --json keys (docs/doctor.md).
TOP_KEYS = {"connguard_version", "worst", "target", "host", "server", "checks"}
HOST_KEYS = {"process", "limits", "census", "max_connect_rate"}
PROCESS_KEYS = {"pid", "fd_soft", "fd_hard", "fd_in_use"}
SERVER_KEYS = {"reachable", "error", "version", "variables", "status"}
CHECK_KEYS = {"id", "section", "name", "value", "verdict", "note", "amount", "limit", "unit"}
TARGET_KEYS = {"host", "port", "user", "database", "unix_socket"}
SERVER_LINES = {"max_connections", "Threads_connected", "Max_used_connections", "wait_timeout",
                "interactive_timeout", "connect_timeout", "max_connect_errors",
                "max_user_connections", "thread_handling", "back_log", "Aborted_connects"}


def counts(**nonzero: int) -> Dict[str, int]:
    result = dict.fromkeys(STATE_NAMES.values(), 0)
    result.update(nonzero)
    return result


def by_name(checks: List[Dict[str, Any]]) -> Dict[str, Dict[str, Any]]:
    return {c["name"]: c for c in checks}


# --- pure rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("connected, verdict", [(9, RED), (10, RED), (8, YELLOW), (7, GREEN)])
def test_connections_near_max_are_red(connected: int, verdict: str) -> None:
    assert doctor.check_connections(connected, 10).verdict == verdict


def test_fd_rules() -> None:
    assert doctor.check_fd_soft_limit(32768, 65536).verdict == YELLOW  # incident 2's trap
    assert doctor.check_fd_soft_limit(65536, 65536).verdict == GREEN
    assert doctor.check_fd_headroom(1000, 1024).verdict == RED  # 24 left < reserve 32
    assert doctor.check_fd_headroom(900, 1024).verdict == YELLOW
    assert doctor.check_fd_headroom(10, 1024).verdict == GREEN
    assert doctor.check_fd_headroom(10, None).verdict == GREEN


def test_port_rules() -> None:
    default = (32768, 60999)
    assert doctor.check_ports_toward(counts(time_wait=27_300), default, "db:3306").verdict == RED
    assert doctor.check_ports_toward(counts(established=15_000), default, "db").verdict == YELLOW
    assert doctor.check_ports_toward(counts(established=100, listen=5), default, "db").verdict \
        == GREEN
    churn = doctor.check_time_wait(counts(time_wait=28_000), default, 0)
    assert churn.verdict == YELLOW and "tcp_tw_reuse=1" in churn.note
    assert doctor.check_close_wait(counts(close_wait=3)).verdict == YELLOW
    assert doctor.check_close_wait(counts()).verdict == GREEN
    rate = doctor.check_port_range(default)
    assert rate.verdict == GREEN and "470.5 new connections/s" in rate.note
    assert doctor.check_port_range((40000, 40039)).verdict == YELLOW


def test_server_rules() -> None:
    variables = {"max_connections": "151", "wait_timeout": "30", "interactive_timeout": "28800",
                 "connect_timeout": "2", "max_connect_errors": "10", "max_user_connections": "0",
                 "thread_handling": "pool-of-threads", "thread_pool_stall_limit": "500",
                 "thread_pool_size": "2", "thread_pool_max_threads": "20", "back_log": "10"}
    status = {"Threads_connected": "5", "Max_used_connections": "151",
              "Aborted_connects": "40", "Connections": "100", "Threadpool_threads": "19",
              "Connection_errors_max_connections": "7", "Connection_errors_accept": "0"}
    checks = {c.name: c.verdict for c in doctor.server_checks(variables, status)}
    assert checks == {
        "max_connections": GREEN, "Threads_connected": GREEN, "Max_used_connections": YELLOW,
        "max_user_connections": GREEN, "wait_timeout": YELLOW, "interactive_timeout": GREEN,
        "connect_timeout": YELLOW, "max_connect_errors": YELLOW, "back_log": YELLOW,
        "Aborted_connects": YELLOW, "thread_handling": GREEN, "thread_pool_stall_limit": YELLOW,
        "thread_pool_size": GREEN, "thread_pool_max_threads": GREEN, "Threadpool_threads": RED,
        "Connection_errors_accept": GREEN, "Connection_errors_max_connections": YELLOW,
    }


def test_worst() -> None:
    assert doctor.worst([]) == GREEN
    lines = [Check("host", "a", 1, GREEN), Check("host", "b", 1, YELLOW)]
    assert doctor.worst(lines) == YELLOW
    assert doctor.worst([*lines, Check("server", "c", 1, RED)]) == RED


def test_parse_dsn() -> None:
    target = parse_dsn("mysql://app:p%40ss@db.example:3307/shop")
    assert (target.host, target.port, target.user, target.database) == (
        "db.example", 3307, "app", "shop")
    assert target.password == "p@ss"
    assert "p@ss" not in repr(target) and "p@ss" not in json.dumps(target.as_dict())
    assert target.describe() == "app@db.example:3307/shop"
    bare = parse_dsn("mariadb://root@[::1]?unix_socket=/run/mysqld/mysqld.sock")
    assert (bare.host, bare.port, bare.password) == ("::1", 3306, None)
    assert bare.unix_socket == "/run/mysqld/mysqld.sock"
    for driver in ("mysqldb", "aiomysql", "asyncmy"):  # an engine's URL, pasted as it is
        assert parse_dsn(f"mysql+{driver}://app@db:3307/shop").port == 3307
    for bad in ("postgres://x@y/db", "mysql://x@y:99999/db", "mysql+psycopg://x@y/db"):
        with pytest.raises(ValueError):
            parse_dsn(bad)


@pytest.mark.parametrize("scheme", doctor.DSN_SCHEMES)
def test_every_engine_url_the_docs_show_is_accepted_and_plugin_options_ignored(
        scheme: str) -> None:
    target = parse_dsn(f"{scheme}://app:secret@db.example:3306/shop?plugin=connguard"
                       "&connguard_max_size=5&connguard_storm_control=false")
    assert (target.host, target.port, target.user, target.database) == (
        "db.example", 3306, "app", "shop")
    assert target.ignored == ("connguard_max_size", "connguard_storm_control", "plugin")
    with pytest.raises(ValueError, match=r"unknown DSN parameter chrset; allowed: "
                                         r"unix_socket, charset, .*\(and, ignored: plugin=, "
                                         r"connguard_\*\)"):
        parse_dsn(f"{scheme}://app@db/shop?plugin=connguard&chrset=utf8mb4")


def test_tw_reuse_2_is_loopback_only_and_a_warning_for_a_remote_server() -> None:
    alone = doctor.check_tw_reuse(2)
    assert alone.verdict == GREEN and "loopback (127.0.0.0/8, ::1) only" in alone.note
    assert "remote server" in alone.note
    for local in ("127.0.0.1", "::1", "localhost"):
        assert doctor.check_tw_reuse(2, local).verdict == GREEN
    remote = doctor.check_tw_reuse(2, "10.0.0.5")
    assert remote.verdict == YELLOW and "10.0.0.5 is remote" in remote.note
    assert "tcp_tw_reuse=1" in remote.note
    assert doctor.check_tw_reuse(2, "db.example").verdict == YELLOW  # a name: no DNS, remote
    assert doctor.check_tw_reuse(1, "10.0.0.5").verdict == GREEN


# --- the command ------------------------------------------------------------------------------


def run_doctor(capsys: pytest.CaptureFixture[str], *args: str) -> Tuple[int, str, str]:
    code = cli.main(["doctor", *args])
    out, err = capsys.readouterr()
    return code, out, err


def dsn(server: MariaDB, password: bool = False) -> str:
    secret = f":{APP_PASSWORD}" if password else ""
    return f"mysql://app{secret}@127.0.0.1:{server.port}/app"


@pytest.fixture
def held(request: pytest.FixtureRequest) -> Iterator[List[Any]]:
    conns: List[Any] = []
    yield conns
    for conn in conns:
        conn.close()


def test_nearly_full_server_is_red_with_exit_1(
        mariadb_factory: Any, held: List[Any], capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    server = mariadb_factory(max_connections=10)
    held.extend(pymysql.connect(**server.connect_kwargs()) for _ in range(8))
    monkeypatch.setenv("MYSQL_PWD", APP_PASSWORD)
    code, out, err = run_doctor(capsys, "--dsn", dsn(server), "--json")
    report = json.loads(out)
    lines = by_name(report["checks"])
    # 8 held + the doctor's own = 9 of 10 (a closed connection may not have left yet).
    threads = int(report["server"]["status"]["Threads_connected"])
    assert threads >= 9
    assert lines["Threads_connected"]["value"] == f"{threads} of 10"
    assert lines["Threads_connected"]["verdict"] == RED
    assert report["worst"] == RED and code == cli.EXIT_RED
    assert report["server"]["variables"]["max_connections"] == "10"
    # The census saw our 8 sockets (the doctor's own is closed, maybe in TIME_WAIT).
    assert report["host"]["census"]["established"] == 8
    assert APP_PASSWORD not in out + err
    # The human form says the same, in a table.
    code, text, err = run_doctor(capsys, "--dsn", dsn(server))
    assert code == cli.EXIT_RED
    assert re.search(r"Threads_connected\s+\d+ of 10\s+RED", text)
    assert APP_PASSWORD not in text + err


def test_json_has_the_documented_keys(mariadb: MariaDB, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    code, out, _ = run_doctor(capsys, "--dsn", dsn(mariadb, password=True), "--json")
    report = json.loads(out)
    assert set(report) == TOP_KEYS
    assert set(report["host"]) == HOST_KEYS
    assert set(report["host"]["process"]) == PROCESS_KEYS
    assert set(report["server"]) == SERVER_KEYS
    assert set(report["target"]) == TARGET_KEYS
    assert report["target"]["port"] == mariadb.port
    assert {"port_range", "fd_soft", "fd_hard", "fd_in_use", "tcp_tw_reuse"} <= set(
        report["host"]["limits"])
    assert set(report["host"]["census"]) == set(STATE_NAMES.values())
    for check in report["checks"]:
        assert set(check) == CHECK_KEYS
        assert check["verdict"] in (GREEN, YELLOW, RED)
    names = {c["name"] for c in report["checks"]}
    assert names >= SERVER_LINES
    assert any(n.startswith("Connection_errors_") for n in names)
    assert report["server"]["reachable"] is True
    # Exit status follows the worst verdict: 1 exactly when something is red.
    assert code == (cli.EXIT_RED if report["worst"] == RED else cli.EXIT_OK)
    server_lines = [c for c in report["checks"] if c["section"] == "server"]
    assert all(c["verdict"] != RED for c in server_lines)  # a stock, idle server
    assert APP_PASSWORD not in out


def test_docs_list_every_json_key() -> None:
    text = DOCS.read_text()
    for key in TOP_KEYS | HOST_KEYS | PROCESS_KEYS | SERVER_KEYS | CHECK_KEYS | TARGET_KEYS:
        assert f"`{key}`" in text, key


def test_thread_pool_settings_are_reported(mariadb_factory: Any,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    server = mariadb_factory(thread_handling="pool-of-threads", thread_pool_stall_limit=500)
    _, out, _ = run_doctor(capsys, "--dsn", dsn(server, password=True), "--json")
    lines = by_name(json.loads(out)["checks"])
    assert lines["thread_handling"]["value"] == "pool-of-threads"
    assert lines["thread_pool_stall_limit"]["verdict"] == YELLOW
    assert "thread_pool_size" in lines and "Threadpool_threads" in lines


def test_close_wait_sockets_are_flagged(mariadb: MariaDB, held: List[Any],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    held.extend(pymysql.connect(**mariadb.connect_kwargs()) for _ in range(3))
    for conn in held:
        mariadb.kill(conn.thread_id())
    wait_until(lambda: socket_states(mariadb.port).get("close_wait") == 3, 30,
               message="killed connections to reach CLOSE_WAIT")
    _, out, _ = run_doctor(capsys, "--dsn", dsn(mariadb, password=True), "--json")
    line = by_name(json.loads(out)["checks"])["CLOSE_WAIT toward server"]
    assert (line["value"], line["verdict"]) == (3, YELLOW)


def test_unreachable_and_refused_logins_are_red_without_the_password(
        mariadb: MariaDB, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.mariadb import free_port

    code, out, _ = run_doctor(capsys, "--dsn", f"mysql://app@127.0.0.1:{free_port()}/app",
                              "--json")
    line = by_name(json.loads(out)["checks"])["reachable"]
    assert code == cli.EXIT_RED and line["verdict"] == RED
    assert "cannot reach" in line["note"]
    assert "check that the server is running" in line["note"]  # and what to do about it
    wrong = APP_PASSWORD + "-wrong"
    code, out, err = run_doctor(capsys, "--dsn",
                                f"mysql://app:{wrong}@127.0.0.1:{mariadb.port}/app")
    assert code == cli.EXIT_RED and "Access denied for user" in out
    assert wrong not in out + err and APP_PASSWORD not in out + err


def test_password_prompt(mariadb: MariaDB, capsys: pytest.CaptureFixture[str],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    asked: List[str] = []

    def fake_getpass(prompt: str) -> str:
        asked.append(prompt)
        return APP_PASSWORD

    monkeypatch.setattr(cli.getpass, "getpass", fake_getpass)
    monkeypatch.setattr(cli, "_has_terminal", lambda: True)
    monkeypatch.delenv("MYSQL_PWD", raising=False)
    _, out, err = run_doctor(capsys, "--dsn", dsn(mariadb), "--password-prompt", "--json")
    assert len(asked) == 1 and APP_PASSWORD not in asked[0]
    assert json.loads(out)["server"]["reachable"] is True
    assert APP_PASSWORD not in out + err


def test_unix_socket(mariadb: MariaDB, capsys: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MYSQL_PWD", APP_PASSWORD)
    _, out, _ = run_doctor(capsys, "--dsn", "mysql://app@localhost/app", "--socket",
                           mariadb.socket_path, "--json")
    report = json.loads(out)
    assert report["server"]["reachable"] is True
    assert report["host"]["census"] is None  # no ports over a unix socket


def test_pid_reports_another_process_limits(capsys: pytest.CaptureFixture[str]) -> None:
    code = ("import resource, sys\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (100, 200))\n"
            "print('ready', flush=True)\n"
            "sys.stdin.read()\n")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 200:
        pytest.skip("hard fd limit below 200")
    with subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None and child.stdin is not None
        try:
            assert child.stdout.readline().strip() == "ready"
            _, out, _ = run_doctor(capsys, "--pid", str(child.pid), "--json")
        finally:
            child.stdin.close()
            child.wait(timeout=30)
            child.stdout.close()
    report = json.loads(out)
    process = report["host"]["process"]
    assert (process["pid"], process["fd_soft"], process["fd_hard"]) == (child.pid, 100, 200)
    line = by_name(report["checks"])["open files soft / hard"]
    assert (line["value"], line["verdict"]) == ("100 / 200", YELLOW)
    assert report["target"] is None and report["server"] is None


@pytest.mark.parametrize("argv", [[], ["doctor", "--dsn", "postgres://x@y/db"],
                                  ["doctor", "--bogus"], ["doctor", "--pid", "x"]])
def test_usage_errors_exit_2(argv: List[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == cli.EXIT_USAGE
    assert "usage:" in capsys.readouterr().err


def test_console_script_exit_status_and_secrecy(mariadb_factory: Any, held: List[Any]) -> None:
    server = mariadb_factory(max_connections=10)
    env = dict(os.environ, MYSQL_PWD=APP_PASSWORD)
    command = [sys.executable, "-m", "connguard.cli", "doctor", "--dsn", dsn(server)]
    calm = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    server_part = calm.stdout.split("\nServer ", 1)[1]
    assert " RED " not in server_part, calm.stdout
    held.extend(pymysql.connect(**server.connect_kwargs()) for _ in range(8))
    full = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert full.returncode == cli.EXIT_RED, full.stdout + full.stderr
    for run in (calm, full):
        assert APP_PASSWORD not in run.stdout + run.stderr



def test_json_checks_have_stable_ids_and_numbers_with_units(mariadb: MariaDB) -> None:
    env = dict(os.environ, MYSQL_PWD=APP_PASSWORD)
    out = subprocess.run([sys.executable, "-m", "connguard.cli", "doctor", "--json", "--dsn",
                          dsn(mariadb)], capture_output=True, text=True, env=env, timeout=120)
    document = json.loads(out.stdout)
    checks = document["checks"]
    ids = [c["id"] for c in checks]
    assert len(ids) == len(set(ids)) and len(ids) > 15
    for check in checks:
        assert set(check) == CHECK_KEYS, check
        assert re.fullmatch(r"(host|sockets|server)\.[a-z0-9_]+", check["id"]), check
        value, amount, limit = check["value"], check["amount"], check["limit"]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert amount == value and check["unit"] is not None
        if isinstance(value, str) and " of " in value and limit is not None:
            assert value == f"{amount:,} of {limit:,}"  # the display shows the same numbers
    by_id = {c["id"]: c for c in checks}
    wait = by_id["server.wait_timeout"]
    assert wait["unit"] == "seconds" and wait["value"] == f"{wait['amount']:,} s"
    connected = by_id["server.threads_connected"]
    assert connected["unit"] == "connections" and connected["limit"] >= connected["amount"] >= 1
    assert by_id["host.open_files_in_use"]["unit"] == "descriptors"


def _cli(*argv: str, env: Any = None) -> Tuple[int, str]:
    proc = subprocess.run([sys.executable, "-m", "connguard.cli", *argv], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env=env if env is not None else dict(os.environ))
    return proc.returncode, proc.stdout + proc.stderr


def test_version() -> None:
    code, out = _cli("--version")
    assert code == 0 and re.fullmatch(r"connguard \d+\.\d+\.\d+\n", out), out


@pytest.mark.parametrize("dsn, says", [
    ("mysql://", "names no server"),
    ("mysql://app@127.0.0.1:0/app", "port must be a number in 1..65535"),
    ("mysql://app@127.0.0.1:3306/app?foo=bar", "unknown DSN parameter foo"),
    ("mysql://app@" + "a" * 70 + ":3306/app", "labels of at most 63"),
    ("mysql://app@a..b:3306/app", "not a valid IP address or host name"),
    ("mysql://app@bad_host!name:3306/app", "not a valid IP address or host name"),
    ("mysql://app@-bad-:3306/app", "not a valid IP address or host name"),
])
def test_bad_dsns_are_usage_errors_without_a_traceback(dsn: str, says: str) -> None:
    code, out = _cli("doctor", "--dsn", dsn)
    assert code == cli.EXIT_USAGE and says in out and "Traceback" not in out, out


def test_a_pid_that_does_not_exist_is_a_usage_error() -> None:
    code, out = _cli("doctor", "--pid", "999999999")
    assert code == cli.EXIT_USAGE and "no such process" in out, out


def test_password_prompt_without_a_terminal_says_what_to_do() -> None:
    code, out = _cli("doctor", "--dsn", "mysql://app@127.0.0.1:1/app", "--password-prompt")
    assert code == cli.EXIT_USAGE and "MYSQL_PWD" in out and "Traceback" not in out, out


def test_a_missing_socket_is_named(tmp_path: Any) -> None:
    path = str(tmp_path / "nonexistent.sock")
    code, out = _cli("doctor", "--socket", path)
    assert code == cli.EXIT_RED and f"cannot reach the MySQL server at {path}" in out, out
    assert "3306" not in out.split("Server", 1)[1]


def test_a_wrong_password_is_a_refused_login_on_a_reachable_server(mariadb: MariaDB) -> None:
    env = dict(os.environ, MYSQL_PWD="not-" + APP_PASSWORD)
    code, out = _cli("doctor", "--json", "--dsn", dsn(mariadb), env=env)
    document = json.loads(out[:out.rindex("}") + 1])
    by_id = {c["id"]: c for c in document["checks"]}
    assert by_id["server.reachable"]["verdict"] == GREEN
    assert by_id["server.login"]["verdict"] == RED
    assert "access denied" in by_id["server.login"]["note"].lower()
    assert "check the user name and the password" in by_id["server.login"]["note"]
    assert document["server"]["reachable"] is True and code == cli.EXIT_RED
    assert APP_PASSWORD not in out
    assert "no password was given" not in out  # one was: it was wrong


def test_a_login_without_a_password_says_how_to_give_one(mariadb: MariaDB) -> None:
    env = {k: v for k, v in os.environ.items() if k != "MYSQL_PWD"}
    code, out = _cli("doctor", "--json", "--dsn", dsn(mariadb), env=env)
    document = json.loads(out[:out.rindex("}") + 1])
    login = {c["id"]: c for c in document["checks"]}["server.login"]
    assert login["verdict"] == RED and code == cli.EXIT_RED
    assert "(using password: NO)" in login["note"]
    assert "no password was given: set MYSQL_PWD, use --password-prompt" in login["note"]
    assert "password=" not in login["note"]  # the library's remedy: not for a command line


def test_the_engine_url_with_the_plugin_reaches_the_server_with_a_note(mariadb: MariaDB) -> None:
    url = (f"mysql+pymysql://app@127.0.0.1:{mariadb.port}/app?plugin=connguard"
           "&connguard_max_size=5&charset=utf8mb4")  # charset: PyMySQL's, used
    proc = subprocess.run([sys.executable, "-m", "connguard.cli", "doctor", "--json", "--dsn",
                           url], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, MYSQL_PWD=APP_PASSWORD))
    document = json.loads(proc.stdout)  # the note goes to stderr: stdout stays JSON
    by_id = {c["id"]: c for c in document["checks"]}
    assert by_id["server.reachable"]["verdict"] == GREEN and "server.login" not in by_id
    assert "note: --dsn: ignoring connguard_max_size, plugin" in proc.stderr
    assert APP_PASSWORD not in proc.stdout + proc.stderr


def test_pymysql_connect_parameters_of_an_engine_url_are_used() -> None:
    target = doctor.parse_dsn("mysql+pymysql://app@db/app?charset=latin1&ssl_ca=/ca.pem"
                              "&ssl_verify_cert=false")
    kwargs = target.connect_kwargs()
    assert (kwargs["charset"], kwargs["ssl_ca"], kwargs["ssl_verify_cert"]) == \
        ("latin1", "/ca.pem", False)
    with pytest.raises(ValueError, match="ssl_verify_cert must be true or false"):
        doctor.parse_dsn("mysql://app@db/app?ssl_verify_cert=maybe")


def test_an_unknown_database_of_a_passwordless_account_says_nothing_of_passwords(
        mariadb: MariaDB) -> None:
    """The login itself succeeded (the server answered 1049, not 1045): the note is about
    the database, not about giving a password."""
    user = f"cg-nopw-{os.getpid()}"
    mariadb.query(f"CREATE USER IF NOT EXISTS '{user}'@'%'")
    mariadb.query(f"GRANT SELECT ON *.* TO '{user}'@'%'")  # so the answer is 1049, not 1044
    try:
        env = {k: v for k, v in os.environ.items() if k != "MYSQL_PWD"}
        code, out = _cli("doctor", "--json", "--dsn",
                         f"mysql://{user}@127.0.0.1:{mariadb.port}/no_such_db", env=env)
        document = json.loads(out[:out.rindex("}") + 1])
        login = {c["id"]: c for c in document["checks"]}["server.login"]
        assert login["verdict"] == RED and code == cli.EXIT_RED
        assert "Unknown database" in login["note"], login["note"]
        assert "no password was given" not in login["note"], login["note"]
    finally:
        mariadb.query(f"DROP USER IF EXISTS '{user}'@'%'")
