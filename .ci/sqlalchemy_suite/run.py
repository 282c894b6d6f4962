#!/usr/bin/env python3
"""Run SQLAlchemy's own pool tests with ``QueuePool`` replaced by poolguard's guarded class.

    python .ci/sqlalchemy_suite/run.py [--workdir DIR] [--dburi URL] [--baseline]

Run it with the Python of the venv under test (poolguard and SQLAlchemy
installed, plus pytest and the DBAPI of ``--dburi``). It

1. downloads the sdist of the *installed* SQLAlchemy version from PyPI
   (``pip download --no-binary :all: --no-deps sqlalchemy==X``) and unpacks it;
2. with ``--baseline`` (for diagnosis; CI skips it to save the time), runs
   the suites on the stock ``QueuePool`` first: they must pass there, or the
   environment is at fault, not poolguard;
3. runs ``test/engine/test_pool.py`` and ``test/engine/test_reconnect.py``
   with the ``poolguard_swap`` plugin, which puts
   ``type(poolguard.wrap(create_engine("sqlite://", poolclass=QueuePool)).pool)``
   in place of ``sqlalchemy.pool.QueuePool`` before anything is collected;
4. fails on any failure or error not in ``EXPECTED_FAILURES``, on an expected
   failure that passed, on a skip not in ``ALLOWED_SKIPS``, when the plugin saw
   too few guarded pools (the swap was not in effect), when fewer tests ran
   than ``MIN_TESTS`` and, with ``--baseline``, on any stock failure and any
   test skipped or missing under the guard only.

The suite needs a PostgreSQL role ``scott`` (password ``tiger``) and the
schemas ``test_schema`` and ``test_schema_2`` in the database of ``--dburi``;
``.ci/run`` creates them. It uses the installed SQLAlchemy, not the sdist's
``lib/`` (``PYTHONNOUSERSITE=1`` stops SQLAlchemy's conftest from putting it on
``sys.path``), and checks that it did.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
SUITES = ("test/engine/test_pool.py", "test/engine/test_reconnect.py")
DEFAULT_DBURI = "postgresql+psycopg://scott:tiger@127.0.0.1:5432/test"
# Both suites hold ~205 tests on 2.0 and 2.1; far fewer means files went missing.
MIN_TESTS = 150
# Pools the guarded run must have guarded; SQLAlchemy's suites build ~220.
MIN_GUARDED_POOLS = 100
PYTEST_TIMEOUT_S = 600

# "file::Class::test[params]" patterns (fnmatch; the class name of backend
# tests carries the server, e.g. RealReconnectTest_postgresql+psycopg_15_20)
# -> why the guarded class cannot pass it. Keep it empty unless a test checks
# something poolguard deliberately does differently.
EXPECTED_FAILURES: dict[str, str] = {}

# Tests the guarded run may skip, same patterns -> why. Any other skip fails
# the step: a skip hides whatever the test would have shown.
ALLOWED_SKIPS: dict[str, str] = {
    "test/engine/test_reconnect.py::RealReconnectTest_*::test_rollback_on_invalid_twophase": (
        "needs max_prepared_transactions > 0; PostgreSQL's default is 0, "
        "and the stock QueuePool skips it too"
    ),
}


@dataclass
class Outcome:
    """Per-test outcomes of one pytest run, read from its JUnit XML."""

    passed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return len(self.passed) + len(self.failed) + len(self.skipped)

    def counts(self) -> str:
        return f"{len(self.passed)} passed, {len(self.failed)} failed, {len(self.skipped)} skipped"


def log(message: str) -> None:
    print(f"[sqlalchemy-suite] {message}", flush=True)


def fetch_sdist(version: str, workdir: Path) -> Path:
    """Download and unpack SQLAlchemy's sdist; return the source tree."""
    download = workdir / "download"
    download.mkdir(parents=True, exist_ok=True)
    subprocess.run(  # noqa: S603  # our own arguments
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-binary",
            ":all:",
            "--no-deps",
            "--dest",
            str(download),
            f"sqlalchemy=={version}",
        ],
        check=True,
    )
    archives = [p for p in download.iterdir() if p.name.lower() == f"sqlalchemy-{version}.tar.gz"]
    if len(archives) != 1:
        raise SystemExit(
            f"expected one sqlalchemy-{version}.tar.gz in {download}, "
            f"found {sorted(p.name for p in download.iterdir())}"
        )
    tree = workdir / "src"
    shutil.rmtree(tree, ignore_errors=True)
    tree.mkdir()
    if not hasattr(tarfile, "data_filter"):
        raise SystemExit(
            "unpacking the sdist needs tarfile's extraction filters "
            "(Python 3.12, 3.11.4+ or 3.10.12+)"
        )
    with tarfile.open(archives[0]) as tar:
        # The "data" filter refuses absolute paths, links out of the tree and
        # device files (Python >= 3.11.4, 3.10.12).
        tar.extractall(tree, filter="data")
    (root,) = tree.iterdir()
    for suite in SUITES:
        if not (root / suite).is_file():
            raise SystemExit(f"{suite} is not in the sdist of SQLAlchemy {version}")
    return root


