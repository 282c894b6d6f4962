"""The version of poolguard, in one place the package and its exporter read."""

from __future__ import annotations

__version__ = "0.1.0.dev0"
