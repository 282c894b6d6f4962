"""Web framework integrations: per-route request scopes and 503s for shed requests.

``poolguard.integrations.asgi`` (Starlette, FastAPI, any ASGI app) and
``poolguard.integrations.wsgi`` (Flask, any WSGI app) import no framework
themselves; ``import poolguard`` imports neither of them.
"""

from __future__ import annotations

from ._routes import Route, RouteMap, rejection_response

__all__ = ["Route", "RouteMap", "rejection_response"]
