"""A pipeline: source -> preprocessing -> training -> evaluation -> outputs, each a small
object; the same pipeline reads from and writes to a TOML file."""

from __future__ import annotations

import contextlib
import time
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

import dask
import dask.array as da
import numpy as np
from distributed import Client, get_client, wait

from . import __version__, _toml
from .cluster import connect, dashboard_link
from .engine._chains import worker_addresses
from .errors import ConfigError, MissingFileError, SchedulerUnreachable, TrainingFailed
from .outputs import Outputs
from .preprocessing import STEPS, SelectFeatures, Split, Standardize
from .balance._monitor import live_progress
from .progress import Progress
from .sources import (
    SOURCES,
    Blobs,
    Classification,
    Data,
    NumpyFile,
    Regression,
    XarrayStore,
)

# TOML estimator names -> dask_asgd classes.
ESTIMATORS = {"kmeans": "KMeans", "linear_regression": "LinearRegression", "logistic_regression": "LogisticRegression"}
# Metrics each estimator can be evaluated with; the first ones are the defaults.
METRICS = {
    "kmeans": ("inertia", "adjusted_rand"),
    "linear_regression": ("r2", "mse"),
    "logistic_regression": ("accuracy", "log_loss"),
}
_NEEDS_TARGETS = {"adjusted_rand", "r2", "mse", "accuracy", "log_loss"}
# TOML has no null: this string stands for Python's None in [train].
NONE = "none"


@dataclass
class Train:
    """Fit one of the estimators with ``params`` (any of its constructor's parameters).

    Example::

        Train("kmeans", {"n_clusters": 10, "max_epochs": 5, "random_state": 0})
    """

    estimator: str = "kmeans"
    params: dict[str, Any] = field(default_factory=dict)

    def estimator_class(self):
        import dask_asgd

        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"[train] estimator = {self.estimator!r} is not known; use one of: {', '.join(ESTIMATORS)}")
        return getattr(dask_asgd, ESTIMATORS[self.estimator])

    def build(self, client: Client | None = None):
        cls = self.estimator_class()
        valid = [p for p in cls().get_params(deep=False) if p != "client"]
        for key in self.params:
            if key not in valid:
                raise ConfigError(
                    f"[train] key {key!r} is not a parameter of {cls.__name__}; valid keys: estimator, {', '.join(valid)}"
                )
        return cls(**self.params, client=client)

    def check(self) -> None:
        """Check the parameters' values before any cluster work, as ``fit`` would."""
        from ._validation import check_common_params

        est = self.build()
        try:
            check_common_params(est)
            est._check_params()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"[train] {e}") from e

    def run(self, data: Data, client: Client):
        est = self.build(client)
        try:
            return est.fit(data.X) if self.estimator == "kmeans" else est.fit(data.X, data.y)
        except (ValueError, TypeError, FloatingPointError) as e:
            raise TrainingFailed(f"training {self.estimator} failed: {e}") from e
        except ConnectionError as e:  # the scheduler went away mid-fit
            raise SchedulerUnreachable(f"training {self.estimator} stopped: {e}") from e
        except RuntimeError as e:  # e.g. every worker left the cluster
            raise TrainingFailed(f"training {self.estimator} failed: {e}") from e

    @classmethod
    def from_table(cls, table: dict) -> Train:
        if not isinstance(table, dict) or "estimator" not in table:
            raise ConfigError(f"[train] needs an estimator key; use one of: {', '.join(ESTIMATORS)}")
        params = {k: None if v == NONE else v for k, v in table.items() if k != "estimator"}
        train = cls(table["estimator"], params)
        train.build()
        return train

    def to_table(self) -> dict:
        return {"estimator": self.estimator, **{k: NONE if v is None else v for k, v in self.params.items()}}


