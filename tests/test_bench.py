"""`connguard bench` and its runner: end to end against the harness's server, the results
schema, the report files and the command line. No timing is asserted anywhere here."""

from __future__ import annotations

import copy
import io
import json
import os
import sys
from typing import Any, Dict

import pytest

from benchmarks import report, runner
from benchmarks.common import Measurement, ScenarioResult
from connguard import cli
from tests.mariadb import APP_PASSWORD, INSTALL_HINT, MariaDB
from tests.optional import optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _files_text(directory: str) -> str:
    text = ""
    for name in os.listdir(directory):
        with open(os.path.join(directory, name), "rb") as f:
            text += f.read().decode("utf-8", "replace")
    return text


@pytest.fixture(scope="module")
def quick_run(mariadb: MariaDB, tmp_path_factory: Any) -> Dict[str, Any]:
    """One quick run of two scenarios through the runner's kwargs entry point."""
    out = str(tmp_path_factory.mktemp("bench"))
    lines = io.StringIO()
    doc = runner.run(kwargs=mariadb.connect_kwargs(), quick=True,
                     scenarios=["port-churn", "checkout"], out_dir=out,
                     progress=runner.PlainProgress(lines))
    return {"doc": doc, "out": out, "progress": lines.getvalue()}


def test_runner_end_to_end(quick_run: Dict[str, Any]) -> None:
    doc, out = quick_run["doc"], quick_run["out"]
    assert [r["name"] for r in doc["runs"]] == ["checkout", "port-churn"]  # registry order
    assert all(r["status"] == "ok" for r in doc["runs"]), doc["runs"]
    groups = {s["group"] for s in doc["scenarios"]}
    assert groups == {"checkout", "port-churn"}
    churn = next(s for s in doc["scenarios"] if s["name"] == "port churn: TIME_WAIT left")
    assert [m["client"] for m in churn["measurements"]] == ["pymysql.connect",
                                                           "connguard.connect"]
    assert churn["best_alternative"] == "pymysql.connect"
    for s in doc["scenarios"]:
        for m in s["measurements"]:
            assert len(m["rounds"]) >= 2 and m["min"] <= m["median"] <= m["max"]
    assert doc["server"]["source"] == "given" and doc["server"]["version"]
    assert doc["machine"]["cpus"] and doc["machine"]["pymysql"]
    # Progress: a line per scenario and per step, and the outcome.
    assert "[1/2] checkout" in quick_run["progress"]
    assert "port-churn: pymysql.connect, round 1/2" in quick_run["progress"]
    assert "port-churn: ok in" in quick_run["progress"]
    assert sorted(os.listdir(out)) == ["report.md", "results.json"]  # no chart for these


def test_results_json_matches_the_schema(quick_run: Dict[str, Any]) -> None:
    with open(os.path.join(quick_run["out"], "results.json")) as f:
        saved = json.load(f)
    assert report.validate(saved) == []
    assert saved["schema_version"] == report.SCHEMA_VERSION
    assert saved["scenarios"] == json.loads(json.dumps(quick_run["doc"]["scenarios"]))


def test_report_and_summary(quick_run: Dict[str, Any]) -> None:
    with open(os.path.join(quick_run["out"], "report.md")) as f:
        text = f.read()
    assert text.startswith("# connguard bench")
    for heading in ("## Summary", "### checkout+return", "### port churn: TIME_WAIT left"):
        assert heading in text
    summary = report.summary(quick_run["doc"])
    assert "| scenario" in summary and "connguard vs best" in summary
    assert "port churn: TIME_WAIT left" in summary
    assert "--quick run" in summary


def test_no_password_in_anything_written(quick_run: Dict[str, Any]) -> None:
    assert APP_PASSWORD not in _files_text(quick_run["out"])
    assert APP_PASSWORD not in quick_run["progress"]


def test_schema_validation_names_what_is_wrong(quick_run: Dict[str, Any]) -> None:
    good = json.loads(json.dumps(quick_run["doc"]))
    assert report.validate(good) == []
    broken = copy.deepcopy(good)
    del broken["machine"]
    assert any("missing 'machine'" in p for p in report.validate(broken))
    broken = copy.deepcopy(good)
    broken["scenarios"][0]["measurements"][0]["median"] = "fast"
    assert any(".median: unexpected type str" in p for p in report.validate(broken))
    broken = copy.deepcopy(good)
    m = broken["scenarios"][0]["measurements"][0]
    m["median"] = max(m["rounds"]) + 1
    assert any("median outside" in p for p in report.validate(broken))
    broken = copy.deepcopy(good)
    broken["runs"][0]["status"] = "maybe"
    assert any("status" in p for p in report.validate(broken))
    assert report.validate([]) == ["document: expected an object, got list"]


