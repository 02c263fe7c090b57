"""Steps between a source and training, on dask arrays: standardize, a seeded random
train/test split that keeps chunk sizes known, and feature selection by name."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import ClassVar

import dask.array as da
import numpy as np

from .errors import ConfigError, DataError
from .sources import Data


@dataclass
class Standardize:
    """Centre every feature column and divide by its standard deviation.

    Mean and standard deviation come from the training rows (computed on the
    cluster); the scaling is applied lazily to the training and test rows alike.
    A constant column keeps a scale of 1 (it becomes 0, not NaN).

    Example::

        data = Standardize().apply(data, client)
    """

    kind: ClassVar[str] = "standardize"

    def check(self) -> None:
        pass

    def apply(self, data: Data, client) -> Data:
        mean, std = client.gather(client.compute([data.X.mean(axis=0), data.X.std(axis=0)]))
        scale = np.where(std > 0, std, 1.0)
        if data.scaling is None:
            scaling = (mean, scale)
        else:  # standardizing twice composes: x -> ((x - m1)/s1 - m2)/s2
            m1, s1 = data.scaling
            scaling = (m1 + s1 * mean, s1 * scale)
        return replace(
            data,
            X=(data.X - mean) / scale,
            X_test=None if data.X_test is None else (data.X_test - mean) / scale,
            scaling=scaling,
        )


@dataclass
class Split:
    """Hold out ``test_size`` of the rows, drawn at random, for evaluation.

    Every chunk gives up the same share of its rows, chosen by a permutation
    seeded with ``(random_state, chunk index)``: reproducible on any cluster, and
    the chunk sizes of both parts stay known without computing anything.
    """

    kind: ClassVar[str] = "split"
    test_size: float = 0.2
    random_state: int = 0

    def check(self) -> None:
        if not 0.0 < self.test_size < 1.0:
            raise ConfigError(f"[[preprocess]] split test_size={self.test_size} is not valid; use a fraction between 0 and 1, e.g. 0.2")

    def apply(self, data: Data, client) -> Data:
        self.check()
        if data.X_test is not None:
            raise ConfigError("[[preprocess]] the data is split twice; keep one split step")
        sizes = data.X.chunks[0]
        n_test = tuple(round(n * self.test_size) for n in sizes)
        if sum(n_test) == 0 or sum(n_test) == sum(sizes):
            raise DataError(
                f"split test_size={self.test_size} leaves {sum(n_test)} of {sum(sizes)} rows for testing; "
                "use a test_size that leaves rows on both sides, or larger chunks"
            )
        y = None if data.y is None else data.y.rechunk((sizes,))
        train_part, test_part = self._part(sizes, n_test, test=False), self._part(sizes, n_test, test=True)
        return replace(
            data,
            X=train_part(data.X), X_test=test_part(data.X),
            y=None if y is None else train_part(y), y_test=None if y is None else test_part(y),
        )

    def _part(self, sizes, n_test, *, test: bool):
        seed = self.random_state

        def rows(block, block_info=None):
            i = block_info[0]["chunk-location"][0]
            order = np.random.default_rng([seed, i]).permutation(block.shape[0])
            return block[np.sort(order[:n_test[i]] if test else order[n_test[i]:])]

        counts = tuple(k if test else n - k for n, k in zip(sizes, n_test))

        def apply(a: da.Array) -> da.Array:
            return a.map_blocks(rows, chunks=(counts, *a.chunks[1:]), dtype=a.dtype)

        return apply


@dataclass
class SelectFeatures:
    """Keep the feature columns named in ``names``, in that order.

    A name selects the column of that name, or every column of that variable for
    stacked xarray variables (``t2m`` selects ``t2m[lat=..,lon=..]``).
    """

    kind: ClassVar[str] = "select"
    names: list[str] = field(default_factory=list)

    def check(self) -> None:
        if not self.names:
            raise ConfigError("[[preprocess]] select names is empty; list the features to keep, e.g. names = [\"x0\", \"x3\"]")

    def apply(self, data: Data, client) -> Data:
        self.check()
        columns = []
        for name in self.names:
            matches = [i for i, f in enumerate(data.features) if f == name or f.startswith(name + "[")]
            if not matches:
                shown = ", ".join(data.features[:20]) + (f", ... ({len(data.features)} in all)" if len(data.features) > 20 else "")
                raise DataError(f"select: feature {name!r} is not in the data; available features: {shown}; fix [[preprocess]] names")
            columns.extend(matches)
        index = np.asarray(columns)
        return replace(
            data,
            X=data.X[:, index],
            X_test=None if data.X_test is None else data.X_test[:, index],
            features=tuple(data.features[i] for i in columns),
            scaling=None if data.scaling is None else (data.scaling[0][index], data.scaling[1][index]),
        )


STEPS = {cls.kind: cls for cls in (Standardize, Split, SelectFeatures)}
