"""Samples/s of the models' SGD steps on CuPy against NumPy on the same machine:
one process, a bare loop of mini-batch steps fed as the engine's workers feed
them, and a check that both backends reach the same state.

Run ``python -m dask_asgd.bench_gpu`` (``--help`` for the options). Without CuPy
or a GPU it prints the NumPy column and says why the CuPy one is missing."""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .models import KMeansModel, LogisticModel
from .models._base import array_namespace, host_to, to_host

# The state after CHECK_STEPS steps on the same batches from the same start must
# agree to this (max |difference| over max |value|): float64 rounding differs
# between BLAS libraries, never by this much.
CHECK_STEPS = 10
CHECK_TOLERANCE = {"float64": 1e-9, "float32": 1e-3}


@dataclass(frozen=True)
class Case:
    """One benchmark problem: binary logistic regression, or K-Means with ``n_clusters``."""

    name: str
    n_rows: int
    n_features: int
    n_clusters: int = 0

    def __str__(self) -> str:
        shape = f"{self.n_rows:,} x {self.n_features}"
        return f"kmeans k={self.n_clusters}, {shape}" if self.name == "kmeans" else f"logistic, {shape}"

    def make(self, dtype: str, seed: int = 0):
        """``(model, X, y, learning_rate)`` on the host."""
        rng = np.random.default_rng(seed)
        X = rng.standard_normal((self.n_rows, self.n_features), dtype=dtype)
        if self.name == "kmeans":
            return KMeansModel(self.n_clusters, self.n_features), X, None, 1.0
        w = rng.standard_normal(self.n_features, dtype=dtype)
        y = (X @ w + rng.standard_normal(self.n_rows, dtype=dtype) > 0).astype(np.int64)
        return LogisticModel(self.n_features, 2), X, y, 0.1

    def start(self, model, X, seed: int = 0):
        """The state both backends start from, on the host. K-Means starts from
        random rows: the benchmark times steps, not the k-means++ init."""
        if self.name == "kmeans":
            rows = np.random.default_rng(seed).choice(X.shape[0], size=self.n_clusters, replace=False)
            return X[np.sort(rows)].reshape(-1), np.ones(self.n_clusters, dtype=X.dtype)
        return np.zeros(model.n_params, dtype=X.dtype), None


FULL = (Case("logistic", 1_000_000, 512), Case("kmeans", 1_000_000, 256, n_clusters=1024))
QUICK = (Case("logistic", 20_000, 32), Case("kmeans", 20_000, 16, n_clusters=16))


@dataclass(frozen=True)
class Device:
    """Where the second column runs: its name, how a NumPy array gets there,
    and how to wait until the work queued there is done."""

    name: str
    put: Callable
    sync: Callable[[], None] = lambda: None


def find_cupy() -> tuple[Device | None, str]:
    """The CuPy device and a description of it, or ``None`` and why not."""
    try:
        import cupy
    except ImportError as exc:
        return None, f"CuPy unavailable: it is not installed ({exc}); pip install '.[gpu]' on a machine with an NVIDIA GPU"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except RuntimeError as exc:  # CUDARuntimeError: no driver, no device
        return None, f"CuPy unavailable: it finds no usable GPU ({type(exc).__name__}: {exc})"
    if count < 1:
        return None, "CuPy unavailable: the machine has no GPU"
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    runtime = cupy.cuda.runtime.runtimeGetVersion()
    device = Device("CuPy", cupy.asarray, lambda: cupy.cuda.get_current_stream().synchronize())
    return device, f"GPU: {name}, {props['totalGlobalMem'] / 2**30:.0f} GiB (CuPy {cupy.__version__}, CUDA runtime {runtime // 1000}.{runtime % 1000 // 10})"


def describe_cpu() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"CPU: {model}, {os.cpu_count()} cores (NumPy {np.__version__}, its BLAS with its default threads)"


def step_loop(model, params, aux, X, y, batch_size: int, learning_rate: float, *,
              seconds: float | None = None, steps: int | None = None, seed: int = 0, sync=lambda: None):
    """Mini-batch steps as a worker takes them (a fresh host permutation every
    epoch; indices copied to the device each step when X is not NumPy), for
    ``steps`` steps or until ``seconds`` have passed.

    Returns ``(params, aux, steps_taken, seconds_taken)``; ``sync`` waits for the
    device, so the time covers the work queued, not only its launch."""
    if batch_size > X.shape[0]:
        raise ValueError(f"batch_size={batch_size} is more than the {X.shape[0]} rows; use a smaller batch or more rows")
    xp = array_namespace(X)
    on_host = isinstance(X, np.ndarray)
    rng = np.random.default_rng(seed)
    order, pos, taken = rng.permutation(X.shape[0]), 0, 0
    sync()
    start = time.perf_counter()
    while taken < steps if steps is not None else time.perf_counter() - start < seconds:
        if pos + batch_size > X.shape[0]:
            order, pos = rng.permutation(X.shape[0]), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        if not on_host:
            idx = host_to(xp, idx, X)
        yb = None if y is None else xp.take(y, idx, axis=0)
        params, aux = model.step(params, aux, xp.take(X, idx, axis=0), yb, learning_rate)
        taken += 1
    sync()
    return params, aux, taken, time.perf_counter() - start


