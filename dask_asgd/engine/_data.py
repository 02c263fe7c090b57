"""Putting the training rows on the workers, and finding where they are: the
engine trains each worker on the rows it holds and never moves them again."""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
from array_api_compat import array_namespace, device
from distributed import Client, Future, futures_of, wait


@dataclass
class Shard:
    """The chunks of X (and y) that one worker trains on."""

    address: str
    X: list[Future]
    y: list[Future] | None
    n_rows: int


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
        shards.append(Shard(address, [futures[0]], None if y is None else [futures[1]], X_part.shape[0]))
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
    return [by_worker[w] for w in workers if by_worker[w].n_rows > 0]

