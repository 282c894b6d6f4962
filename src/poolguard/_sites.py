"""Call sites: the application frame behind a checkout or a statement.

A site is ``path:line in function`` of the innermost frame that is not
SQLAlchemy, poolguard, greenlet or the standard library. Finding one walks
frames, so it is done only where it is cheap in total: for a slow statement,
when the pool runs dry (for the holders' current frames), or per checkout
when ``capture_call_sites`` asks for it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import sysconfig
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    from types import FrameType

__all__ = ["current_site", "frame_site", "task_site", "thread_site"]


#: Packages whose frames are never the application's: SQLAlchemy, poolguard,
#: greenlet, the DB drivers and what they run on.
_LIBRARIES = (
    "sqlalchemy", "greenlet", "psycopg", "psycopg2", "psycopg_pool", "pymysql", "MySQLdb",
    "asyncpg", "aiosqlite", "aiomysql", "asyncmy", "oracledb", "pyodbc", "structlog",
    "opentelemetry", "tenacity",
)
_SITE_DIRS = ("site-packages", "dist-packages")


def _prefixes() -> tuple[str, ...]:
    dirs = {os.path.dirname(os.path.abspath(__file__))}
    for name in _LIBRARIES:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            dirs.add(os.path.dirname(os.path.abspath(path)))
    return tuple(d + os.sep for d in dirs)


def _stdlib() -> tuple[str, ...]:
    paths = {sysconfig.get_paths().get(key) for key in ("stdlib", "platstdlib")}
    return tuple(os.path.abspath(p) + os.sep for p in paths if p)


_INTERNAL: tuple[str, ...] = ()
_LOADED = -1
_STDLIB = _stdlib()
#: The command line's simulated service (``poolguard demo``) is application
#: code, though it ships inside the package: its frames are call sites.
_APPLICATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli") + os.sep


def _internal(filename: str) -> bool:
    global _INTERNAL, _LOADED
    loaded = sum(name in sys.modules for name in _LIBRARIES)
    if loaded != _LOADED:
        _INTERNAL, _LOADED = _prefixes(), loaded
    if filename.startswith(_APPLICATION):
        return False
    if filename.startswith(_INTERNAL) or filename.startswith("<"):
        return True
    # The standard library, but not packages installed into the base
    # interpreter's site-packages (under the stdlib directory in some layouts).
    return filename.startswith(_STDLIB) and not any(d in filename for d in _SITE_DIRS)


def _describe(frame: FrameType) -> str:
    code = frame.f_code
    path = code.co_filename
    with contextlib.suppress(ValueError):  # another drive on Windows
        path = os.path.relpath(path)
    return f"{path}:{frame.f_lineno} in {code.co_name}"


def frame_site(frame: FrameType | None) -> str | None:
    """The first application frame at or below ``frame`` (walking outwards)."""
    while frame is not None:
        if not _internal(frame.f_code.co_filename):
            return _describe(frame)
        frame = frame.f_back
    return None


def current_site(skip: int = 1) -> str | None:
    """The application frame that called into SQLAlchemy on this thread.

    Under asyncio, SQLAlchemy runs pool and execute code in a greenlet whose
    frames end where the greenlet started; the application awaits in the
    parent greenlet, suspended where it switched, so the search goes on there.
    """
    try:
        frame = sys._getframe(skip)
    except ValueError:
        return None
    return frame_site(frame) or _parent_greenlet_site()


def _parent_greenlet_site() -> str | None:
    try:
        from greenlet import getcurrent  # type: ignore[import-untyped, unused-ignore]
    except ImportError:
        return None
    parent = getcurrent().parent
    for _ in range(8):  # bounded: greenlets nest a level or two deep
        if parent is None:
            return None
        site = frame_site(parent.gr_frame)
        if site is not None:
            return site
        parent = parent.parent
    return None


#: CPython before 3.11.9 / 3.12.3 can deadlock the whole process when a
#: garbage collection starts inside ``sys._current_frames()`` and frees a
#: ``threading.local`` (gh-106883): the collector must not run there.
_FRAMES_NEED_NO_GC = sys.version_info < (3, 11, 9) or (3, 12) <= sys.version_info < (3, 12, 3)
_frames_lock = threading.Lock()


def current_frames() -> dict[int, FrameType]:
    """``sys._current_frames()``, with the garbage collector held off where
    a collection inside it could deadlock the interpreter."""
    if not _FRAMES_NEED_NO_GC:
        return sys._current_frames()
    with _frames_lock:  # one caller at a time decides when the collector comes back
        enabled = gc.isenabled()
        gc.disable()
        try:
            return sys._current_frames()
        finally:
            if enabled:
                gc.enable()


def thread_site(thread_id: int) -> str | None:
    """Where the thread ``thread_id`` is in application code right now."""
    frame = current_frames().get(thread_id)
    return frame_site(frame)


def task_site(task: asyncio.Task[object]) -> str | None:
    """Where the asyncio ``task`` is suspended in application code right now.

    Follows the chain of awaited coroutines from the task's own coroutine
    and returns the innermost application frame of it.
    """
    found: str | None = None
    awaitable: object = task.get_coro()
    for _ in range(64):  # bounded: a chain is short; never loop on a cycle
        frame = getattr(awaitable, "cr_frame", None) or getattr(awaitable, "gi_frame", None)
        if frame is None:
            break
        if not _internal(frame.f_code.co_filename):
            found = _describe(frame)
        awaitable = getattr(awaitable, "cr_await", None) or getattr(awaitable, "gi_yieldfrom", None)
        if awaitable is None:
            break
    return found
