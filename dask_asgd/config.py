"""The one home of dask-asgd's settings: defaults from ``asgd.yaml`` under the
``asgd`` key of ``dask.config``, overridable the usual dask ways."""

from __future__ import annotations

import os

import dask.config
import yaml

_DEFAULTS_FILE = os.path.join(os.path.dirname(__file__), "asgd.yaml")

with open(_DEFAULTS_FILE) as f:
    _defaults = yaml.safe_load(f)

dask.config.update_defaults(_defaults)


def get(key: str):
    """Read ``asgd.<key>`` from dask.config (e.g. ``get("engine.segment-seconds")``)."""
    return dask.config.get(f"asgd.{key}")
