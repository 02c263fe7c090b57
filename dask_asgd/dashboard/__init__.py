"""dask-asgd on the Dask dashboard: the page ``/individual-asgd`` (in its
"More..." menu) and the ``dask_asgd_*`` series on the scheduler's ``/metrics``.

Importing this module (``import dask_asgd`` does) adds both to every scheduler
built afterwards in this process, e.g. a ``LocalCluster``'s; for a scheduler
process, preload it: ``dask scheduler --preload dask_asgd.dashboard``.
Bokeh and prometheus_client load only when the scheduler loads its own dashboard
and metrics modules, so workers importing dask_asgd do not pay for them.
"""

from __future__ import annotations

from ._hook import after_import

ROUTE = "/individual-asgd"


def _add_page(dashboard) -> None:
    # distributed builds its Bokeh apps from this dict when a scheduler starts
    # its dashboard (and lists routes starting /individual- under "More...").
    from ._page import asgd_doc

    dashboard.applications.setdefault(ROUTE, asgd_doc)


def _add_metrics(_) -> None:
    from ._metrics import register

    register()


after_import("distributed.dashboard.scheduler", _add_page)
after_import("distributed.http.scheduler.prometheus.core", _add_metrics)

__all__ = ["ROUTE"]
