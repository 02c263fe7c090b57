"""Synthetic data built chunk by chunk on the workers (dask.array), never on the client."""

from __future__ import annotations

import dask.array as da
import numpy as np


def make_blobs(n_samples: int, n_features: int, centers: int, *, cluster_std: float = 1.0,
               center_box: float = 10.0, chunk_rows: int = 100_000, random_state: int = 0):
    """Gaussian blobs as a dask array ``X`` and their labels ``y``.

    The centres are drawn here (small); every chunk draws its own rows from its
    own seed, so the data is the same whatever the cluster, and is made where
    the chunk lives.
    """
    rng = np.random.default_rng(random_state)
    means = rng.uniform(-center_box, center_box, size=(centers, n_features))
    chunks = (tuple(_chunk_sizes(n_samples, chunk_rows)),)
    seeds = da.from_array(np.arange(len(chunks[0])) + random_state * 1_000_003, chunks=1)

    def block(seed_block, block_info=None):
        rows = block_info[None]["chunk-shape"][0]
        chunk_rng = np.random.default_rng(int(seed_block[0]))
        labels = chunk_rng.integers(centers, size=rows)  # first draw: the same as y's
        return means[labels] + cluster_std * chunk_rng.standard_normal((rows, n_features))

    X = da.map_blocks(block, seeds, chunks=(chunks[0], (n_features,)), new_axis=1, dtype=np.float64)
    # The same seed draws the same labels first: y matches X without materialising both at once.
    y = da.map_blocks(
        lambda seed_block, block_info=None: np.random.default_rng(int(seed_block[0])).integers(
            centers, size=block_info[None]["chunk-shape"][0]),
        seeds, chunks=chunks, dtype=np.int64,
    )
    return X, y


def _chunk_sizes(n: int, size: int) -> list[int]:
    return [min(size, n - start) for start in range(0, n, size)]