def measure(case: Case, batch_sizes, seconds: float, dtype: str, device: Device | None = None, warmup_steps: int = 3):
    """Rows ``{"case", "batch", "numpy", "device"}`` (samples/s; ``device`` None
    without one) and the check ``(max relative difference, tolerance)`` or None."""
    model, X, y, lr = case.make(dtype)
    params, aux = case.start(model, X)
    backends = [("numpy", X, y, lambda: None, (params, aux))]
    if device is not None:
        put = device.put
        on_device = (put(params), None if aux is None else put(aux))
        backends.append(("device", put(X), None if y is None else put(y), device.sync, on_device))
    rows = []
    for batch in batch_sizes:
        row = {"case": str(case), "batch": batch, "numpy": None, "device": None}
        for name, Xb, yb, sync, state in backends:
            # Warm-up first: CuPy compiles each kernel on its first call.
            step_loop(model, *state, Xb, yb, batch, lr, steps=warmup_steps, sync=sync)
            *_, taken, elapsed = step_loop(model, *state, Xb, yb, batch, lr, seconds=seconds, sync=sync)
            row[name] = taken * batch / elapsed
        rows.append(row)
    check = None
    if device is not None:
        batch = batch_sizes[0]
        finals = [step_loop(model, *state, Xb, yb, batch, lr, steps=CHECK_STEPS, sync=sync)[0]
                  for _, Xb, yb, sync, state in backends]
        expected, got = finals[0], to_host(finals[1])
        check = float(np.max(np.abs(got - expected)) / np.max(np.abs(expected))), CHECK_TOLERANCE[dtype]
    return rows, check


def format_table(rows, device_name: str = "CuPy") -> str:
    lines = [f"| problem | batch | NumPy samples/s | {device_name} samples/s | {device_name} / NumPy |", "|---|---|---|---|---|"]
    for r in rows:
        gpu = "n/a" if r["device"] is None else f"{r['device']:,.0f}"
        ratio = "n/a" if r["device"] is None else f"{r['device'] / r['numpy']:.1f}x"
        lines.append(f"| {r['case']} | {r['batch']} | {r['numpy']:,.0f} | {gpu} | {ratio} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dask_asgd.bench_gpu",
        description="Samples/s of the model steps on CuPy against NumPy on this machine, and a check that they agree.",
    )
    parser.add_argument("--quick", action="store_true", help="small problems (a smoke test, seconds on a CPU)")
    parser.add_argument("--seconds", type=float, default=None, help="timed seconds per backend and batch size (default 3, --quick 0.2)")
    parser.add_argument("--batch-sizes", default="256,4096", help="comma-separated (default 256,4096)")
    parser.add_argument("--dtype", choices=sorted(CHECK_TOLERANCE), default="float64")
    parser.add_argument("--require-gpu", action="store_true", help="fail (exit 2) when CuPy or a GPU is missing")
    args = parser.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    seconds = args.seconds if args.seconds is not None else (0.2 if args.quick else 3.0)
    cases = QUICK if args.quick else FULL

    device, gpu = find_cupy()
    print(describe_cpu())
    print(gpu)
    if device is None and args.require_gpu:
        return 2
    print(f"{args.dtype}, {seconds:g} s timed per cell after a warm-up; batch indices copied to the device every step, as the engine does")
    rows, failed = [], []
    for case in cases:
        case_rows, check = measure(case, batch_sizes, seconds, args.dtype, device)
        rows += case_rows
        if check is not None:
            difference, tolerance = check
            ok = difference <= tolerance
            failed += [] if ok else [str(case)]
            print(f"check {case}: after {CHECK_STEPS} steps on the same batches, CuPy vs NumPy "
                  f"max relative difference {difference:.1e} (tolerance {tolerance:.0e}): {'ok' if ok else 'MISMATCH'}")
    print()
    print(format_table(rows))
    if failed:
        print(f"\nCuPy and NumPy disagree on: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
