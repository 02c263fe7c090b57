"""Putting the training rows on the workers, and finding where they are: the
engine trains each worker on the rows it holds and never moves them again."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dask.array as da
import numpy as np
from array_api_compat import array_namespace, device
from distributed import Client, Future, futures_of, wait

from ..models._base import to_host


@dataclass
class Shard:
    """The chunks of X (and y) that one worker trains on.

    ``rows``: for arrays the client holds (NumPy), which of their rows the
    chunks are, so they can be sent again if the worker dies with them; chunks
    of dask arrays are computed again by the scheduler instead. ``starts``: for
    chunks of dask arrays, the index of each chunk's first row in the array."""

    address: str
    X: list[Future]
    y: list[Future] | None
    n_rows: int
    chunk_rows: list[int] = field(default_factory=list)
    rows: Any = None
    starts: list[int] = field(default_factory=list)


def place(client: Client, X, y, workers: list[str]) -> list[Shard]:
    """Spread in-memory arrays over ``workers``, or locate the chunks of dask arrays.

    A chunk is trained by the worker that holds it unless that worker already
    has its fair share of rows; then (and for chunks held outside ``workers``) it
    goes to the training worker with the fewest rows. With one worker
    (sequential mode) that worker gets every chunk, in the original order."""
    if isinstance(X, da.Array):
        return _locate(client, X, y, workers)
    return _scatter(client, X, y, workers)


def _scatter(client, X, y, workers):
    # Every n-th row to the same worker: each worker gets an even share that is
    # a fair sample even when the rows arrive sorted (by class, by time).
    xp = array_namespace(X)
    shards = []
    for i, address in enumerate(workers):
        rows = xp.arange(i, X.shape[0], len(workers), device=device(X))
        X_part = xp.take(X, rows, axis=0)
        y_part = None if y is None else xp.take(y, rows, axis=0)
        parts = [X_part] if y is None else [X_part, y_part]
        futures = client.scatter(parts, workers=[address], hash=False)
        shards.append(Shard(address, [futures[0]], None if y is None else [futures[1]], X_part.shape[0],
                            [X_part.shape[0]], rows))
    return shards


def _locate(client, X, y, workers):
    X = X.rechunk({1: -1})
    if y is not None:
        y = y.rechunk((X.chunks[0],))
    persisted = client.persist([X] if y is None else [X, y])
    wait(futures_of(persisted))
    X = persisted[0]
    x_keys = [row[0] for row in X.__dask_keys__()]
    x_futures = {f.key: f for f in futures_of(X)}
    y_futures = None
    if y is not None:
        y_futures = {f.key: f for f in futures_of(persisted[1])}
        y_keys = list(persisted[1].__dask_keys__())
    holders = client.who_has([x_futures[k] for k in x_keys])
    by_worker = {w: Shard(w, [], None if y is None else [], 0) for w in workers}
    fair_share = X.shape[0] / len(workers)
    starts = np.cumsum((0,) + X.chunks[0][:-1])
    for i, key in enumerate(x_keys):
        rows = X.chunks[0][i]
        emptiest = min(workers, key=lambda w: by_worker[w].n_rows)
        held = [w for w in holders.get(key, ()) if w in workers]
        # Train a chunk where it lives unless that worker already has its share:
        # then it moves once, worker to worker, to the worker with the fewest rows.
        fits = [w for w in held if by_worker[w].n_rows + rows <= fair_share * 1.05 or w == emptiest]
        shard = by_worker[fits[0] if fits else emptiest]
        shard.X.append(x_futures[key])
        if y is not None:
            shard.y.append(y_futures[y_keys[i]])
        shard.n_rows += rows
        shard.chunk_rows.append(rows)
        shard.starts.append(int(starts[i]))
    return [by_worker[w] for w in workers if by_worker[w].n_rows > 0]



