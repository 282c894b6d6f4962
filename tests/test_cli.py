"""The command line, run as a user runs it: ``poolguard demo`` and ``poolguard bench``.

Each command runs in a subprocess (``python -m poolguard.cli``) against SQLite
and the real servers, and its JSON output is checked for sense: the demo's
guarded side is exactly the recommended setting, its open loop offers every
scheduled request and counts what plain SQLAlchemy fails to serve, every count
adds up, the culprit is named with its call site;
the benchmark's numbers agree with each other and with the server's view.
No assertion compares a duration with a fixed threshold. Bad arguments must
give one line on stderr, a non-zero status, no traceback and no password.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from poolguard.cli import bench
from poolguard.cli._db import UsageError

#: Upper bound of one command (a hang fails the test instead of the suite).
RUN_TIMEOUT = 240
PASSWORD = "s3cr3t-pw"  # noqa: S105 - a fake one, that must never be printed
CULPRIT_EVENTS = {"pool.exhausted", "query.slow", "connection.held_too_long", "culprit.isolated"}


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-m", "poolguard.cli", *args],
        capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False, env=env, cwd=cwd,
    )


def _json(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def _url_args(request: pytest.FixtureRequest, backend: str) -> list[str]:
    if backend == "sqlite":
        return []
    return ["--url", request.getfixturevalue(f"_{backend}_server")]


# -- the installed command ------------------------------------------------------


def test_the_poolguard_script_is_installed_next_to_the_interpreter() -> None:
    script = shutil.which("poolguard", path=str(Path(sys.executable).parent))
    assert script is not None, "pip install -e . installs the 'poolguard' console script"
    done = subprocess.run(  # noqa: S603
        [script, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    import poolguard

    assert done.stdout.strip() == f"poolguard {poolguard.__version__}"


def test_the_benchmark_runs_the_command_lines_scenario() -> None:
    from poolguard import recommended
    from poolguard.cli import scenario

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import postmortem
    finally:
        sys.path.pop(0)
    assert postmortem.run is scenario.run
    assert postmortem.run_side is scenario.run_side
    assert postmortem.Traffic is scenario.Traffic
    assert postmortem.VARIANTS is scenario.VARIANTS
    # The guarded side is the recommended setting, as is: nothing names the culprit.
    assert postmortem.guarded_options() == recommended.options()


# -- poolguard demo ----------------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
    ],
)
def demo(request: pytest.FixtureRequest) -> dict[str, Any]:
    return _json(_run("demo", "--quick", "--json", *_url_args(request, request.param)))


def test_demo_guarded_side_is_exactly_the_recommended_setting(demo: dict[str, Any]) -> None:
    from poolguard import recommended

    options = dict(demo["guarded_options"])
    assert options.pop("name") == "auth-db"
    assert options == recommended.options()
    # No tag named in advance (breaker_per_tag names none: every tag gets one).
    assert not [key for key in options if "tag" in key and key != "breaker_per_tag"]


def test_demo_offers_every_scheduled_request_and_counts_each_once(
    demo: dict[str, Any],
) -> None:
    from poolguard.cli.scenario import Traffic, arrivals

    traffic = Traffic(**demo["traffic"])
    assert demo["variant"] == traffic.variant == "tagged"
    schedule = arrivals(traffic)
    for side, result in demo["sides"].items():
        for phase, stats in result["phases"].items():
            lo, hi = traffic.bounds()[phase]
            expected = dict.fromkeys(stats["by_kind"], 0)
            for at, kind in schedule:
                if lo <= at < hi:
                    expected[kind] += 1
            # The open loop: every arrival is a request, served or not.
            offered = {kind: row["attempted"] for kind, row in stats["by_kind"].items()}
            assert offered == expected, (side, phase)


def test_demo_counts_plain_sqlalchemys_unserved_requests(demo: dict[str, Any]) -> None:
    plain = demo["sides"]["plain"]
    storm = plain["phases"]["storm"]["protected"]
    # A pool held by the culprit: plain SQLAlchemy fails to serve some protected
    # requests, and they are counted (no worker in time, queue full or late).
    assert storm["failed"] > 0
    assert set(storm["errors"]) <= {"no_worker", "accept_queue_full", "late", "timeout"}
    assert storm["served"] < storm["attempted"]
    assert plain["peak_culprits_running"]["storm"] > 0
    assert plain["phases"]["storm"]["by_kind"]["culprit"]["served"] == 0  # all late


def test_demo_counts_add_up(demo: dict[str, Any]) -> None:
    for side, result in demo["sides"].items():
        assert set(result["phases"]) == {"pre", "storm", "after"}
        for phase, stats in result["phases"].items():
            rows = [*stats["by_priority"].values(), *stats["by_kind"].values(),
                    stats["protected"]]
            for row in rows:
                where = (side, phase, row)
                assert row["served"] + row["failed"] + row["shed"] == row["attempted"], where
                assert sum(row["shed_reasons"].values()) == row["shed"], where
                assert sum(row["errors"].values()) == row["failed"], where
                if row["served"]:
                    assert row["p50_ms"] <= row["p99_ms"], where
                else:
                    assert row["p50_ms"] is None, where
            for priority, row in stats["by_priority"].items():
                kinds = [k for k in stats["by_kind"].values() if k["priority"] == priority]
                for key in ("attempted", "served", "failed", "shed"):
                    assert row[key] == sum(k[key] for k in kinds), (side, phase, priority, key)
            protected = [stats["by_kind"][k] for k in demo["headline"]["protected"]]
            assert stats["protected"]["attempted"] == sum(k["attempted"] for k in protected)
        # Nothing is left checked out.
        assert result["leftover"]["pool_checkedout"] == 0
        assessment = result["assessment"]
        assert assessment["side"] == side
        assert assessment["verdict"].startswith("PASS" if assessment["pass"] else "FAIL")
    assert all(row["shed"] == 0 for phase in demo["sides"]["plain"]["phases"].values()
               for row in phase["by_kind"].values())
    assert demo["sides"]["plain"]["rejections"] == {}
    assert demo["sides"]["guarded"]["leftover"]["permits"] == 0
    assert demo["sides"]["guarded"]["assessment"]["isolations"] == len(demo["isolations"])


@pytest.mark.timing  # a culprit cut at its deadline may end just short of query.slow
def test_demo_names_the_culprit_and_its_call_site(demo: dict[str, Any]) -> None:
    culprit = demo["sides"]["guarded"]["culprit"]
    assert culprit is not None
    assert culprit["event"] in CULPRIT_EVENTS
    assert "auth_tokens" in culprit["statement"]
    assert culprit["site"].endswith("in scan_auth_tokens")
    assert "scenario.py:" in culprit["site"]
    assert culprit["tag"] == "auth-token-scan"
    assert culprit["after_storm_s"] >= 0  # the scan starts with the storm
    assert demo["headline"]["time_to_culprit_s"] == {
        "plain": None, "guarded": culprit["after_storm_s"]
    }
    assert demo["sides"]["plain"]["culprit"] is None
    # The event itself is among the ones shown, and counted.
    assert culprit["event"] in demo["event_counts"]
    assert any(e["event"] == culprit["event"] for e in demo["events"])
    assert len(demo["events"]) <= 20


def test_demo_prints_a_report_without_a_terminal() -> None:
    done = _run("demo", "--quick")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "\r" not in out  # plain lines when stdout is not a terminal
    for text in ("During the storm", "plain SQLAlchemy", "poolguard.wrap", "Who held the pool",
                 "in scan_auth_tokens", "Events poolguard logged", "Protected traffic",
                 "storm: 8 requests/s", "the recommended setting only"):
        assert text in " ".join(out.split()), text  # lines are wrapped at 79
    assert "Traceback" not in done.stderr
    # Progress on stderr (plain lines without a terminal), never mixed into the report.
    assert "plain|guarded protected served/s" in done.stderr
    assert "plain|guarded protected served/s" not in out
    assert "\r" not in done.stderr
    assert [line for line in out.splitlines() if len(line) > 79] == []


@pytest.mark.parametrize("variant", ["untagged", "critical", "uniform"])
def test_demo_runs_every_variant(variant: str) -> None:
    report = _json(_run("demo", "--quick", "--json", "--variant", variant))
    assert report["variant"] == variant
    plain, guarded = report["sides"]["plain"], report["sides"]["guarded"]
    culprit_runs = plain["phases"]["storm"]["by_kind"]["culprit"]["attempted"]
    if variant == "uniform":
        assert culprit_runs == 0
        assert guarded["culprit"] is None
    else:
        assert culprit_runs > 0
        assert plain["peak_culprits_running"]["storm"] > 0
    expected = ["api"] if variant == "critical" else ["login", "api"]
    assert report["headline"]["protected"] == expected
    for side in (plain, guarded):
        assert side["leftover"]["pool_checkedout"] == 0


def test_demo_sheds_nothing_before_the_storm(demo: dict[str, Any]) -> None:
    # A healthy pool: shedding background work there is a false alarm.
    pre = demo["sides"]["guarded"]["phases"]["pre"]
    assert {kind: row["shed"] for kind, row in pre["by_kind"].items()} == dict.fromkeys(
        pre["by_kind"], 0)
    assert pre["by_priority"]["background"]["served"] > 0


# -- poolguard bench ---------------------------------------------------------------


@pytest.fixture(
    scope="module",
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgresql),
        pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
    ],
)
def bench_run(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    report = _json(_run("bench", "--duration", "1s", "--pool-sizes", "2,4", "--concurrency",
                        "4", "--repeat", "2", "--json", *_url_args(request, request.param)))
    return request.param, report


def test_bench_numbers_are_consistent(bench_run: tuple[str, dict[str, Any]]) -> None:
    backend, report = bench_run
    results = report["results"]
    assert [(r["pool_size"], r["concurrency"]) for r in results] == [(2, 4), (4, 4)]
    # Two rounds over both cells, interleaved.
    assert [(r["pool_size"], r["concurrency"]) for r in report["runs"]] == [(2, 4), (4, 4)] * 2
    for r in report["runs"]:
        assert r["served"] > 0
        assert r["requests"] == r["served"] + r["timeouts"] + r["rejections"] + r["errors"]
        assert r["errors"] == 0, r["error_types"]
    for r in results:
        assert r["runs"] == 2
        assert r["throughput"] > 0
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert 0 <= r["wait_p50_ms"] <= r["wait_p99_ms"]
        assert 0 < r["peak_in_use"] <= r["pool_size"]
        # Little's law: never more connections busy on average than the pool has.
        assert 0 < r["busy_connections"] <= r["pool_size"] + 0.01
        if backend == "sqlite":
            assert r["server_connections"] is None
        else:
            assert 0 < r["server_connections"] <= r["pool_size"]
    rec = report["recommendation"]
    assert rec["recommended_pool_size"] in (2, 4)
    assert rec["knees"] == {"4": rec["recommended_pool_size"]}
    assert rec["reasoning"]
    assert any("Little's law" in line for line in rec["reasoning"])
    if backend == "sqlite":
        assert rec["server_limit"] is None
    else:
        assert rec["server_limit"]["max_connections"] > 0
        assert report["database"]["backend"] == backend.replace("mariadb", "mysql")


@pytest.mark.postgresql
def test_bench_warns_when_replicas_exceed_max_connections(postgresql_url: str) -> None:
    # Two replica processes, each with a pool of 60 (only 2 connections opened).
    report = _json(_run("bench", "--url", postgresql_url, "--duration", "0.5s", "--pool-sizes",
                        "60", "--concurrency", "2", "--repeat", "1", "--replicas", "2",
                        "--json"))
    rec = report["recommendation"]
    assert rec["replicas"] == 2
    assert any("max_connections" in w for w in rec["warnings"])


def test_bench_prints_a_table_and_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "bench.png"
    done = _run("bench", "--duration", "0.5s", "--pool-sizes", "1,2", "--concurrency", "2",
                "--repeat", "1", "--plot", str(png))
    assert done.returncode == 0, done.stderr
    assert "Recommendation: pool_size=" in done.stdout
    assert "\r" not in done.stdout
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(data) > 10_000


def test_bench_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "from poolguard.cli import main\n"
        f"sys.exit(main(['bench', '--duration', '0.5s', '--plot', {str(tmp_path / 'x.png')!r}]))"
    )
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=RUN_TIMEOUT,
        check=False,
    )
    assert done.returncode == 1
    assert 'pip install "sqlalchemy-poolguard[plot]"' in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "x.png").exists()


def test_bench_runs_a_workload_file(tmp_path: Path) -> None:
    workload = tmp_path / "workload.txt"
    workload.write_text(
        "# weight priority tag | SQL\n"
        "\n"
        "3 critical login | SELECT 1\n"
        "1 background - | SELECT sleep(0.002)\n",
        encoding="utf-8",
    )
    report = _json(_run("bench", "--workload", str(workload), "--duration", "0.5s",
                        "--pool-sizes", "2", "--concurrency", "2", "--repeat", "1", "--json",
                        "--option", "reserved_critical=1"))
    assert report["workload"]["source"] == str(workload)
    assert report["workload"]["statements"] == [
        {"weight": 3.0, "priority": "critical", "tag": "login", "sql": "SELECT 1"},
        {"weight": 1.0, "priority": "background", "tag": None, "sql": "SELECT sleep(0.002)"},
    ]
    assert report["guard_options"] == {"acquire_timeout": 2.0, "reserved_critical": 1.0}
    assert report["runs"][0]["served"] > 0


def test_bench_prints_the_builtin_workload_in_its_own_format(tmp_path: Path) -> None:
    done = _run("bench", "--print-workload")
    assert done.returncode == 0, done.stderr
    assert bench.parse_workload(done.stdout) == bench.default_workload("sqlite")


def test_bench_hot_path(tmp_path: Path) -> None:
    report = _json(_run("bench", "--hot-path", "--json", "--rounds", "2", "--iterations", "20"))
    assert report["meta"]["processes"] == 1
    cases = {r["case"]: r for r in report["results"]}
    assert set(cases) == {"engine.connect/close", "pool.connect/close", "connect+SELECT 1+close"}
    for r in cases.values():
        assert r["plain_us"] > 0
        assert r["guarded_us"] > 0
        assert r["ratio"] > 0
        assert r["ratio_p25"] <= r["ratio_p75"]
        assert r["rounds"] == 2
    text = _run("bench", "--hot-path", "--rounds", "2", "--iterations", "20")
    assert text.returncode == 0, text.stderr
    assert "ratio" in text.stdout
    assert "engine.connect/close" in text.stdout


# -- bad arguments -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "status", "expected"),
    [
        ([], 2, "a command is required"),
        (["bench", "--pool-sizes", "x"], 2, "--pool-sizes"),
        (["bench", "--pool-sizes", "5,0"], 2, "--pool-sizes"),
        (["bench", "--concurrency", "many"], 2, "--concurrency"),
        (["bench", "--duration", "-1"], 2, "--duration"),
        (["bench", "--duration", "10h"], 2, "--duration"),
        (["bench", "--replicas", "0"], 2, "--replicas"),
        (["bench", "--option", "no_such_option=1"], 2, "no_such_option"),
        (["bench", "--option", "reserved_critical=lots"], 2, "reserved_critical"),
        (["bench", "--workload", "/nonexistent/workload.txt"], 2, "--workload"),
        (["demo", "--bogus"], 2, "--bogus"),
        (["bench", "--url", "not a url"], 2, "invalid database URL"),
        (["bench", "--url", "postgresql+asyncpg://u@127.0.0.1/db"], 2, "asyncio driver"),
        (["bench", "--url", f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/test"], 1,
         "cannot connect to postgresql+psycopg://postgres:***@127.0.0.1:1/test"),
        (["demo", "--url", f"postgresql+psycopg://postgres:{PASSWORD}@127.0.0.1:1/test"], 1,
         "cannot connect to postgresql+psycopg://postgres:***@127.0.0.1:1/test"),
        (["demo", "--url", f"mysql+pymysql://root:{PASSWORD}@127.0.0.1:1/test"], 1,
         "cannot connect to mysql+pymysql://root:***@127.0.0.1:1/test"),
        (["bench", "--hot-path", "--url", f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:1/t"],
         1, "cannot connect"),
        (["bench", "--hot-path", "--contention", "--url",
          f"postgresql+psycopg://u:{PASSWORD}@127.0.0.1:1/t"], 1, "cannot connect"),
        (["bench", "--hot-path", "--contention", "--rounds", "3"], 2,
         "--hot-path --contention does not use --rounds; it takes --url, --quick"),
        (["bench", "--option", "aquire_timeout=1"], 2, "did you mean 'acquire_timeout'?"),
        (["bench", "--hot-path", "--duration", "5s", "--pool-sizes", "2"], 2,
         "does not use --pool-sizes, --duration"),
        (["bench", "--hot-path", "--repeat", "5"], 2, "does not use --repeat"),
        (["bench", "--rounds", "3", "--otel"], 2, "does not use --rounds, --otel"),
        # mysql:// means MySQLdb: the [mysql] extra (PyMySQL) would not help.
        (["demo", "--url", f"mysql://root:{PASSWORD}@127.0.0.1:1/test"], 1,
         "pip install mysqlclient, or write the URL as mysql+pymysql://"),
    ],
)
def test_bad_arguments_get_one_line_and_a_nonzero_status(
    args: list[str], status: int, expected: str
) -> None:
    done = _run(*args)
    assert done.returncode == status, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert expected in lines[0]
    assert lines[0].startswith("poolguard")
    assert "Traceback" not in done.stderr + done.stdout
    assert PASSWORD not in done.stderr + done.stdout


def test_a_bad_workload_file_names_the_line(tmp_path: Path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("1 | SELECT 1\n# fine so far\nx normal | SELECT 2\n", encoding="utf-8")
    done = _run("bench", "--workload", str(workload), "--duration", "0.5s")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"poolguard bench: error: {workload}:3: weight 'x' is not a number > 0"
    )


def test_a_failing_workload_statement_stops_the_bench_before_it_starts(tmp_path: Path) -> None:
    workload = tmp_path / "w.txt"
    workload.write_text("1 | SELECT 1\n1 | SELECT * FROM no_such_table\n", encoding="utf-8")
    done = _run("bench", "--workload", str(workload), "--duration", "0.5s", "--json")
    assert done.returncode == 2
    assert "statement 2" in done.stderr
    assert "no_such_table" in done.stderr
    assert done.stdout == ""


# -- the pieces, in process --------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("20s", 20.0), ("1.5s", 1.5), ("500ms", 0.5), ("2m", 120.0), ("3", 3.0), (".5s", 0.5)],
)
def test_durations(text: str, seconds: float) -> None:
    assert bench.parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "0", "-1", "0s", "x", "10h", "1e400", "s", "nan"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="invalid duration"):
        bench.parse_duration(text)


def test_sizes_keep_order_and_drop_repeats() -> None:
    assert bench.parse_sizes("5, 10,20,10") == [5, 10, 20]
    for bad in ("", "5,", "a", "-5", "0", "1.5"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench.parse_sizes(bad)


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql", "mysql"])
def test_the_builtin_workload_round_trips_through_the_file_format(dialect: str) -> None:
    workload = bench.default_workload(dialect)
    assert bench.parse_workload(bench.format_workload(workload)) == workload
    assert sum(s.weight for s in workload) > 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("SELECT 1", "expected 'weight [priority [tag]] | SQL'"),
        ("1 |", "expected 'weight [priority [tag]] | SQL'"),
        ("| SELECT 1", "expected 'weight [priority [tag]]' before '|'"),
        ("0 | SELECT 1", "weight '0' is not a number > 0"),
        ("-2 | SELECT 1", "weight '-2' is not a number > 0"),
        ("inf | SELECT 1", "weight 'inf' is not a number > 0"),
        ("1 urgent | SELECT 1", "priority 'urgent' is not one of"),
        ("1 normal tag extra | SELECT 1", "expected 'weight [priority [tag]]' before '|'"),
    ],
)
def test_workload_errors_name_the_line(line: str, message: str) -> None:
    with pytest.raises(UsageError) as raised:
        bench.parse_workload(f"# header\n1 | SELECT 1\n{line}\n", "w.txt")
    assert str(raised.value).startswith("w.txt:3: ")
    assert message in str(raised.value)


def test_an_empty_workload_is_an_error() -> None:
    with pytest.raises(UsageError, match="no statements"):
        bench.parse_workload("# nothing\n\n", "w.txt")


def test_sql_keeps_its_own_bars() -> None:
    (statement,) = bench.parse_workload("2 background nightly | SELECT 'a|b' || 'c'")
    assert statement == bench.Statement(2.0, "background", "nightly", "SELECT 'a|b' || 'c'")


def _result(pool: int, workers: int, rps: float, hold_ms: float = 5.0) -> bench.Result:
    busy = min(pool, workers) * 0.95
    return bench.Result(
        pool_size=pool, concurrency=workers, duration_s=10.0, requests=int(rps * 10),
        served=int(rps * 10), throughput=rps, p50_ms=1.0, p95_ms=2.0, p99_ms=3.0 * pool,
        wait_p50_ms=0.0, wait_p99_ms=1.0, timeouts=0, rejections=0, errors=0, error_types={},
        server_connections=pool, peak_in_use=min(pool, workers), mean_hold_ms=hold_ms,
        busy_connections=busy,
    )


def test_recommend_takes_the_largest_knee_and_checks_max_connections() -> None:
    results = [
        _result(5, 16, 1000), _result(10, 16, 1900), _result(20, 16, 2000), _result(40, 16, 2010),
        _result(5, 64, 1000), _result(10, 64, 1500), _result(20, 64, 2400), _result(40, 64, 2500),
    ]
    rec = bench.recommend(results, replicas=6,
                          server_limit={"max_connections": 100, "reserved": 3})
    assert rec["knees"] == {"16": 10, "64": 20}  # 1900 >= 0.9 x 2010; 2400 >= 0.9 x 2500
    assert rec["recommended_pool_size"] == 20
    assert rec["littles_law"]["64"]["pool_size"] == 40
    assert rec["server_limit"] == {"max_connections": 100, "reserved": 3, "usable": 97}
    (warning,) = rec["warnings"]
    assert "6 x 20 = 120 connections" in warning
    assert "(97)" in warning
    assert "lower the pool size to 16" in warning

    fits = bench.recommend(results, replicas=4,
                           server_limit={"max_connections": 100, "reserved": 3})
    assert fits["recommended_pool_size"] == 20
    # 4 x 20 fits; 4 x 40 would not, and that is said.
    assert fits["warnings"] == [
        "pool sizes 40 x 4 replica(s) would exceed the server's 97 usable connections."
    ]
    assert any("4 replica(s) x pool 20 = 80 connections" in r for r in fits["reasoning"])


def test_recommend_says_when_the_curve_has_no_knee_inside_the_range() -> None:
    growing = [_result(2, 64, 100), _result(4, 64, 200), _result(8, 64, 400)]
    rec = bench.recommend(growing)
    assert rec["recommended_pool_size"] == 8
    assert "try larger ones" in rec["reasoning"][0]
    assert rec["server_limit"] is None
    flat = [_result(2, 64, 1000), _result(4, 64, 1010), _result(8, 64, 1020)]
    assert "try smaller ones" in bench.recommend(flat)["reasoning"][0]
    nothing = [_result(2, 4, 0.0)]
    assert bench.recommend(nothing)["recommended_pool_size"] is None


# -- the issues of the command line's first users ----------------------------------------------

#: Text output fits an 80-column terminal.
WIDTH = 79


def _too_wide(text: str) -> list[str]:
    return [line for line in text.splitlines() if len(line) > WIDTH]


def test_bench_busy_is_throughput_times_hold(bench_run: tuple[str, dict[str, Any]]) -> None:
    # The legend says busy = req/s x hold: the column must be that product, to rounding.
    _, report = bench_run
    for row in [*report["results"], *report["runs"]]:
        product = row["throughput"] * row["mean_hold_ms"] / 1000
        assert row["busy_connections"] == pytest.approx(product, abs=0.006), row


def test_bench_repeats_each_cell_and_reports_the_spread() -> None:
    report = _json(_run("bench", "--duration", "0.3s", "--pool-sizes", "1,2", "--concurrency",
                        "2", "--repeat", "3", "--json", "--quiet"))
    assert report["meta"]["repeat"] == 3
    assert len(report["runs"]) == 6
    for cell in report["results"]:
        runs = [r["throughput"] for r in report["runs"]
                if (r["pool_size"], r["concurrency"]) == (cell["pool_size"], 2)]
        assert cell["runs"] == 3
        assert cell["throughput_min"] == min(runs)
        assert cell["throughput_max"] == max(runs)
        assert cell["throughput"] == pytest.approx(sorted(runs)[1], abs=0.01)
        half_range = (max(runs) - min(runs)) / 2 / cell["throughput"] * 100
        assert cell["spread_pct"] == pytest.approx(half_range, abs=0.06)
    rec = report["recommendation"]
    noise = [line for line in rec["reasoning"] if "noise" in line]
    assert noise, rec["reasoning"]
    # The default database is said, plainly, to tell nothing about a real server.
    assert any("tell nothing about the pool size for a real database server" in w
               for w in rec["warnings"])


def _runs(pool: int, workers: int, *throughputs: float) -> list[bench.Result]:
    return [
        dataclasses.replace(_result(pool, workers, tp), busy_connections=tp * 5.0 / 1000)
        for tp in throughputs
    ]


def test_recommend_takes_the_smallest_pool_within_the_noise_of_the_best() -> None:
    runs = [*_runs(5, 32, 400, 450, 500), *_runs(10, 32, 700, 900, 1100),
            *_runs(20, 32, 1000, 1200, 1400), *_runs(40, 32, 1050, 1150, 1250)]
    rec = bench.recommend(runs)
    # Pool 10's median (900) is below 90% of the best (1,200), but its best run
    # beats pool 20's worst: the runs cannot tell them apart.
    assert rec["recommended_pool_size"] == 10
    assert "the noise of it" in rec["reasoning"][0]
    assert ("pools 10, 20, 40 differ by less than the noise between runs"
            in rec["reasoning"][1])
    assert "cannot tell them apart" in rec["reasoning"][1]
    assert "vary too much to rank the sizes" in rec["reasoning"][0]
    # Pool 10 spread +/-22% between its runs: said plainly.
    (noisy,) = rec["warnings"]
    assert "varied by up to +/-22% between runs (pool 10, 32 workers)" in noisy
    apart = bench.recommend([*_runs(5, 32, 400, 410, 420), *_runs(10, 32, 990, 1000, 1010)])
    assert apart["recommended_pool_size"] == 10
    assert "every other pool size is outside the noise" in apart["reasoning"][1]
    assert apart["warnings"] == []
    single = bench.recommend([*_runs(5, 32, 400), *_runs(10, 32, 1000)])
    assert "no spread was measured" in single["reasoning"][1]


def test_bench_progress_goes_to_stderr_and_results_to_stdout_when_piped() -> None:
    done = _run("bench", "--duration", "0.3s", "--pool-sizes", "1,2", "--concurrency", "2",
                "--repeat", "2")
    assert done.returncode == 0, done.stderr
    progress = done.stderr.splitlines()
    assert [line.split(":")[0] for line in progress] == [
        "[1/4] pool 1, 2 workers, run 1/2", "[2/4] pool 2, 2 workers, run 1/2",
        "[3/4] pool 1, 2 workers, run 2/2", "[4/4] pool 2, 2 workers, run 2/2",
    ]
    assert all("req/s" in line for line in progress)
    assert "\r" not in done.stdout + done.stderr
    assert "[1/4]" not in done.stdout
    assert "Recommendation: pool_size=" in done.stdout
    assert "busy = req/s x hold" in done.stdout
    assert _too_wide(done.stdout) == []
    quiet = _run("bench", "--duration", "0.3s", "--pool-sizes", "1", "--concurrency", "1",
                 "--repeat", "1", "--quiet")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""


def test_bench_refuses_a_plot_format_before_measuring(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    done = _run("bench", "--duration", "1s", "--pool-sizes", "1", "--concurrency", "1",
                "--plot", str(tmp_path / "x.txt"))
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # nothing was measured
    (line,) = done.stderr.splitlines()
    assert f"--plot {tmp_path / 'x.txt'}: '.txt' is no image format" in line
    assert ".png" in line
    assert not (tmp_path / "x.txt").exists()


def test_bench_hot_path_measures_export_only_with_otel() -> None:
    args = ("bench", "--hot-path", "--rounds", "2", "--iterations", "20")
    report = _json(_run(*args, "--otel", "--json"))
    assert report["meta"]["otel"] is True
    assert all(r["export_cpu_us"] > 0 for r in report["results"])
    text = _run(*args)
    assert text.returncode == 0, text.stderr
    head = next(line for line in text.stdout.splitlines() if line.startswith("case"))
    assert "+export" not in head
    assert "--otel" in text.stdout  # says how to measure it
    assert _too_wide(text.stdout) == []
    with_otel = _run(*args, "--otel")
    assert with_otel.returncode == 0, with_otel.stderr
    head = next(line for line in with_otel.stdout.splitlines() if line.startswith("case"))
    assert head.split()[-1] == "+export"
    assert _too_wide(with_otel.stdout) == []


def test_help_fits_80_columns() -> None:
    env = {**os.environ, "COLUMNS": "80"}
    for command in ("bench", "demo"):
        done = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "poolguard.cli", command, "--help"], capture_output=True,
            text=True, timeout=RUN_TIMEOUT, check=False, env=env,
        )
        assert done.returncode == 0, done.stderr
        assert _too_wide(done.stdout) == [], command


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["bench", "--duration", "0.7s", "--pool-sizes", "1", "--concurrency", "2",
                      "--repeat", "1"], id="bench"),
        pytest.param(["demo", "--quick"], id="demo"),
    ],
)
def test_the_live_line_fits_an_80_column_terminal(args: list[str]) -> None:
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    try:
        done = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "poolguard.cli", *args], stdout=subprocess.PIPE,
            stderr=follower, timeout=RUN_TIMEOUT, check=False, env=env,
        )
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # the follower is closed: all read
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    assert done.returncode == 0, seen
    text = seen.decode()
    assert "\r" in text  # a live line on the terminal
    pieces = [p for line in text.replace("\r\n", "\n").split("\n") for p in line.split("\r")]
    assert [p for p in pieces if len(p) > WIDTH] == []
    assert "\r" not in done.stdout.decode()  # results stay plain
