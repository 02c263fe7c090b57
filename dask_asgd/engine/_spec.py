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
    sync_timeout: float
    auto_interval: bool = False
    auto_size: bool = False
    report_interval: float = 0.5
    probe_interval: float = 1.0
    share_state: bool = False  # send the state with every task result (for checkpoints)
    max_levels: int = 12
    filter_window: float = 0.5  # asgd.filter.window

    @property
    def topic(self) -> str:
        return f"asgd/{self.run_id}/{self.mode}"

    @property
    def balance_topic(self) -> str:
        return f"asgd/{self.run_id}/balance"

    @property
    def probe_topic(self) -> str:
        return f"asgd/{self.run_id}/probe"

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

    # Messages carry power-of-two slices of the flat state, numbered like a heap:
    # key 2**L + i is slice i of 2**L. Every level's keys are valid at once, so a
    # sender can change its message size (the balancer does) mid-run.
    @property
    def top_level(self) -> int:
        return 0 if self.mode == "sync" else min(self.max_levels, int(math.log2(max(self.model.n_params, 1))))

    def level(self, message_size: int) -> int:
        """Split level whose slices hold at most ``message_size`` parameters."""
        n = self.model.n_params
        if self.mode == "sync" or message_size >= n:
            return 0
        return min(self.top_level, math.ceil(math.log2(n / message_size)))

    def bounds(self, key: int) -> tuple[int, int]:
        """``(start, stop)`` in the flat state of the slice with this key."""
        level = key.bit_length() - 1
        index, n = key - 2**level, self.model.n_params
        return index * n // 2**level, (index + 1) * n // 2**level

    def slice_shapes(self) -> dict[int, tuple[int]]:
        shapes = {}
        for key in range(1, 2 ** (self.top_level + 1)):
            start, stop = self.bounds(key)
            shapes[key] = (stop - start,)
        return shapes
