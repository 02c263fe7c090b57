"""Everything a worker needs to know about a training run, sent with each task."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..models import SGDModel

MODES = ("asgd", "sync", "simuparallel", "sequential")


@dataclass(frozen=True)
class RunSpec:
    """Settings of one fit, resolved on the client (dask.config included) so that
    workers never depend on the client's local configuration."""

    run_id: str
    mode: str
    model: SGDModel
    learning_rate: float
    batch_size: int
    comm_interval: int
    message_size: int
    update_filter: str | None
    max_epochs: float
    max_time: float | None
    tol: float | None
    n_iter_no_change: int
    seed: int
    t0: float
    n_samples: int
    peers: tuple[str, ...]
    history_interval: float
    segment_seconds: float
    eval_size: int
    sync_timeout: float

    @property
    def topic(self) -> str:
        return f"asgd/{self.run_id}/{self.mode}"

    @property
    def communicates(self) -> bool:
        return self.mode in ("asgd", "sync") and len(self.peers) > 1

    @property
    def sync_rounds(self) -> int:
        """Rounds every worker of a sync run makes: max_epochs over all the data."""
        return max(1, math.ceil(self.max_epochs * self.n_samples / (len(self.peers) * self.comm_interval)))

    @property
    def sync_rounds_per_epoch(self) -> int:
        return max(1, math.ceil(self.n_samples / (len(self.peers) * self.comm_interval)))

    def slices(self) -> list[tuple[int, int]]:
        """``(start, stop)`` of each message's slice of the flat state; sync sends it whole."""
        n = self.model.n_params
        size = n if self.mode == "sync" else min(self.message_size, n)
        return [(start, min(start + size, n)) for start in range(0, n, size)]
