"""`dask-asgd run` as a user runs it (a subprocess): every error path with its one-line
message and exit code, and the main job on a real `dask scheduler` with two `dask worker`s."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import sklearn.cluster
import xarray as xr
from sklearn.metrics import adjusted_rand_score

from dask_asgd import datasets
from dask_asgd.outputs import load_model
from dask_asgd.pipeline import Pipeline

ROOT = Path(__file__).parents[1]
MAIN_JOB = ROOT / "pipelines" / "kmeans_blobs.toml"


def dask_asgd(*args, env=None, timeout=240):
    # The console script `dask-asgd` calls dask_asgd.cli:main, as this does.
    return subprocess.run(
        [sys.executable, "-m", "dask_asgd.cli", *map(str, args)], check=False,
        capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # one readable line, no traceback
    return lines[0]


def test_help_documents_every_exit_code():
    from dask_asgd.cli import EXIT_CODES, INTERRUPTED

    result = dask_asgd("run", "--help")
    assert result.returncode == 0
    for code in [0, 1, 2, *EXIT_CODES.values(), INTERRUPTED]:
        assert f"\n  {code} " in result.stdout
    assert "--scheduler ADDRESS" in result.stdout and "--out DIR" in result.stdout


def write(tmp_path, text, name="p.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BLOBS = "[source]\nkind = 'blobs'\nn_samples = 1000\n"


@pytest.mark.parametrize(("text", "code", "message"), [
    ("[source\n", 3, r"p.toml: not valid TOML: .* \(at line 1, column 8\); fix the syntax there"),
    (BLOBS + "[train]\nestimator = 'kmeans'\nn_cluster = 3\n", 3,
     r"\[train\] key 'n_cluster' is not a parameter of KMeans; valid keys: estimator, batch_size, .*n_clusters"),
    (BLOBS + "chunk = 5\n[train]\nestimator = 'kmeans'\n", 3,
     r"\[source\] key 'chunk' is not known for kind 'blobs'; valid keys: kind, n_samples, .*chunk_rows"),
    (BLOBS + "[train]\nestimator = 'kmeans'\nmode = 'fast'\n", 3, r"\[train\] mode='fast' is not known; use one of 'asgd'"),
    ("[source]\nkind = 'xarray'\npath = 'absent.zarr'\nvariables = ['t2m']\n[train]\nestimator = 'kmeans'\n", 4,
     r"absent.zarr does not exist; check \[source\] path"),
])
def test_pipeline_file_errors(tmp_path, text, code, message):
    result = dask_asgd("run", write(tmp_path, text), "--out", tmp_path / "out")
    assert result.returncode == code
    assert error_line(result).startswith("dask-asgd run: error: ")
    assert re.search(message, error_line(result)), error_line(result)
    assert not (tmp_path / "out").exists()  # refused before any work


def test_missing_pipeline_file(tmp_path):
    result = dask_asgd("run", tmp_path / "nope.toml")
    assert result.returncode == 4
    assert "pipeline file" in error_line(result) and "nope.toml does not exist" in error_line(result)


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "field.zarr"
    datasets.make_climate_field(100, 2, 3, chunk_time=50).to_zarr(path, consolidated=False)
    return path


@pytest.mark.parametrize(("fields", "message"), [
    ("sample_dim = 'time'\nvariables = ['temperature']",
     r"variable 'temperature' is not in .*field.zarr; available variables: regime, t2m; fix \[source\] variables"),
    ("sample_dim = 'day'\nvariables = ['t2m']",
     r"sample_dim 'day' is not a dim of .*field.zarr; available dims: time, lat, lon; set \[source\] sample_dim"),
])
def test_wrong_variable_or_dim_name_lists_the_available_ones(tmp_path, zarr_store, fields, message):
    text = f"[source]\nkind = 'xarray'\npath = '{zarr_store}'\n{fields}\n[train]\nestimator = 'kmeans'\n"
    result = dask_asgd("run", write(tmp_path, text), "--out", tmp_path / "out")
    assert result.returncode == 6
    assert re.search(message, error_line(result)), error_line(result)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler(tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    result = dask_asgd("run", MAIN_JOB, "--scheduler", address, "--out", tmp_path,
                       env={"DASK_ASGD__CLI__CONNECT_TIMEOUT": "1"})
    assert result.returncode == 5
    assert error_line(result) == (
        f"dask-asgd run: error: cannot reach the Dask scheduler at {address} within 1 s; "
        "check the address (e.g. tcp://127.0.0.1:8786) and that `dask scheduler` is running there"
    )
    result = dask_asgd("run", MAIN_JOB, "--scheduler", "localhost")
    assert result.returncode == 5
    assert "'localhost' is not a scheduler address" in error_line(result)


def test_bad_command_line_and_unwritable_output(tmp_path):
    result = dask_asgd("run", MAIN_JOB, "--workers", "0")
    assert result.returncode == 2
    assert "--workers: '0' is not a positive integer" in result.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = dask_asgd("run", MAIN_JOB, "--out", blocker / "out", "--workers", "1")
    assert result.returncode == 4
    assert f"output directory {blocker / 'out'} cannot be created" in error_line(result)


def test_training_failure_exit_code(tmp_path):
    X = np.random.default_rng(0).normal(size=(400, 2))
    X[7, 1] = np.nan
    np.save(tmp_path / "X.npy", X)
    text = "[source]\nkind = 'numpy'\npath = 'X.npy'\n[train]\nestimator = 'kmeans'\nn_clusters = 2\n"
    result = dask_asgd("run", write(tmp_path, text), "--workers", "1", "--out", tmp_path / "out")
    assert result.returncode == 7
    assert error_line(result) == (
        "dask-asgd run: error: training kmeans failed: X contains 1 NaN or inf value(s) in column(s) [1]; "
        "drop or impute them before fit"
    )


def _wait_for_port(port: int, proc, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, "dask scheduler exited"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"dask scheduler did not listen on {port}")


def _dask_command(*args):
    script = shutil.which("dask")
    return [script, *args] if script else [sys.executable, "-m", "dask", *args]


def test_main_job_on_a_real_scheduler_and_two_workers(tmp_path):
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name, *args):
        with open(logs / f"{name}.log", "w") as log:  # the child keeps its own copy of the handle
            procs.append(subprocess.Popen(_dask_command(*args), stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        return procs[-1]

    try:
        scheduler = start("scheduler", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                          "--dashboard-address", "127.0.0.1:0")
        _wait_for_port(port, scheduler)
        for i in range(2):
            start(f"worker{i}", "worker", address, "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard")
        out = tmp_path / "out"
        result = dask_asgd("run", MAIN_JOB, "--scheduler", address, "--workers", "2", "--out", out)
        assert result.returncode == 0, result.stdout + result.stderr + "".join(p.read_text() for p in logs.iterdir())
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    assert f"scheduler {address}, 2 worker(s)" in result.stdout
    assert "dashboard: http://" in result.stdout
    assert "[train] done in" in result.stdout and "samples/s" in result.stdout

    summary = json.loads((out / "summary.json").read_text())
    metrics = summary["evaluation"]["metrics"]
    assert summary["cluster"]["scheduler"] == address and summary["cluster"]["workers"] == 2
    assert summary["evaluation"]["on"] == "test" and summary["evaluation"]["n_samples"] == 200_000
    assert set(metrics) == {"inertia", "adjusted_rand"} and metrics["adjusted_rand"] >= 0.99
    assert summary["pipeline"] == Pipeline.from_toml(MAIN_JOB).to_dict()
    assert summary["training"]["samples"] > 0 and set(summary["times"]) >= {"source", "train", "evaluate", "total"}

    history = xr.open_dataset(out / "history.nc")
    assert history.loss.dims == ("time", "worker") and history.sizes["worker"] == 2
    assert all(str(w).startswith("tcp://127.0.0.1:") for w in history.worker.values)
    assert {"comm_interval", "message_size", "samples"} <= set(history.data_vars)

    png = out / "history.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).shape[0] > 100  # decodes as an image

    with np.load(out / "model.npz", allow_pickle=False) as f:
        assert f["cluster_centers"].shape == (10, 16)
    model = load_model(out / "model.npz")

    # The same held-out rows, rebuilt here from the pipeline's seeds.
    pipeline = Pipeline.from_toml(MAIN_JOB)
    data = pipeline.source.load(pipeline.base_dir, None)
    for step in pipeline.preprocess:
        data = step.apply(data, None)
    X_test, y_test = data.X_test.compute(), data.y_test.compute()
    labels = model.predict(X_test)
    inertia = float(((X_test - model.arrays["cluster_centers"][labels]) ** 2).sum())
    assert inertia == pytest.approx(metrics["inertia"], rel=1e-9)
    # Independent reference: scikit-learn's Lloyd on 100,000 training rows; the
    # blobs are well separated, so both reach the same optimum within 1%.
    X_train = data.X[:100_000].compute()
    reference = sklearn.cluster.KMeans(10, n_init=3, random_state=0).fit(X_train)
    assert inertia <= -reference.score(X_test) * 1.01
    assert adjusted_rand_score(y_test, labels) == pytest.approx(metrics["adjusted_rand"], rel=1e-9)
