"""Threshold alerts with hysteresis, as a pure state machine.

An alert fires once its value has stayed at or above the threshold for
``hold_for`` seconds, and clears once it has stayed below ``clear_ratio`` x
threshold for ``hold_for`` seconds. In between nothing is emitted, so a value
that flaps around the threshold raises one event, not one per reading.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Alert", "AlertEvent"]


@dataclasses.dataclass(frozen=True, slots=True)
class AlertEvent:
    """A change of an alert's state, handed to ``Guard.on_alert`` callbacks."""

    pool: str
    name: str
    firing: bool
    value: float
    threshold: float
    since: float


class Alert:
    """One alert's state; feed it readings with :meth:`update`."""

    __slots__ = ("_since", "clear_ratio", "firing", "hold_for", "name", "threshold")

    def __init__(self, name: str, threshold: float, hold_for: float, clear_ratio: float = 0.8):
        self.name = name
        self.threshold = threshold
        self.hold_for = hold_for
        self.clear_ratio = clear_ratio
        self.firing = False
        self._since: float | None = None  # when the reading first went the other way

    def update(self, value: float, now: float) -> bool | None:
        """Take a reading; return True when it fires, False when it clears, else None."""
        if self.firing:
            flipping = value < self.threshold * self.clear_ratio
        else:
            flipping = value >= self.threshold
        if not flipping:
            self._since = None
            return None
        if self._since is None:
            self._since = now
        if now - self._since < self.hold_for:
            return None
        self.firing = not self.firing
        self._since = None
        return self.firing
