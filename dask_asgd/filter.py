"""The Parzen-window update filter: a received state (or slice of it) is merged
only if the worker's own last SGD step moved it towards that state."""

from __future__ import annotations

import math
from dataclasses import dataclass

from array_api_compat import array_namespace

FILTERS = ("parzen", None)
# Beyond the paper: its test accepts any state beyond the mid-plane of the local
# step, which is half of all states however far away (a random or huge state from
# a faulty or hostile peer, half the time). So a state farther from the local one
# than WINDOW times the local state's norm is refused first. Peers that started
# from the same state stay well inside: 0.001 to 0.3 of the norm in our runs, more
# only in the first exchanges of a model initialised to zero.
WINDOW = 0.5
# A slice of fewer parameters gets a window narrower by sqrt(size / FULL_WINDOW_SIZE):
# among a handful of numbers, a random value lands near the local ones by chance
# far more often (one number: 5 to 15% of random values within half its size).
FULL_WINDOW_SIZE = 64


def moves_towards(before, after, received) -> bool:
    """True when ``||after - received||^2 < ||before - received||^2``.

    ``before`` is the local state before its last step, ``after = before - lr * g``
    the state after it (Keuper & Pfreundt's test, applied per slice).
    """
    xp = array_namespace(before, after, received)
    d_after = after - received
    d_before = before - received
    # Compared where the states live: one 0-d boolean crosses to the host (one
    # sync with a GPU), not two distances.
    return bool(xp.sum(d_after * d_after) < xp.sum(d_before * d_before))


def within_window(after, received, window: float = WINDOW) -> bool:
    """True when ``||received - after|| <= window * ||after||`` (a slice of ``n`` <
    ``FULL_WINDOW_SIZE`` parameters: ``window * sqrt(n / FULL_WINDOW_SIZE)``); NaN is outside."""
    xp = array_namespace(after, received)
    share = min(1.0, math.prod(after.shape) / FULL_WINDOW_SIZE)
    d = received - after
    # Scaled by the largest difference, so that huge values cannot overflow.
    largest = xp.max(xp.abs(d))
    scale = xp.where(largest > 0, largest, xp.ones_like(largest))
    d, a = d / scale, after / scale
    return bool(xp.sum(d * d) <= share * window**2 * xp.sum(a * a))


@dataclass
class UpdateFilter:
    """Decides which received states to merge, and counts its decisions.

    Example::

        f = UpdateFilter("parzen")
        if f.accept(before, after, received):
            state = (after + received) / 2
        f.accepted, f.rejected
    """

    kind: str | None = "parzen"
    window: float = WINDOW  # see WINDOW; math.inf: the paper's test alone
    accepted: int = 0
    rejected: int = 0

    def __post_init__(self):
        if self.kind not in FILTERS:
            raise ValueError(f"update_filter={self.kind!r} is not known; use 'parzen' or None")
        if not self.window > 0:
            raise ValueError(f"window={self.window!r} is not valid; use a number > 0 (math.inf: no window)")

    def accept(self, before, after, received) -> bool:
        ok = self.kind is None or (
            (math.isinf(self.window) or within_window(after, received, self.window))
            and moves_towards(before, after, received)
        )
        if ok:
            self.accepted += 1
        else:
            self.rejected += 1
        return ok
