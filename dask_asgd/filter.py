"""The Parzen-window update filter: a received state (or slice of it) is merged
only if the worker's own last SGD step moved it towards that state."""

from __future__ import annotations

from dataclasses import dataclass

from array_api_compat import array_namespace

FILTERS = ("parzen", None)


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
    accepted: int = 0
    rejected: int = 0

    def __post_init__(self):
        if self.kind not in FILTERS:
            raise ValueError(f"update_filter={self.kind!r} is not known; use 'parzen' or None")

    def accept(self, before, after, received) -> bool:
        ok = self.kind is None or moves_towards(before, after, received)
        if ok:
            self.accepted += 1
        else:
            self.rejected += 1
        return ok
