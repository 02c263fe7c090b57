"""The ``dask-asgd`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import time

    from .datasets import make_blobs
    from .estimators import KMeans

    X, _ = make_blobs(args.samples, args.features, args.clusters, random_state=0)
    start = time.perf_counter()
    est = KMeans(args.clusters, random_state=0, max_epochs=args.epochs).fit(X)
    h = est.history_
    print(f"K-Means, {args.samples:,} x {args.features}, k={args.clusters}, mode=asgd on {h.sizes['worker']} workers")
    print(f"fit took {time.perf_counter() - start:.1f} s, {est.n_iter_} epochs, inertia {-est.score(X):,.0f}")
    last = h.isel(time=-1)
    for w in h.worker.values:
        row = last.sel(worker=w)
        print(
            f"  {w}: {int(row.samples):,} samples, loss {float(row.loss):.4f}, "
            f"sent {int(row.messages_sent)}, accepted {int(row.accepted)}, rejected {int(row.rejected)}, "
            f"stopped by {str(h.stop_reason.sel(worker=w).values)}"
        )
    return 0


def _bench_engine(args) -> int:
    from . import bench_engine

    return bench_engine.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dask-asgd", description="Asynchronous parallel SGD on Dask distributed.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="fit K-Means on synthetic blobs on an embedded LocalCluster")
    demo.add_argument("--samples", type=int, default=1_000_000)
    demo.add_argument("--features", type=int, default=16)
    demo.add_argument("--clusters", type=int, default=20)
    demo.add_argument("--epochs", type=int, default=5)
    demo.set_defaults(func=_demo)

    bench = commands.add_parser("bench", help="benchmarks")
    suites = bench.add_subparsers(dest="suite", required=True)
    engine = suites.add_parser("engine", help="asgd samples/s over N x a single-process NumPy loop")
    engine.add_argument("--workers", type=int, default=2)
    engine.add_argument("--repeats", type=int, default=3)
    engine.add_argument("--seconds", type=float, default=6.0, help="training seconds per asgd run")
    engine.add_argument("--batch-size", type=int, default=256)
    engine.add_argument("--json", help="also write the results to this JSON file")
    engine.set_defaults(func=_bench_engine)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
