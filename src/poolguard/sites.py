"""Call sites: the application frame behind a checkout or a statement.

A site is ``path:line in function`` of the innermost frame that is not
SQLAlchemy, poolguard, greenlet or the standard library. Finding one walks
frames, so it is done only where it is cheap in total: for a slow statement,
when the pool runs dry (for the holders' current frames), or per checkout
when ``capture_call_sites`` asks for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import asyncio
    from types import FrameType

__all__ = ["current_site", "frame_site", "task_site", "thread_site"]


def _prefixes() -> tuple[str, ...]:
    import greenlet  # type: ignore[import-untyped, unused-ignore]
    import sqlalchemy

    dirs = {
        os.path.dirname(os.path.abspath(__file__)),
        os.path.dirname(os.path.abspath(sqlalchemy.__file__)),
        os.path.dirname(os.path.abspath(greenlet.__file__)),
    }
    for key in ("stdlib", "platstdlib"):
        path = sysconfig.get_paths().get(key)
        if path:
            dirs.add(os.path.abspath(path))
    return tuple(d + os.sep for d in dirs)


_INTERNAL: tuple[str, ...] | None = None


def _internal(filename: str) -> bool:
    global _INTERNAL  # noqa: PLW0603 - computed once, on first use
    if _INTERNAL is None:
        _INTERNAL = _prefixes()
    return filename.startswith(_INTERNAL) or filename.startswith("<")


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
    """The application frame that called into SQLAlchemy on this thread."""
    try:
        frame = sys._getframe(skip)
    except ValueError:
        return None
    return frame_site(frame)


def thread_site(thread_id: int) -> str | None:
    """Where the thread ``thread_id`` is in application code right now."""
    frame = sys._current_frames().get(thread_id)
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
