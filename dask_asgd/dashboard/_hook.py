"""Run a function right after a module is first imported, without importing it:
how dask-asgd adds to the dashboard and /metrics of schedulers built later in
this process while ``import dask_asgd`` stays free of bokeh (workers import it)."""

from __future__ import annotations

import importlib.abc
import importlib.util
import logging
import sys
from collections.abc import Callable
from types import ModuleType

logger = logging.getLogger(__name__)

Callback = Callable[[ModuleType], None]


def after_import(name: str, callback: Callback) -> None:
    """Call ``callback(module)`` once module ``name`` is imported: now if it is.

    Example::

        after_import("distributed.dashboard.scheduler", lambda m: m.applications.setdefault(...))
    """
    module = sys.modules.get(name)
    if module is not None:
        _call(callback, module)
        return
    _FINDER.pending.setdefault(name, []).append(callback)
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the real loader of a module someone waits for."""

    pending: dict[str, list[Callback]]

    def __init__(self):
        self.pending = {}

    def find_spec(self, fullname, path, target=None):
        callbacks = self.pending.pop(fullname, None)
        if callbacks is None:
            return None
        # Popped first, so this lookup (which walks sys.meta_path) passes us by.
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        spec.loader = _ThenCall(spec.loader, callbacks)
        return spec


class _ThenCall(importlib.abc.Loader):
    """The real loader, then the callbacks; everything else goes to the real one."""

    def __init__(self, loader, callbacks: list[Callback]):
        self._loader = loader
        self._callbacks = callbacks

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        for callback in self._callbacks:
            _call(callback, module)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def _call(callback: Callback, module: ModuleType) -> None:
    # An extra of ours must never break the scheduler that imports the module.
    try:
        callback(module)
    except Exception:
        logger.exception("dask-asgd could not extend %s", module.__name__)


_FINDER = _Finder()
