"""The ``dask-asgd`` command line: ``run`` a pipeline file, a ``demo``, ``bench`` suites."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from .errors import (
    ConfigError,
    DataError,
    MissingFileError,
    PipelineError,
    SchedulerUnreachable,
    TrainingFailed,
)

# Exit codes of `dask-asgd run`, one per kind of problem the user can fix.
EXIT_CODES = {
    ConfigError: 3,
    MissingFileError: 4,
    SchedulerUnreachable: 5,
    DataError: 6,
    TrainingFailed: 7,
}
INTERRUPTED = 130

RUN_EPILOG = """\
exit codes:
  0    the pipeline ran and its outputs are written
  1    an unexpected error (a bug: the traceback is printed; please report it)
  2    bad command line (unknown option, --workers not a positive integer)
  3    invalid pipeline file: TOML syntax, unknown section or key, bad value
  4    a file or folder is missing or cannot be read or written (pipeline, data, --out)
  5    the scheduler cannot be reached, or too few workers joined it in time
  6    the data does not match the pipeline: unknown variable, dim or feature name
  7    training failed (e.g. diverged, or the data holds NaN)
  130  interrupted (Ctrl-C)

Without --scheduler, an embedded LocalCluster on 127.0.0.1 runs the pipeline
(--workers worker processes, default one per core, at most 4).
"""


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


def _run(args) -> int:
    from .cluster import connect, dashboard_link
    from .engine._chains import worker_addresses
    from .pipeline import Pipeline
    from .progress import Progress

    try:
        pipeline = Pipeline.from_toml(args.pipeline)
        if args.resume:
            pipeline = pipeline.resuming()
        pipeline.check()
        out = pipeline.prepare_output(args.out)
        print(f"pipeline {pipeline.name!r} from {args.pipeline}; outputs into {out}", flush=True)
        with connect(args.scheduler, args.workers) as client:
            workers = len(worker_addresses(client))
            where = args.scheduler or "an embedded LocalCluster"
            print(f"cluster: {where}, scheduler {client.scheduler.address}, {workers} worker(s)", flush=True)
            link = dashboard_link(client)
            # The embedded scheduler lives in this process: without bokeh here its
            # dashboard shows only an install hint.
            hint = "" if args.scheduler or importlib.util.find_spec("bokeh") else \
                ' (needs bokeh for the live plots: pip install "dask-asgd[dashboard]")'
            print(f"dashboard: {link}{hint}" if link else "dashboard: not served by this scheduler", flush=True)
            result = pipeline.run(client, out=out, progress=Progress(sys.stdout))
    except PipelineError as e:
        message = " ".join(str(e).split())  # one line, whatever the cause's text held
        print(f"dask-asgd run: error: {message}", file=sys.stderr)
        return next(code for cls, code in EXIT_CODES.items() if isinstance(e, cls))
    except KeyboardInterrupt:
        print("dask-asgd run: interrupted", file=sys.stderr)
        return INTERRUPTED
    times = result.summary["times"]
    print(f"done in {times['total'] + times.get('outputs', 0.0):.1f} s ("
          + ", ".join(f"{k} {v:.1f} s" for k, v in times.items() if k != "total") + ")")
    for what, path in result.files.items():
        print(f"  {what}: {path}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def _bench_engine(args) -> int:
    from . import bench_engine

    return bench_engine.main(args)


def _bench_balance(args) -> int:
    from . import bench_balance

    return bench_balance.main(args)


def _bench_peers(args) -> int:
    from . import bench_peers

    try:
        bench_peers.prepare_out(args.out)
    except OSError as e:
        print(f"dask-asgd bench: error: {e}", file=sys.stderr)
        return EXIT_CODES[MissingFileError]
    return bench_peers.main(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dask-asgd", description="Asynchronous parallel SGD on Dask distributed.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="run a pipeline file (source -> preprocessing -> training -> evaluation -> outputs)",
        description="Run the pipeline in PIPELINE.toml and write the model, history, plot and summary into --out.",
        epilog=RUN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("pipeline", metavar="PIPELINE.toml", help="the pipeline file, e.g. pipelines/kmeans_blobs.toml")
    run.add_argument("--scheduler", metavar="ADDRESS", help="a running Dask scheduler, e.g. tcp://127.0.0.1:8786 "
                     "(default: start an embedded LocalCluster)")
    run.add_argument("--workers", metavar="N", type=_positive_int,
                     help="embedded cluster: worker processes to start; with --scheduler: workers to wait for")
    run.add_argument("--resume", action="store_true",
                     help="continue from the newest checkpoint in the [train] checkpoint folder")
    run.add_argument("--out", metavar="DIR", help="output folder (default: [outputs] dir of the pipeline, else results/NAME)")
    run.set_defaults(func=_run)

    demo = commands.add_parser("demo", help="fit K-Means on synthetic blobs on an embedded LocalCluster")
    demo.add_argument("--samples", type=int, default=1_000_000)
    demo.add_argument("--features", type=int, default=16)
    demo.add_argument("--clusters", type=int, default=20)
    demo.add_argument("--epochs", type=int, default=5)
    demo.set_defaults(func=_demo)

    bench = commands.add_parser(
        "bench", help="benchmarks: dask-asgd against its peers (default), or one of the suites below",
        description="Without a suite: K-Means and logistic regression against dask-ml and scikit-learn, "
                    "asgd vs sync at 10 Mbit/s (root), and parallel efficiency; writes results.json, "
                    "results.md and peers_*.png into --out.",
    )
    bench.add_argument("--out", default="results/peers", metavar="DIR",
                       help="folder for results.json, results.md and the plots (default results/peers)")
    bench.add_argument("--quick", action="store_true",
                       help="smaller data and budgets: under 20 minutes on 2 cores")
    bench.add_argument("--repeats", type=_positive_int, default=3, help="repeats per method (medians are reported)")
    bench.set_defaults(func=_bench_peers)
    suites = bench.add_subparsers(dest="suite", required=False, metavar="{engine,balance}")
    engine = suites.add_parser("engine", help="asgd samples/s over N x a single-process NumPy loop")
    engine.add_argument("--workers", type=int, default=2)
    engine.add_argument("--repeats", type=int, default=3)
    engine.add_argument("--seconds", type=float, default=6.0, help="training seconds per asgd run")
    engine.add_argument("--batch-size", type=int, default=256)
    engine.add_argument("--json", help="also write the results to this JSON file")
    engine.set_defaults(func=_bench_engine)
    balance = suites.add_parser(
        "balance", help="auto balancing vs fixed settings on an emulated network (root: namespaces + tc tbf)"
    )
    balance.add_argument("--out", default="results/balance", help="folder for results.json, results.md and the plots")
    balance.add_argument("--quick", action="store_true", help="2 intervals x 3 message sizes and a 10 s budget")
    balance.add_argument("--budget", type=float, help="training seconds per run (default 30, or 10 with --quick)")
    balance.add_argument("--repeats", type=_positive_int, default=3, help="runs per setting and regime; medians are reported")
    balance.set_defaults(func=_bench_balance)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