def read_junit(path: Path, *, guarded: bool) -> Outcome:
    worst: dict[str, str] = {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    # The junit file is pytest's, written by the run just made.
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314
        # classname "test.engine.test_pool.QueuePoolTest" -> test/engine/test_pool.py::QueuePoolTest
        module, _, cls = case.get("classname", "").rpartition(".")
        name = f"{module.replace('.', '/')}.py::{cls}::{case.get('name')}"
        if guarded:
            # Parameter ids made from the class name: test_recreate_state[QueuePool-...]
            name = name.replace("[GuardedQueuePool-", "[QueuePool-")
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            kind = "failed"
        elif "skipped" in kinds:
            kind = "skipped"
        else:
            kind = "passed"
        # A test that fails in its call and again in teardown has two entries.
        if rank[kind] >= rank[worst.get(name, "passed")]:
            worst[name] = kind
    outcome = Outcome()
    for name, kind in worst.items():
        getattr(outcome, kind).append(name)
    return outcome


def run_suite(root: Path, dburi: str, *, guarded: bool, workdir: Path) -> tuple[Outcome, dict]:
    label = "guarded" if guarded else "stock"
    junit = workdir / f"junit-{label}.xml"
    report = workdir / f"swap-{label}.json"
    junit.unlink(missing_ok=True)
    report.unlink(missing_ok=True)
    env = dict(os.environ)
    # SQLAlchemy's conftest puts the sdist's lib/ first on sys.path unless
    # sys.flags.no_user_site: test the installed copy instead.
    env["PYTHONNOUSERSITE"] = "1"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        *SUITES,
        "--dburi",
        dburi,
        f"--junitxml={junit}",
        # A thread dying of an exception (a waiter crashing inside the pool)
        # fails its test: many of these tests only count results per thread.
        "-W",
        "error::pytest.PytestUnhandledThreadExceptionWarning",
    ]
    if guarded:
        cmd[3:3] = ["-p", "poolguard_swap"]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env["SA_SUITE_REPORT"] = str(report)
        env["SA_SUITE_MIN_GUARDED_POOLS"] = str(MIN_GUARDED_POOLS)
    log(f"{label} run: (cd {root} && {' '.join(cmd[1:])})")
    start = time.monotonic()
    try:
        rc = subprocess.run(  # noqa: S603  # our own arguments
            cmd, cwd=root, env=env, timeout=PYTEST_TIMEOUT_S, check=False
        ).returncode
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{label} run did not finish within {PYTEST_TIMEOUT_S}s") from None
    elapsed = time.monotonic() - start
    # 0: all passed; 1: some failed (judged below). Anything else: pytest
    # itself failed (usage, internal error, interrupted, nothing collected).
    if rc not in (0, 1) or not junit.is_file():
        raise SystemExit(f"{label} run: pytest exited with code {rc}")
    outcome = read_junit(junit, guarded=guarded)
    swap: dict = {}
    if guarded:
        if not report.is_file():
            raise SystemExit("guarded run: the poolguard_swap plugin wrote no report")
        swap = json.loads(report.read_text(encoding="utf-8"))
    log(f"{label} run: {outcome.counts()} in {elapsed:.1f}s (pytest exit code {rc})")
    return outcome, swap