def scatter_rows(client: Client, X, y, rows, address: str) -> Shard:
    """The given rows of in-memory ``X`` (and ``y``) as a one-chunk shard on ``address``."""
    xp = array_namespace(X)
    parts = [xp.take(X, rows, axis=0)] + ([] if y is None else [xp.take(y, rows, axis=0)])
    futures = client.scatter(parts, workers=[address], hash=False)
    n = int(rows.shape[0])
    return Shard(address, [futures[0]], None if y is None else [futures[1]], n, [n], rows)


def take_rows(chunk, start: int, stop: int):
    return chunk[start:stop]


def split_shard(client: Client, shard: Shard, to: str, source=None) -> tuple[Shard, Shard | None]:
    """``shard`` in two, (kept, given to worker ``to``), about half its rows each;
    ``given`` is ``None`` when a shard of one row cannot be split. Rows the client
    holds (``source``: its ``(X, y)``) are sent again; otherwise whole chunks
    move, or the one chunk is cut by tasks on its worker."""
    if shard.n_rows < 2:
        return shard, None
    if shard.rows is not None and source is not None:
        half = shard.rows.shape[0] // 2
        X, y = source
        return (scatter_rows(client, X, y, shard.rows[:half], shard.address),
                scatter_rows(client, X, y, shard.rows[half:], to))
    if len(shard.X) > 1:
        cut = len(shard.X) // 2
        pieces = [(shard.X[:cut], None if shard.y is None else shard.y[:cut], shard.chunk_rows[:cut], shard.starts[:cut]),
                  (shard.X[cut:], None if shard.y is None else shard.y[cut:], shard.chunk_rows[cut:], shard.starts[cut:])]
    else:
        n = shard.chunk_rows[0]
        halves = [(0, n // 2), (n // 2, n)]
        cut = [[client.submit(take_rows, part[0], a, b, workers=[shard.address], pure=False) for a, b in halves]
               for part in ([shard.X] if shard.y is None else [shard.X, shard.y])]
        first = shard.starts[0] if shard.starts else 0
        pieces = [([cut[0][k]], None if shard.y is None else [cut[1][k]], [b - a], [first + a])
                  for k, (a, b) in enumerate(halves)]
    kept, given = (Shard(address, X, y, sum(rows), rows, starts=starts)
                   for address, (X, y, rows, starts) in zip((shard.address, to), pieces))
    return kept, given


def merge_shards(client: Client, heir: Shard, lost: Shard, source=None) -> Shard:
    """``heir`` with the rows of ``lost`` (whose worker died) added: sent again
    from the client where it holds them, else left to the scheduler to compute
    again from their graph."""
    if lost.rows is not None and source is not None:
        lost = scatter_rows(client, *source, lost.rows, heir.address)
    rows = None
    if heir.rows is not None and lost.rows is not None:
        rows = array_namespace(heir.rows).concat([heir.rows, lost.rows])
    return Shard(heir.address, heir.X + lost.X, None if heir.y is None else heir.y + lost.y,
                 heir.n_rows + lost.n_rows, heir.chunk_rows + lost.chunk_rows, rows, heir.starts + lost.starts)


def positions_of(shard: Shard, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Which of the rows ``chosen`` (sorted indices into the whole of X) ``shard``
    holds: ``(positions among its rows, their indices in X)``, by position."""
    if shard.rows is not None:
        held = to_host(shard.rows).astype(np.int64)
        sorter = np.argsort(held, kind="stable")
        at = np.minimum(np.searchsorted(held, chosen, sorter=sorter), held.shape[0] - 1)
        hit = held[sorter[at]] == chosen
        local, ids = sorter[at[hit]], chosen[hit]
    else:
        offsets = np.cumsum([0] + shard.chunk_rows[:-1])
        parts = [(chosen[(chosen >= start) & (chosen < start + n)], start, offset)
                 for start, n, offset in zip(shard.starts, shard.chunk_rows, offsets)]
        ids = np.concatenate([inside for inside, _, _ in parts] + [np.zeros(0, np.int64)])
        local = np.concatenate([inside - start + offset for inside, start, offset in parts] + [np.zeros(0, np.int64)])
    order = np.argsort(local, kind="stable")
    return local[order], ids[order]