@dataclass
class Evaluate:
    """Score the fitted estimator on the test rows (all rows when there is no split).

    ``metrics`` (default: all of the estimator's): K-Means ``inertia``,
    ``adjusted_rand`` (against the source's labels); linear regression ``r2``,
    ``mse``; logistic regression ``accuracy``, ``log_loss``.
    """

    metrics: list[str] | None = None

    def chosen(self, estimator: str, has_targets: bool) -> list[str]:
        valid = METRICS[estimator]
        if self.metrics is None:
            return [m for m in valid if has_targets or m not in _NEEDS_TARGETS]
        for m in self.metrics:
            if m not in valid:
                raise ConfigError(f"[evaluate] metric {m!r} is not known for {estimator}; valid metrics: {', '.join(valid)}")
            if m in _NEEDS_TARGETS and not has_targets:
                raise ConfigError(f"[evaluate] metric {m!r} needs targets but the source has none; set a target in [source] or drop the metric")
        return list(self.metrics)

    def run(self, est, estimator: str, data: Data, client: Client) -> dict:
        on_test = data.X_test is not None
        X, y = (data.X_test, data.y_test) if on_test else (data.X, data.y)
        values = {}
        for metric in self.chosen(estimator, y is not None):
            values[metric] = float(_METRIC_FUNCTIONS[metric](est, X, y, client))
        return {"on": "test" if on_test else "train", "n_samples": int(X.shape[0]), "metrics": values}


def _adjusted_rand(est, X, y, client):
    from sklearn.metrics import adjusted_rand_score

    labels, truth = client.gather(client.compute([est.predict(X), y]))
    return adjusted_rand_score(truth, labels)


def _log_loss(est, X, y, client):
    classes = np.asarray(est.classes_)
    index = y.map_blocks(lambda b: np.searchsorted(classes, b), dtype=np.int64)
    proba = est.predict_proba(X)
    picked = (proba * (index[:, None] == da.arange(len(classes))[None, :])).sum(axis=1)
    return client.compute(-da.log(da.clip(picked, 1e-15, 1.0)).mean()).result()


_METRIC_FUNCTIONS = {
    "inertia": lambda est, X, y, client: -est.score(X),
    "adjusted_rand": _adjusted_rand,
    "r2": lambda est, X, y, client: est.score(X, y),
    "mse": lambda est, X, y, client: client.compute(((est.predict(X) - y) ** 2).mean()).result(),
    "accuracy": lambda est, X, y, client: est.score(X, y),
    "log_loss": _log_loss,
}


@dataclass
class Result:
    """What :meth:`Pipeline.run` returns: the fitted estimator, the data as trained
    on, the evaluation, the summary written to ``summary.json`` and the files written.

    ``data`` holds dask arrays persisted on the cluster: they can be computed while
    the client that ran the pipeline is open (not after an embedded cluster closed).
    """

    estimator: Any
    data: Data
    evaluation: dict
    summary: dict
    files: dict[str, str]


