"""The ``poolguard`` command line.

``poolguard demo`` replays the outage poolguard was written for, plain
SQLAlchemy against a guarded pool, side by side (on a SQLite file by default);
``poolguard bench`` measures a real database through a guarded engine at
several pool sizes and concurrencies, and recommends a pool size.

Only the package's own dependencies are needed (``--plot`` needs matplotlib:
``pip install "sqlalchemy-poolguard[plot]"``). Bad arguments and unreachable databases
get one line on stderr and a non-zero exit status: 2 for a usage error, 1
for anything else.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, NoReturn

from ._db import CliError, UsageError, describe_error

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser() -> argparse.ArgumentParser:
    from . import bench, demo

    parser = _Parser(
        prog="poolguard",
        description="poolguard's command line: replay the outage it was written for "
        "(demo), or size a pool against a real database (bench).",
    )
    from poolguard import __version__

    parser.add_argument("--version", action="version", version=f"poolguard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo_parser = commands.add_parser(
        "demo",
        help="replay the postmortem: plain SQLAlchemy vs poolguard, side by side",
        description="Replays the outage poolguard was written for as a small service: steady "
        "logins and other work, then an unoptimized query holding connections, then the fix; "
        "plain SQLAlchemy and poolguard.wrap() run the same traffic side by side. Default: a "
        "SQLite file in a temporary folder, under a minute.",
    )
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(run=demo.run)
    bench_parser = commands.add_parser(
        "bench",
        help="measure pool sizes x concurrency on a real database; recommend a pool size",
        description=(
            "For each pool size and concurrency, drives a workload against the database\n"
            "through a guarded engine, --repeat times, and measures throughput (with its\n"
            "spread between runs), latency, acquire waits, timeouts, rejections and the\n"
            "connections the server saw; then recommends a pool size (the throughput knee\n"
            "within the noise, Little's law, --replicas x max_connections). Progress goes\n"
            "to stderr, results to stdout."
        ),
        epilog=bench.EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    bench.add_arguments(bench_parser)
    bench_parser.set_defaults(run=bench.run)
    return parser


def _password(args: argparse.Namespace) -> str | None:
    url = getattr(args, "url", None)
    if not url:
        return None
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).password
    except Exception:  # noqa: BLE001 - an invalid URL has no password to hide
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``poolguard`` with ``argv`` (default: ``sys.argv[1:]``); return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        sys.stderr.write("poolguard: error: a command is required: demo or bench "
                         "(see 'poolguard --help')\n")
        return 2
    prog = f"poolguard {args.command}"
    try:
        status: int = args.run(args)
    except CliError as exc:
        sys.stderr.write(f"{prog}: error: {exc}\n")
        return 2 if isinstance(exc, UsageError) else 1
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): nothing left to say to it.
        sys.stdout = None
        return 1
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        sys.stderr.write(f"{prog}: error: {describe_error(exc, _password(args))}\n")
        return 1
    return status
