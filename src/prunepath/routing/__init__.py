"""The model-side core with nothing of the package above it: routing settings (``config``), the selection rule
(``selection``), the routed FFN and ``prunepath_modules`` (``ffn``), the method and router registries
(``methods``, ``routers``; filled by :mod:`prunepath.registrations`) and run-time control (``control``).

``prunepath.routing`` is this package, never a function. For code written against the old front door, where
``prunepath.routing(model, tau=...)`` was the temporary-change context manager, the package is callable and
forwards to :func:`prunepath.routing.control.routing_scope` (the public name is ``prunepath.routing_scope``).
"""

from __future__ import annotations

import sys
import types

from prunepath.routing.control import routing_scope


class _CallableRouting(types.ModuleType):
    def __call__(self, model, **settings):
        return routing_scope(model, **settings)


sys.modules[__name__].__class__ = _CallableRouting