@dataclass
class Pipeline:
    """Source -> preprocessing steps -> training -> evaluation -> outputs.

    Relative paths in the stages are read from ``base_dir`` (the TOML file's
    folder when loaded from one).

    Example::

        pipeline = Pipeline(
            source=Blobs(n_samples=1_000_000, centers=10),
            preprocess=[Split(test_size=0.2)],
            train=Train("kmeans", {"n_clusters": 10, "random_state": 0}),
        )
        result = pipeline.run(out="results/kmeans")
        Pipeline.from_toml("pipelines/kmeans_blobs.toml").run(client)
    """

    source: Any
    train: Train
    preprocess: list = field(default_factory=list)
    evaluate: Evaluate = field(default_factory=Evaluate)
    outputs: Outputs = field(default_factory=Outputs)
    name: str = "pipeline"
    base_dir: Path = field(default=Path("."), compare=False)

    SECTIONS: ClassVar[tuple[str, ...]] = ("name", "source", "preprocess", "train", "evaluate", "outputs")

    # -- TOML -----------------------------------------------------------------------
    @classmethod
    def from_toml(cls, path) -> Pipeline:
        path = Path(path)
        try:
            text = path.read_text()
        except FileNotFoundError as e:
            raise MissingFileError(f"pipeline file {path} does not exist; pass the path of a .toml pipeline, e.g. pipelines/kmeans_blobs.toml") from e
        except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
            raise MissingFileError(f"pipeline file {path} cannot be read ({e}); pass a readable .toml file") from e
        try:
            return cls.from_string(text, base_dir=path.resolve().parent, default_name=path.stem)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from e

    @classmethod
    def from_string(cls, text: str, base_dir=".", default_name: str = "pipeline") -> Pipeline:
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"not valid TOML: {e}; fix the syntax there") from e
        return cls.from_dict(document, base_dir=base_dir, default_name=default_name)

    @classmethod
    def from_dict(cls, document: dict, base_dir=".", default_name: str = "pipeline") -> Pipeline:
        unknown = [k for k in document if k not in cls.SECTIONS]
        if unknown:
            raise ConfigError(f"unknown top-level key or section {unknown[0]!r}; valid ones: {', '.join(cls.SECTIONS)}")
        for required in ("source", "train"):
            if required not in document:
                raise ConfigError(f"the [{required}] section is missing; every pipeline needs [source] and [train]")
        source_table = document["source"]
        source = _toml.stage_from_table(_toml.pick(SOURCES, "[source]", source_table), "[source]", source_table)
        steps = document.get("preprocess", [])
        if not isinstance(steps, list):
            raise ConfigError("preprocess must be an array of tables; write each step as [[preprocess]] with a kind")
        preprocess = [_toml.stage_from_table(_toml.pick(STEPS, "[[preprocess]]", t), "[[preprocess]]", t) for t in steps]
        name = document.get("name", default_name)
        if not isinstance(name, str):
            raise ConfigError(f"name = {name!r} is not valid; use a string")
        # The name becomes the folder results/<name>: one path component, inside results/.
        if name in ("", ".", "..") or "/" in name or "\0" in name:
            raise ConfigError(f"name = {name!r} is not valid: it names the folder results/<name>; "
                              "use a name without '/', e.g. name = \"kmeans_blobs\"")
        return cls(
            source=source,
            preprocess=preprocess,
            train=Train.from_table(document["train"]),
            evaluate=_toml.stage_from_table(Evaluate, "[evaluate]", document.get("evaluate", {}), skip=()),
            outputs=_toml.stage_from_table(Outputs, "[outputs]", document.get("outputs", {}), skip=()),
            name=name,
            base_dir=Path(base_dir),
        )

    def to_dict(self) -> dict:
        document = {"name": self.name, "source": _toml.stage_to_table(self.source)}
        if self.preprocess:
            document["preprocess"] = [_toml.stage_to_table(s) for s in self.preprocess]
        document["train"] = self.train.to_table()
        document["evaluate"] = _toml.stage_to_table(self.evaluate)
        document["outputs"] = _toml.stage_to_table(self.outputs)
        return document

    def to_toml(self, path=None) -> str:
        """The pipeline as TOML text, also written to ``path`` if given."""
        text = _toml.dumps(self.to_dict())
        if path is not None:
            Path(path).write_text(text)
        return text

    # -- running --------------------------------------------------------------------
    def check(self) -> None:
        """Everything that can be checked without a cluster: settings, files, variable names."""
        self.source.check(self.base_dir)
        for step in self.preprocess:
            step.check()
        self.train.check()
        has_targets = self.source.has_targets
        if self.train.estimator != "kmeans" and not has_targets:
            raise ConfigError(f"[train] {self.train.estimator} needs targets but the [source] gives none; set its target (xarray) or y_key/target_path (numpy)")
        self.evaluate.chosen(self.train.estimator, has_targets)

    def output_dir(self, out=None) -> Path:
        """``out`` if given, else ``[outputs] dir`` (from ``base_dir``), else ``results/<name>``."""
        if out is not None:
            return Path(out)
        if self.outputs.dir is not None:
            return self.base_dir / self.outputs.dir
        return Path("results") / self.name

    def prepare_output(self, out=None) -> Path:
        """Create :meth:`output_dir` now, so an unwritable one shows up before any work."""
        path = self.output_dir(out)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise MissingFileError(f"output directory {path} cannot be created ({e.strerror}); pass a writable --out") from e
        return path

    def resuming(self) -> Pipeline:
        """This pipeline, set to continue from its newest checkpoint."""
        if "checkpoint" not in self.train.params:
            raise ConfigError('--resume needs a checkpoint folder: add checkpoint = "DIR" under [train]')
        return replace(self, train=replace(self.train, params={**self.train.params, "resume": True}))

    def _train_here(self) -> Train:
        # A checkpoint folder, like every path in the file, is read from the file's folder.
        return _resolved(self.train, self.base_dir)

    def run(self, client: Client | None = None, out=None, progress: Progress | None = None) -> Result:
        """Run every stage on ``client`` (default: the current client, else an embedded
        ``LocalCluster``) and write the outputs into :meth:`output_dir`."""
        progress = progress or Progress(out=None)
        self.check()
        writes = any((self.outputs.model, self.outputs.history, self.outputs.plot, self.outputs.summary))
        out_dir = self.prepare_output(out) if writes else None
        start = time.perf_counter()
        with _client_context(client) as cluster_client:
            n_workers = len(worker_addresses(cluster_client))
            with progress.stage("source", f"{self.source.kind}: building/reading the data on the workers"):
                data = self.source.load(self.base_dir, cluster_client).persist(cluster_client)
                _wait(data)
                progress.note(f"[source] {data.X.shape[0]:,} samples x {data.X.shape[1]:,} features in {data.X.npartitions} chunks")
            if self.preprocess:
                with progress.stage("preprocess", " -> ".join(s.kind for s in self.preprocess)):
                    for step in self.preprocess:
                        data = step.apply(data, cluster_client)
                    data = data.persist(cluster_client)
                    _wait(data)
            budget = TrainingBudget(self.train.params.get("max_time"), self.train.params.get("max_epochs", 10), data.X.shape[0])
            with progress.stage("train", f"{self.train.estimator} on {n_workers} worker(s)",
                                heartbeat=lambda s: _training_heartbeat(cluster_client, s, budget)):
                est = self._train_here().run(data, cluster_client)
            _report_training(progress, est)
            metrics = self.evaluate.chosen(self.train.estimator, data.y is not None)
            with progress.stage("evaluate", ", ".join(metrics) + (" on the test rows" if data.X_test is not None else "")):
                evaluation = self.evaluate.run(est, self.train.estimator, data, cluster_client)
            progress.note("[evaluate] on " + evaluation["on"] + ": " + ", ".join(f"{k} {v:.6g}" for k, v in evaluation["metrics"].items()))
            summary = self._summary(cluster_client, data, est, evaluation, progress.times, time.perf_counter() - start)
        files = {}
        if writes:
            with progress.stage("outputs", f"writing into {out_dir}"):
                files = self.outputs.write(out_dir, self.train.estimator, est, data, summary)
            summary["times"]["outputs"] = progress.times["outputs"]
        return Result(est, data, evaluation, summary, files)

    def _summary(self, client, data: Data, est, evaluation: dict, times: dict, total: float) -> dict:
        h = est.history_
        last = h.isel(time=-1)
        seconds = float(h.time[-1]) if h.sizes["time"] else 0.0
        samples = int(np.nansum(last.samples.values)) if "samples" in h else 0
        counters = {k: int(np.nansum(last[k].values)) for k in ("messages_sent", "accepted", "rejected") if k in h}
        return {
            "name": self.name,
            "dask_asgd_version": __version__,
            "pipeline": self.to_dict(),
            "config": dask.config.get("asgd"),
            "cluster": {
                "scheduler": client.scheduler.address,
                "workers": h.sizes["worker"],
                "dashboard": dashboard_link(client),
            },
            "data": {
                "n_train": int(data.X.shape[0]),
                "n_test": 0 if data.X_test is None else int(data.X_test.shape[0]),
                "n_features": int(data.X.shape[1]),
                "standardized": data.scaling is not None,
            },
            "evaluation": evaluation,
            "training": {
                "n_iter": int(est.n_iter_),
                "samples": samples,
                "seconds": seconds,
                "samples_per_s": samples / seconds if seconds > 0 else None,
                "final_loss": {str(w): float(last.loss.sel(worker=w)) for w in h.worker.values} if "loss" in h else {},
                "stop_reason": {str(w): str(r) for w, r in zip(h.worker.values, h.stop_reason.values)} if "stop_reason" in h else {},
                **counters,
            },
            "times": {**times, "total": total},
        }