def test_dsn_skips_what_would_stop_or_kill_the_server(mariadb: MariaDB, tmp_path: Any,
                                                      capsys: Any) -> None:
    dsn = f"mysql://app:{APP_PASSWORD}@127.0.0.1:{mariadb.port}/app"
    code = cli.main(["bench", "--dsn", dsn, "--scenario", "outage", "saturation",
                     "--scenario", "mass-kill", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert code == 0, err
    with open(tmp_path / "results.json") as f:
        doc = json.load(f)
    assert report.validate(doc) == []
    assert [(r["name"], r["status"]) for r in doc["runs"]] == [
        ("outage", "skipped"), ("saturation", "skipped"), ("mass-kill", "skipped")]
    assert all("not with --dsn" in r["note"] for r in doc["runs"])
    assert doc["server"]["source"] == "dsn"
    assert "outage: skipped" in out
    for text in (out, err, _files_text(str(tmp_path))):
        assert APP_PASSWORD not in text


def test_bench_help(capsys: Any) -> None:
    assert cli.main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    for word in ("--dsn", "--quick", "--scenario", "--out", "outage", "port-churn"):
        assert word in out


def test_unknown_scenario_is_a_usage_error_naming_the_allowed(capsys: Any) -> None:
    assert cli.main(["bench", "--scenario", "checkout", "outrage"]) == 2
    err = capsys.readouterr().err
    assert "outrage" in err
    for name in runner.SCENARIO_NAMES:
        assert name in err
    with pytest.raises(ValueError, match="allowed: checkout, query"):
        runner.select(["outrage"])


def test_bad_dsn_is_a_usage_error(capsys: Any) -> None:
    assert cli.main(["bench", "--dsn", "postgres://u:hunter2@h/db", "--out", "x"]) == 2
    err = capsys.readouterr().err
    assert "--dsn" in err and "hunter2" not in err


def test_without_mariadbd_it_says_how_to_install(monkeypatch: Any, tmp_path: Any,
                                                  capsys: Any) -> None:
    import testsupport.servers

    monkeypatch.setattr(testsupport.servers, "find_binary", lambda name: None)
    assert cli.main(["bench", "--quick", "--out", str(tmp_path / "out")]) == 2
    assert INSTALL_HINT in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ratios_against_the_best_alternative() -> None:
    result = ScenarioResult("x", "", False, [
        Measurement("connguard", "µs", [1.0, 2.0, 3.0]),
        Measurement("a", "µs", [4.0, 4.0, 4.0]), Measurement("b", "µs", [8.0])])
    assert result.best_alternative() == "a"
    assert result.ratios() == {"connguard": 0.5, "a": 1.0, "b": 2.0}
    only_ours = ScenarioResult("y", "", True, [Measurement("connguard x", "/s", [2.0]),
                                               Measurement("connguard y", "/s", [4.0])])
    assert only_ours.best_alternative() is None
    assert only_ours.ratios() == {"connguard x": 0.5, "connguard y": 1.0}


def test_charts_from_a_document(tmp_path: Any) -> None:
    optional("matplotlib")
    timeline = {"kind": "timeline", "bucket_s": 0.1, "clients": {
        name: {"attempts": [0, 3, 9, 1], "errors": [0, 5, 7, 0], "ok": [4, 0, 0, 4],
               "stop": 0.1, "restart": 0.2, "ready": 0.3}
        for name in ("connguard Pool", "DBUtils PooledDB")}}
    results = [
        ScenarioResult("outage: connect attempts", "64 threads: connects", False,
                       [Measurement("connguard Pool", "/s", [2.0]),
                        Measurement("DBUtils PooledDB", "/s", [400.0])], series=timeline),
        ScenarioResult("saturation: throughput", "t", True,
                       [Measurement("connguard Pool", "calls/s", [900.0, 1000.0]),
                        Measurement("sqlalchemy QueuePool", "calls/s", [500.0])],
                       params={"threads": 64, "max_connections": 16, "pool_size": 64}),
        ScenarioResult("census 10k sockets", "c", False,
                       [Measurement("connguard census (netlink)", "ms", [15.0])],
                       params={"sockets": 10000}),
        ScenarioResult("census 30k sockets", "c", False,
                       [Measurement("connguard census (netlink)", "ms", [28.0])],
                       params={"sockets": 30000}),
    ]
    doc = report.results_document(results, "10.11-test")
    report.write_all(doc, str(tmp_path))
    assert doc["charts"] == ["outage.png", "saturation.png", "census.png"]
    for name in doc["charts"]:
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "![Connect attempts and errors through an outage](outage.png)" in \
        (tmp_path / "report.md").read_text()
    assert report.validate(json.loads((tmp_path / "results.json").read_text())) == []


def test_plain_and_rich_progress(capsys: Any) -> None:
    scenario = runner.SCENARIOS["checkout"]
    stream = io.StringIO()
    plain = runner.PlainProgress(stream)
    plain.begin(1)
    plain.scenario(scenario)
    plain.step("round 1/3")
    plain.finished("skipped", 0.5, "needs sqlalchemy")
    assert stream.getvalue().splitlines() == [
        "[1/1] checkout: checkout + return of an idle connection",
        "[1/1] checkout: round 1/3", "[1/1] checkout: skipped in 0.5 s (needs sqlalchemy)"]
    optional("rich")
    fancy = runner.RichProgress()
    try:
        fancy.begin(1)
        fancy.scenario(scenario)
        fancy.step("round 1/3")
        fancy.finished("ok", 0.5, "")
    finally:
        fancy.close()
    assert "checkout: ok in 0.5 s" in capsys.readouterr().err


def test_setuptools_finds_the_library_only_and_the_bench_extra_is_complete() -> None:
    tomllib = optional("tomllib") if sys.version_info >= (3, 11) else optional("tomli")
    setuptools = optional("setuptools")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        config = tomllib.load(f)
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    found = setuptools.find_packages(where=REPO, include=include)
    assert "connguard" in found
    assert all(p == "connguard" or p.startswith("connguard.") for p in found), found
    extras = config["project"]["optional-dependencies"]
    assert {"matplotlib", "rich"} <= set(extras["bench"])
    assert "connguard[bench]" in extras["dev"] and "connguard[docs]" in extras["dev"]


def test_bench_help_shows_the_runners_options(capsys: Any) -> None:
    # The options come from benchmarks.runner, loaded when `bench` is parsed: --help too.
    assert cli.main(["bench", "--quick", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: connguard bench ")
    assert all(option in out for option in ("--dsn", "--quick", "--scenario", "--out"))


def test_the_benchmarks_are_found_beside_the_package_only(tmp_path: Any) -> None:
    # From a wheel (tests/test_package.py runs one) `connguard bench` says it needs a checkout.
    assert cli.checkout_root(os.path.join(REPO, "connguard")) == REPO
    site = tmp_path / "site-packages"
    (site / "connguard").mkdir(parents=True)  # a wheel's layout: nothing beside the package
    assert cli.checkout_root(str(site / "connguard")) is None
    # Another distribution's top-level benchmarks/ in site-packages (some wheels ship one) is
    # not this checkout's: `connguard bench` would import and run its runner.
    (site / "benchmarks").mkdir()
    (site / "benchmarks" / "runner.py").write_text("raise SystemExit('not connguard')\n")
    assert cli.checkout_root(str(site / "connguard")) is None


def test_a_failing_scenario_is_recorded_not_fatal(capsys: Any) -> None:
    def boom(ctx: runner.Context) -> Any:
        raise RuntimeError(f"cannot log in with {ctx.kwargs['password']}")

    def missing(ctx: runner.Context) -> Any:
        raise ModuleNotFoundError("No module named 'dbutils'", name="dbutils")

    ctx = runner.Context({"password": APP_PASSWORD}, quick=True)
    record, produced = runner._run_one(runner.Scenario("boom", "fails", boom), ctx)
    assert (record["status"], produced) == ("failed", [])
    assert record["note"].startswith("RuntimeError: cannot log in with")
    assert APP_PASSWORD not in record["note"] + capsys.readouterr().err
    record, _ = runner._run_one(runner.Scenario("dbutils", "needs it", missing), ctx)
    assert record["status"] == "skipped" and "needs dbutils" in record["note"]
    record, _ = runner._run_one(runner.Scenario("storm", "own", boom, own_server=True), ctx)
    assert record["status"] == "skipped" and "not with --dsn" in record["note"]


def test_connect_attempts_are_counted_reconnects_included(mariadb: MariaDB) -> None:
    from benchmarks import storm
    from tests.mariadb import wait_until

    optional("dbutils")
    client = storm.DBUtilsClient(mariadb.connect_kwargs(), 1, 5.0)
    try:
        client.work("SELECT 1")
        assert len(client.attempt_times()) == 1
        assert storm.tcp_states("127.0.0.1", mariadb.port).get("established", 0) >= 1
        before = set(mariadb.app_threads())
        assert mariadb.kill_app_connections() >= 1
        wait_until(lambda: not before & set(mariadb.app_threads()), 30,
                   message="the KILL to land")
        client.work("SELECT 1")  # DBUtils pings on checkout and reconnects by itself
        assert len(client.attempt_times()) == 2
    finally:
        client.close()


def test_window_counts() -> None:
    from benchmarks import storm

    times = [0.0, 0.01, 0.05, 0.3, 0.31, 0.32, 0.33, 1.0]
    assert storm.peak_per_window(times) == 4
    assert storm.count_between(times, 0.3, 1.0) == 4
    assert storm.buckets(times, 0.0, 0.4) == [3, 0, 0, 4]


@pytest.mark.parametrize("ours, best, higher, expected", [
    (2.81, 42.7, False, "15× better"),        # µs: lower is better
    (3046, 3061, True, "about the same"),
    (0.013, 0.0001, False, "130× worse"),      # recovery: we lose, and say so
    (0, 1277, False, "better (0 vs 1,277)"),   # errors: no ratio to a zero
    (15, 0, False, "worse (15 vs 0)"),
    (10864, 8607, True, "1.3× better"),
    (5, 5, True, "same"),
])
def test_every_ratio_reads_in_one_direction(ours: float, best: float, higher: bool,
                                             expected: str) -> None:
    from benchmarks.report import verdict_text

    assert verdict_text(ours, best, higher) == expected


def test_scenario_tables_say_better_or_worse_in_one_direction() -> None:
    latency = ScenarioResult("checkout+return", "µs per checkout", False, [
        Measurement("connguard", "µs", [1.0]), Measurement("sqlalchemy QueuePool", "µs", [2.0]),
        Measurement("DBUtils PooledDB", "µs", [4.0])])
    throughput = ScenarioResult("port churn: requests", "requests/s", True, [
        Measurement("connguard.connect", "req/s", [100.0]),
        Measurement("pymysql.connect", "req/s", [400.0])])
    doc = report.results_document([latency, throughput], "10.11")
    text = report.markdown(doc)
    assert "| connguard " in text and "2.0× better |" in text  # 1 µs vs the best's 2 µs
    assert "| DBUtils PooledDB " in text and "2.0× worse |" in text
    assert "4.0× worse |" in text  # 100 req/s vs 400: higher is better here
    assert "×" not in text.split("| pymysql.connect")[1].split("\n")[0]  # the best itself
    assert "0.50×" not in text and "0.25×" not in text  # no raw quotients


@pytest.mark.parametrize("value, shown", [
    (3.0, "3"), (1.0, "1"), (0.0, "0"), (12345.0, "12,345"), (0.5, "0.50"), (76.5, "76.5"),
    (2.8234, "2.82"), (0.000058, "0.000058"), (None, "—")])
def test_figures_are_shown_with_sensible_precision(value: Any, shown: str) -> None:
    assert report.num(value) == shown


def test_a_client_that_never_failed_has_no_failure_latency() -> None:
    from benchmarks.common import failure_latency

    latency = failure_latency(ScenarioResult("outage: failed-call latency", "ms", False, [
        Measurement("connguard Pool", "ms", [0.0, 0.0]),
        Measurement("sqlalchemy QueuePool", "ms", [6.5, 6.1])]))
    assert [m.client for m in latency.measurements] == ["sqlalchemy QueuePool"]
    assert latency.notes == ["no failed calls, so no failure latency: connguard Pool"]
    doc = report.results_document([latency], "10.11")
    row = report.summary_rows(doc)[0]
    assert row[2] == "no failed calls (connguard Pool)" and row[4] == "better (none failed)"
    assert "| 0 (connguard" not in report.markdown(doc)
