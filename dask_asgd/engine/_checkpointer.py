"""Periodic checkpoints of a running fit, written by the client: the workers'
newest states, averaged by samples seen, saved atomically every few seconds."""

from __future__ import annotations

import time

import numpy as np

from .. import checkpoint


class Checkpointer:
    """Keeps each worker's newest state and writes their average when due.

    Example::

        keeper = Checkpointer("ckpt", model="KMeansModel", every=5.0, samples_before=0,
                              settings={"n_features": 16})
        keeper.offer(worker_address, (params, aux, samples))   # from each task result
        keeper.write()                                         # at the end
    """

    def __init__(self, directory, *, model: str, every: float, samples_before: int, settings: dict):
        self.directory = directory
        self.model = model
        self.every = every
        self.samples_before = samples_before
        self.settings = settings
        self.written = 0
        self._states: dict[str, tuple] = {}
        self._last = time.monotonic()

    def offer(self, worker: str, state) -> None:
        self._states[worker] = state
        if time.monotonic() - self._last >= self.every:
            self.write()

    def write(self) -> None:
        if not self._states:
            return
        states = list(self._states.values())
        weights = np.array([max(samples, 1) for _, _, samples in states], dtype=float)
        weights /= weights.sum()
        arrays = {"params": sum(w * np.asarray(p) for w, (p, _, _) in zip(weights, states))}
        auxes = [a for _, a, _ in states if a is not None]
        if auxes:
            arrays["aux"] = sum(w * np.asarray(a) for w, a in zip(weights, auxes))
        arrays["params"] = arrays["params"].astype(np.asarray(states[0][0]).dtype)
        samples = self.samples_before + sum(samples for _, _, samples in states)
        checkpoint.save(self.directory, arrays, model=self.model, samples=samples, settings=self.settings)
        self.written += 1
        self._last = time.monotonic()