@contextlib.contextmanager
def _client_context(client):
    if client is not None:
        yield client
        return
    try:
        current = get_client()
    except ValueError:
        current = None
    if current is not None:
        yield current
        return
    with connect() as embedded:
        yield embedded


def _wait(data: Data) -> None:
    wait([a for a in (data.X, data.y, data.X_test, data.y_test) if a is not None])


@dataclass(frozen=True)
class TrainingBudget:
    max_time: float | None
    max_epochs: int | None
    n_samples: int

    def seconds_left(self, samples: float, rate: float, elapsed: float) -> float | None:
        """At most this long still: max_time, or the epochs left at the current rate (tol may stop sooner)."""
        left = [] if not self.max_time else [max(self.max_time - elapsed, 0.0)]
        if self.max_epochs and rate > 0:
            left.append(max(self.max_epochs * self.n_samples - samples, 0.0) / rate)
        return min(left) if left else None


def _resolved(train: Train, base_dir: Path) -> Train:
    """``train`` with a relative ``checkpoint`` folder read from ``base_dir``."""
    folder = train.params.get("checkpoint")
    if folder is None or Path(folder).is_absolute():
        return train
    return replace(train, params={**train.params, "checkpoint": str(base_dir / folder)})


def _training_heartbeat(client, elapsed: float, budget: TrainingBudget) -> str:
    # The scheduler's monitor hears from every worker twice a second: ask it.
    try:
        live = client.run_on_scheduler(live_progress)
    except Exception:
        live = None
    if not live or live["done"]:
        return f"placing data and computing the initial state, {elapsed:.0f} s so far"
    left = budget.seconds_left(live["samples"], live["samples_per_second"], live["elapsed"])
    return (f"{live['samples']:,.0f} samples, {live['samples_per_second']:,.0f} samples/s, "
            f"loss {live['loss']:.5g}, {live['elapsed']:.0f} s trained"
            + ("" if left is None else f", at most {left:.0f} s left"))


def _report_training(progress: Progress, est) -> None:
    h = est.history_
    if not h.sizes["time"]:
        return
    last = h.isel(time=-1)
    # The workers' own clocks at their last rows: a fit shorter than one history
    # interval still has its true length (the time coordinate would say 0).
    seconds = float(np.nanmax(last.elapsed.values))
    samples = float(np.nansum(last.samples.values))
    rate = f" ({samples / seconds:,.0f} samples/s)" if seconds > 0 else ""
    progress.note(
        f"[train] {samples:,.0f} samples in {seconds:.1f} s{rate}, "
        f"{est.n_iter_} epoch(s), final loss per worker: " + ", ".join(f"{float(v):.4g}" for v in last.loss.values)
    )
    if "stop_reason" in h:
        progress.note("[train] stopped by: " + ", ".join(sorted({str(r) for r in h.stop_reason.values})))


# The stages, importable from here: ``from dask_asgd.pipeline import Pipeline, Blobs, Split, Train``.
__all__ = [
    "Blobs", "Classification", "Data", "Evaluate", "NumpyFile", "Outputs", "Pipeline", "Regression", "Result",
    "SelectFeatures", "Split", "Standardize", "Train", "XarrayStore",
]
