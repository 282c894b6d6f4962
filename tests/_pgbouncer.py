"""A PgBouncer of the test suite's own: transaction mode, a free loopback port.

Debian's ``pgbouncer`` package provides the binary (``.ci/run`` installs it,
without its system service). Each :class:`PgBouncer` writes its own
configuration into a temporary directory, listens on 127.0.0.1 only and
forwards every database to the local PostgreSQL. PgBouncer refuses to run as
root, so as root it is started with ``-u postgres``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg

PGBOUNCER_ENV = "POOLGUARD_TEST_PGBOUNCER_URL"
"""Set to a PgBouncer URL (transaction mode) to use it instead of starting one."""

BINARY_CANDIDATES = ("pgbouncer", "/usr/sbin/pgbouncer")


def find_binary() -> str | None:
    """The pgbouncer executable, or None."""
    for name in BINARY_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgBouncer:
    """One PgBouncer process in front of ``upstream_host:upstream_port``.

    Settings are PgBouncer's own (``default_pool_size``, ``query_wait_timeout``,
    ``max_client_conn``, ...), written into ``pgbouncer.ini``.
    """

    def __init__(
        self,
        *,
        upstream_host: str = "127.0.0.1",
        upstream_port: int = 5432,
        user: str = "postgres",
        admin_user: str | None = None,
        stats_users: str | None = None,
        **settings: Any,
    ) -> None:
        binary = find_binary()
        if binary is None:
            raise RuntimeError("pgbouncer not found (apt-get install pgbouncer)")
        self.binary = binary
        self.user = user
        #: The one user of PgBouncer's admin_users (default: ``user``).
        self.admin_user = admin_user or user
        #: PgBouncer's stats_users (read-only console; default: ``admin_user``).
        self.stats_users = stats_users or self.admin_user
        self.port = free_port()
        self.upstream = (upstream_host, upstream_port)
        self.settings: dict[str, Any] = {
            "pool_mode": "transaction",
            "default_pool_size": 10,
            "max_client_conn": 200,
            "query_wait_timeout": 5,
            **settings,
        }
        self.dir = Path(tempfile.mkdtemp(prefix="poolguard-pgbouncer-"))
        # Readable and writable by the unprivileged user pgbouncer drops to.
        self.dir.chmod(0o777)
        self.process: subprocess.Popen[bytes] | None = None

    @classmethod
    def in_front_of(cls, postgresql_url: str, **settings: Any) -> tuple[PgBouncer, str]:
        """A (not yet started) PgBouncer in front of the server of ``postgresql_url``,
        and the database name to ask it for."""
        from sqlalchemy.engine import make_url

        url = make_url(postgresql_url)
        bouncer = cls(upstream_host=url.host or "127.0.0.1", upstream_port=url.port or 5432,
                      user=url.username or "postgres", **settings)
        return bouncer, url.database or "test"

    def admin_url(self, password: str | None = None) -> str:
        """A URL of this PgBouncer's admin console (``pgbouncer_admin_url``)."""
        secret = f":{password}" if password else ""
        return f"postgresql://{self.admin_user}{secret}@127.0.0.1:{self.port}/pgbouncer"

    # -- set-up ---------------------------------------------------------------

    def _write_config(self) -> Path:
        host, port = self.upstream
        lines = [
            "[databases]",
            f"* = host={host} port={port}",
            "[pgbouncer]",
            "listen_addr = 127.0.0.1",
            f"listen_port = {self.port}",
            "unix_socket_dir =",
            "auth_type = trust",
            f"auth_file = {self.dir / 'users.txt'}",
            f"admin_users = {self.admin_user}",
            f"stats_users = {self.stats_users}",
            f"logfile = {self.dir / 'pgbouncer.log'}",
            f"pidfile = {self.dir / 'pgbouncer.pid'}",
            *(f"{key} = {value}" for key, value in self.settings.items()),
        ]
        users = self.dir / "users.txt"
        users.write_text("".join(f'"{name}" ""\n' for name in {self.user, self.admin_user}))
        config = self.dir / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        for path in (users, config):
            path.chmod(0o644)
        return config

    def start(self, timeout: float = 10.0) -> PgBouncer:
        config = self._write_config()
        command = [self.binary]
        if os.geteuid() == 0:
            command += ["-u", self.user]
        command.append(str(config))
        # PgBouncer logs to stderr as well as to its logfile: into a file, not
        # a pipe nobody reads (a full pipe blocks PgBouncer after ~64 KB).
        stderr_path = self.dir / "stderr.log"
        with stderr_path.open("wb") as stderr:
            self.process = subprocess.Popen(  # noqa: S603 - a fixed binary and our own config
                command, stdout=subprocess.DEVNULL, stderr=stderr
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                err = stderr_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"pgbouncer exited at start: {err.strip()} {self.log()}")
            try:
                with psycopg.connect(self.admin_dsn(), connect_timeout=2, autocommit=True) as c:
                    c.execute("SHOW VERSION")
                    return self
            except psycopg.Error as error:
                if time.monotonic() > deadline:
                    log = self.log()
                    self.stop()
                    raise RuntimeError(f"pgbouncer did not answer in {timeout}s: {log}") from error
                time.sleep(0.1)

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)  # "safe shutdown": no new clients
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> PgBouncer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- use ------------------------------------------------------------------

    def url(self, database: str = "test", driver: str = "psycopg") -> str:
        """A SQLAlchemy URL through this PgBouncer."""
        return f"postgresql+{driver}://{self.user}@127.0.0.1:{self.port}/{database}"

    def admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={self.admin_user} dbname=pgbouncer"

    def admin(self, command: str) -> list[dict[str, Any]]:
        """Run an admin console command (``SHOW POOLS``, ``RELOAD``...): rows as dicts."""
        with psycopg.connect(self.admin_dsn(), autocommit=True) as conn:
            cur = conn.execute(command)
            if cur.description is None:
                return []
            names = [d.name for d in cur.description]
            return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "pgbouncer.log").read_text()[-2000:]
        return ""