def listed(name: str, patterns: dict[str, str]) -> str | None:
    for pattern, reason in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            return reason
    return None


def judge(
    guarded: Outcome, swap: dict, baseline: Outcome | None, version: str, root: Path
) -> list[str]:
    """Everything that fails the CI step, one line each."""
    problems = [f"poolguard_swap: {p}" for p in swap.get("problems", [])]
    if swap.get("sqlalchemy") != version:
        problems.append(f"the suite imported SQLAlchemy {swap.get('sqlalchemy')}, not {version}")
    if Path(swap.get("sqlalchemy_file", root)).resolve().is_relative_to(root):
        problems.append(
            f"the suite imported SQLAlchemy from {swap.get('sqlalchemy_file')}, "
            "the sdist, not the installed package"
        )
    if swap.get("guarded_pools", 0) < MIN_GUARDED_POOLS:
        problems.append(
            f"only {swap.get('guarded_pools', 0)} guarded pools (at least "
            f"{MIN_GUARDED_POOLS} expected): the swap was not in effect"
        )
    if guarded.total < MIN_TESTS:
        problems.append(f"only {guarded.total} tests ran (at least {MIN_TESTS} expected)")
    for name in guarded.failed:
        reason = listed(name, EXPECTED_FAILURES)
        if reason is None:
            problems.append(f"FAILED under poolguard: {name}")
        else:
            log(f"expected failure: {name}: {reason}")
    problems += [
        f"passed, but listed in EXPECTED_FAILURES: {name}"
        for name in guarded.passed
        if listed(name, EXPECTED_FAILURES) is not None
    ]
    for name in guarded.skipped:
        reason = listed(name, ALLOWED_SKIPS)
        if reason is None:
            problems.append(f"skipped under poolguard, not in ALLOWED_SKIPS: {name}")
        else:
            log(f"allowed skip: {name}: {reason}")
    if baseline is not None:
        problems += [f"FAILED on the stock QueuePool (environment?): {n}" for n in baseline.failed]
        # Class names of backend tests hold the server version: same in both runs.
        problems += [
            f"skipped under poolguard only: {n}"
            for n in sorted(set(guarded.skipped) - set(baseline.skipped))
        ]
        problems += [
            f"ran on the stock QueuePool, missing under poolguard: {n}"
            for n in sorted(
                {*baseline.passed, *baseline.failed, *baseline.skipped}
                - {*guarded.passed, *guarded.failed, *guarded.skipped}
            )
        ]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--workdir",
        type=Path,
        help="where the sdist and reports go (default: a temporary directory, removed afterwards)",
    )
    parser.add_argument(
        "--dburi",
        default=os.environ.get("SA_SUITE_DBURI", DEFAULT_DBURI),
        help=f"database for the backend tests (default: {DEFAULT_DBURI})",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="run the suites on the stock QueuePool first and compare",
    )
    args = parser.parse_args()

    version = metadata.version("sqlalchemy")
    log(f"{sys.executable}: SQLAlchemy {version}")
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        workdir = args.workdir
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sa-suite-")))
        workdir = workdir.resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        root = fetch_sdist(version, workdir)
        log(f"sdist unpacked in {root} ({time.monotonic() - start:.1f}s)")
        baseline = None
        if args.baseline:
            baseline, _ = run_suite(root, args.dburi, guarded=False, workdir=workdir)
        guarded, swap = run_suite(root, args.dburi, guarded=True, workdir=workdir)
        log(
            f"swap: {swap.get('guarded_class')} from {swap.get('poolguard_file')}; "
            f"{swap.get('guarded_pools')} guarded pools, "
            f"{swap.get('guarded_attaches')} guard attaches"
        )
        problems = judge(guarded, swap, baseline, version, root)
    elapsed = time.monotonic() - start
    summary = f"SQLAlchemy {version}: guarded {guarded.counts()}"
    if baseline is not None:
        summary += f"; stock {baseline.counts()}"
    if problems:
        for problem in problems:
            log(f"ERROR: {problem}")
        log(f"FAILED: {summary} ({elapsed:.0f}s)")
        return 1
    log(f"OK: {summary} ({elapsed:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
