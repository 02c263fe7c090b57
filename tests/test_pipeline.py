"""The pipeline API: preprocessing steps against NumPy references, training and
evaluation against scikit-learn, outputs read back, TOML round trips and TOML errors."""

from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import sklearn.cluster
import sklearn.linear_model
import sklearn.metrics
import xarray as xr
from sklearn.metrics import adjusted_rand_score

from dask_asgd.errors import ConfigError, DataError
from dask_asgd.outputs import load_model
from dask_asgd.pipeline import (
    Blobs,
    Classification,
    Data,
    Evaluate,
    NumpyFile,
    Outputs,
    Pipeline,
    Regression,
    SelectFeatures,
    Split,
    Standardize,
    Train,
    XarrayStore,
)

PIPELINES = sorted((Path(__file__).parents[1] / "pipelines").glob("*.toml"))


def _data(n=1_000, chunks=300, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(loc=[1.0, -2.0, 5.0], scale=[1.0, 3.0, 0.5], size=(n, 3))
    X[:, 1] = np.arange(n)  # a row id, to follow rows through the split
    return X, Data(da.from_array(X, chunks=(chunks, 3)), da.from_array(np.arange(n), chunks=chunks), ("a", "b", "c"))


# -- preprocessing ----------------------------------------------------------------------
def test_split_is_random_seeded_complete_and_keeps_rows_with_targets(client):
    _, data = _data()
    split = Split(test_size=0.25, random_state=3).apply(data, client)
    # Each chunk gives up round(0.25 * its rows); sizes are known without computing.
    assert split.X_test.chunks[0] == (75, 75, 75, 25) and split.X.chunks[0] == (225, 225, 225, 75)
    train, test = split.X.compute(), split.X_test.compute()
    ids = np.concatenate([train[:, 1], test[:, 1]])
    np.testing.assert_array_equal(np.sort(ids), np.arange(1_000))  # every row once
    np.testing.assert_array_equal(split.y.compute(), train[:, 1])  # targets follow their rows
    np.testing.assert_array_equal(split.y_test.compute(), test[:, 1])
    assert not np.array_equal(test[:75, 1], np.arange(75))  # drawn at random, not the first rows
    again = Split(test_size=0.25, random_state=3).apply(data, client).X_test.compute()
    other = Split(test_size=0.25, random_state=4).apply(data, client).X_test.compute()
    np.testing.assert_array_equal(again, test)
    assert not np.array_equal(other, test)


def test_split_rejects_bad_sizes(client):
    _, data = _data(n=10, chunks=5)
    with pytest.raises(ConfigError, match="test_size=1.5 is not valid; use a fraction between 0 and 1"):
        Split(test_size=1.5).apply(data, client)
    with pytest.raises(DataError, match="leaves 0 of 10 rows for testing"):
        Split(test_size=0.01).apply(data, client)
    with pytest.raises(ConfigError, match="split twice"):
        Split().apply(Split().apply(data, client), client)


def test_standardize_uses_training_statistics_for_both_parts(client):
    X, data = _data()
    X[:, 2] = 7.0  # a constant column
    data = Data(da.from_array(X, chunks=(300, 3)), data.y, data.features)
    split = Split(test_size=0.2, random_state=0).apply(data, client)
    train_raw, test_raw = split.X.compute(), split.X_test.compute()
    out = Standardize().apply(split, client)
    mean, std = train_raw.mean(axis=0), train_raw.std(axis=0)
    scale = np.where(std > 0, std, 1.0)
    np.testing.assert_allclose(out.X.compute(), (train_raw - mean) / scale, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.X_test.compute(), (test_raw - mean) / scale, rtol=1e-12, atol=1e-12)
    assert np.all(out.X.compute()[:, 2] == 0.0)  # constant column: 0, not NaN
    np.testing.assert_allclose(out.scaling[0], mean)
    # Twice in a row composes into one scaling that maps raw rows to the result.
    twice = Standardize().apply(out, client)
    m, s = twice.scaling
    np.testing.assert_allclose((train_raw - m) / s, twice.X.compute(), atol=1e-9)


def test_select_features_by_column_or_variable_name(client):
    X = np.arange(20.0).reshape(4, 5)
    names = ("sst", "t2m[lat=0]", "t2m[lat=10]", "t2m_max", "u")
    data = Data(da.from_array(X, chunks=2), None, names, scaling=(np.arange(5.0), np.ones(5)))
    out = SelectFeatures(names=["u", "t2m"]).apply(data, client)
    assert out.features == ("u", "t2m[lat=0]", "t2m[lat=10]")  # t2m selects its columns, not t2m_max
    np.testing.assert_array_equal(out.X.compute(), X[:, [4, 1, 2]])
    np.testing.assert_array_equal(out.scaling[0], [4.0, 1.0, 2.0])
    with pytest.raises(DataError, match=r"feature 'v' is not in the data; available features: sst, t2m\[lat=0\]"):
        SelectFeatures(names=["v"]).apply(data, client)


# -- training, evaluation, outputs ---------------------------------------------------------
def test_kmeans_pipeline_matches_scikit_learn_and_writes_outputs(client, tmp_path):
    pipeline = Pipeline(
        source=Blobs(n_samples=60_000, n_features=6, centers=5, chunk_rows=15_000, random_state=2),
        preprocess=[Split(test_size=0.25, random_state=0)],
        train=Train("kmeans", {"n_clusters": 5, "random_state": 0, "max_epochs": 5}),
        name="blobs-test",
    )
    result = pipeline.run(client, out=tmp_path / "out")
    assert client.status != "closed"  # the caller's client stays open
    X_train, X_test = client.compute([result.data.X, result.data.X_test], sync=True)
    reference = sklearn.cluster.KMeans(5, n_init=3, random_state=0).fit(X_train)
    ref_inertia = -reference.score(X_test)
    metrics = result.evaluation["metrics"]
    assert result.evaluation["on"] == "test" and result.evaluation["n_samples"] == 15_000
    # Well-separated blobs: within 1% of scikit-learn's Lloyd on the held-out rows.
    assert metrics["inertia"] <= ref_inertia * 1.01
    assert metrics["adjusted_rand"] >= 0.99
    # The saved model predicts like the estimator, loading no pickle.
    model = load_model(result.files["model"])
    np.testing.assert_array_equal(model.predict(X_test), result.estimator.predict(X_test))
    assert model.params["n_clusters"] == 5 and model.features == tuple(f"x{i}" for i in range(6))
    history = xr.open_dataset(result.files["history"])
    assert {"time", "worker"} <= set(history.dims) and history.sizes["worker"] == 2
    assert history.loss.dims == ("time", "worker")
    assert Path(result.files["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.summary["evaluation"]["metrics"] == metrics
    assert result.summary["data"] == {"n_train": 45_000, "n_test": 15_000, "n_features": 6, "standardized": False}


def test_logistic_pipeline_with_standardize_and_select_matches_scikit_learn(client, tmp_path):
    pipeline = Pipeline(
        source=Classification(n_samples=40_000, n_features=8, n_classes=3, n_informative=4, class_sep=1.5,
                              chunk_rows=10_000, random_state=4),
        preprocess=[Standardize(), Split(test_size=0.2), SelectFeatures(names=["x0", "x1", "x2", "x3"])],
        train=Train("logistic_regression", {"random_state": 0, "max_epochs": 5}),
        outputs=Outputs(plot=False, history=False),
    )
    result = pipeline.run(client, out=tmp_path)
    X, y, X_test, y_test = client.compute([result.data.X, result.data.y, result.data.X_test, result.data.y_test], sync=True)
    reference = sklearn.linear_model.LogisticRegression().fit(X, y)
    metrics = result.evaluation["metrics"]
    assert metrics["accuracy"] >= reference.score(X_test, y_test) - 0.01
    # The metric is the mean cross-entropy of the estimator's own probabilities...
    proba = result.estimator.predict_proba(X_test)
    assert metrics["log_loss"] == pytest.approx(sklearn.metrics.log_loss(y_test, proba), rel=1e-9)
    # ... and 5 epochs of SGD come within 15% of scikit-learn's converged solver.
    assert metrics["log_loss"] <= sklearn.metrics.log_loss(y_test, reference.predict_proba(X_test)) * 1.15
    assert sorted(result.files) == ["model", "summary"]
    # The model file holds the scaling: it predicts from raw (unscaled, all-feature) rows.
    raw = client.compute(pipeline.source.load(Path("."), client).X, sync=True)
    model = load_model(result.files["model"])
    assert model.features == ("x0", "x1", "x2", "x3")
    np.testing.assert_array_equal(model.predict(raw[:500, :4]), result.estimator.predict((raw[:500, :4] - model.arrays["scaling_mean"]) / model.arrays["scaling_scale"]))


def test_linear_regression_pipeline_recovers_r2(client):
    pipeline = Pipeline(
        source=Regression(n_samples=30_000, n_features=5, noise=0.5, chunk_rows=10_000, random_state=1),
        preprocess=[Split(test_size=0.2)],
        train=Train("linear_regression", {"random_state": 0, "max_epochs": 20, "tol": None}),
        outputs=Outputs(model=False, history=False, plot=False, summary=False),
    )
    result = pipeline.run(client)
    X, y, X_test, y_test = client.compute([result.data.X, result.data.y, result.data.X_test, result.data.y_test], sync=True)
    reference = sklearn.linear_model.LinearRegression().fit(X, y)
    assert result.evaluation["metrics"]["r2"] >= reference.score(X_test, y_test) - 0.005
    mse = result.evaluation["metrics"]["mse"]
    assert mse == pytest.approx(np.mean((result.estimator.predict(X_test) - y_test) ** 2), rel=1e-9)
    assert mse <= np.mean((reference.predict(X_test) - y_test) ** 2) * 1.05
    assert result.files == {}


def test_climate_pipeline_creates_its_store_and_finds_the_regimes(client, tmp_path):
    text = (Path(__file__).parents[1] / "pipelines" / "climate_regimes.toml").read_text()
    pipeline = Pipeline.from_string(text, base_dir=tmp_path)
    # A smaller field than the shipped file's, same shape of problem.
    pipeline.source.create.update(n_time=4_000, chunk_time=1_000)
    pipeline.source.chunk_rows = 1_000
    result = pipeline.run(client, out=tmp_path / "out")
    assert (tmp_path / "data" / "climate_regimes.zarr").is_dir()
    assert result.data.X.shape[1] == 16 * 32
    assert result.evaluation["metrics"]["adjusted_rand"] >= 0.95
    truth = result.data.y_test.compute()
    labels = load_model(result.files["model"]).predict(
        result.data.X_test.compute() * result.data.scaling[1] + result.data.scaling[0])
    assert adjusted_rand_score(truth, labels) == pytest.approx(result.evaluation["metrics"]["adjusted_rand"])


def test_training_parameters_are_checked_before_cluster_work():
    with pytest.raises(ConfigError, match=r"\[train\] key 'n_cluster' is not a parameter of KMeans; valid keys: estimator, batch_size, .*n_clusters"):
        Train("kmeans", {"n_cluster": 3}).check()
    with pytest.raises(ConfigError, match=r"\[train\] mode='fast' is not known; use one of 'asgd'"):
        Train("kmeans", {"mode": "fast"}).check()
    with pytest.raises(ConfigError, match=r"\[train\] alpha=-1 is not valid"):
        Train("logistic_regression", {"alpha": -1}).check()
    with pytest.raises(ConfigError, match=r"estimator = 'svm' is not known; use one of: kmeans, linear_regression"):
        Train("svm").check()
    # Every constructor parameter passes through; "none" stands for None.
    train = Train.from_table({"estimator": "logistic_regression", "update_filter": "none", "comm_interval": 1000,
                              "message_size": 64, "mode": "sync", "max_time": 5.0, "tol": "none", "alpha": 0.0})
    est = train.build()
    assert (est.update_filter, est.tol, est.comm_interval, est.message_size, est.mode) == (None, None, 1000, 64, "sync")
    assert train.to_table()["update_filter"] == "none"


def test_metric_choices_are_checked(tmp_path):
    with pytest.raises(ConfigError, match=r"metric 'accuracy' is not known for kmeans; valid metrics: inertia, adjusted_rand"):
        Evaluate(["accuracy"]).chosen("kmeans", True)
    np.save(tmp_path / "X.npy", np.zeros((10, 2)))
    unlabelled = Pipeline(source=NumpyFile(path="X.npy"), train=Train("kmeans", {"n_clusters": 2}),
                          evaluate=Evaluate(["adjusted_rand"]), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="metric 'adjusted_rand' needs targets but the source has none"):
        unlabelled.check()
    unlabelled.evaluate = Evaluate()
    unlabelled.check()
    assert unlabelled.evaluate.chosen("kmeans", False) == ["inertia"]
    unlabelled.train = Train("linear_regression")
    with pytest.raises(ConfigError, match="linear_regression needs targets but the \\[source\\] gives none"):
        unlabelled.check()


# -- TOML ---------------------------------------------------------------------------------
@pytest.mark.parametrize("path", PIPELINES, ids=[p.stem for p in PIPELINES])
def test_shipped_pipelines_round_trip(path):
    pipeline = Pipeline.from_toml(path)
    assert pipeline.name == path.stem
    again = Pipeline.from_string(pipeline.to_toml(), base_dir=path.parent)
    assert again == pipeline
    assert again.to_dict() == pipeline.to_dict()
    pipeline.check()


def test_every_stage_kind_round_trips_through_a_file(tmp_path):
    pipeline = Pipeline(
        source=XarrayStore(path="d/x.zarr", sample_dim="day", variables=["a", "b"], target="c", chunk_rows=7,
                           create={"kind": "climate", "n_time": 10, "noise": 0.5}),
        preprocess=[SelectFeatures(["a"]), Standardize(), Split(test_size=0.3, random_state=9)],
        train=Train("kmeans", {"n_clusters": 3, "tol": None, "learning_rate": 1e-3, "update_filter": None}),
        evaluate=Evaluate(["inertia"]),
        outputs=Outputs(dir="results here", plot=False),
        name='quote " and backslash \\',
    )
    path = tmp_path / "p.toml"
    pipeline.to_toml(path)
    loaded = Pipeline.from_toml(path)
    assert loaded == pipeline
    assert loaded.base_dir == tmp_path
    for source in (Blobs(centers=3), Classification(n_informative=2), Regression(bias=1.5),
                   NumpyFile(path="a.npz", x_key="A", y_key="B", chunk_rows=5)):
        p = Pipeline(source=source, train=Train("kmeans"))
        assert Pipeline.from_string(p.to_toml()) == p


@pytest.mark.parametrize(("text", "message"), [
    ("[source\nkind='blobs'", r"not valid TOML: .*line 1"),
    ("[train]\nestimator='kmeans'", r"the \[source\] section is missing"),
    ("[source]\nkind='blobs'\n[train]\nestimator='kmeans'\n[trian]\n", r"unknown top-level key or section 'trian'; valid ones: name, source"),
    ("[source]\nkind='csv'\n[train]\nestimator='kmeans'", r"\[source\] kind = 'csv' is not known; use one of: blobs, classification"),
    ("[source]\nkind='blobs'\nn_sample=5\n[train]\nestimator='kmeans'",
     r"\[source\] key 'n_sample' is not known for kind 'blobs'; valid keys: kind, n_samples, n_features"),
    ("[source]\nkind='blobs'\nn_samples='many'\n[train]\nestimator='kmeans'", r"\[source\] n_samples = 'many' is not valid; use an integer"),
    ("name='../../etc'\n[source]\nkind='blobs'\n[train]\nestimator='kmeans'", r"name = '../../etc' is not valid: it names the folder results/<name>"),
    ("[source]\nkind='blobs'\n[train]\nestimator='kmeans'\n[[preprocess]]\nkind='scale'", r"kind = 'scale' is not known; use one of: standardize, split, select"),
    ("[source]\nkind='blobs'\n[train]\nestimator='kmeans'\n[[preprocess]]\nkind='select'\nnames='x0'", r"names = 'x0' is not valid; use a list of strings"),
    ("[source]\nkind='blobs'\n[train]\nn_clusters=3", r"\[train\] needs an estimator key"),
    ("[source]\nkind='blobs'\n[train]\nestimator='kmeans'\nn_cluster=3", r"\[train\] key 'n_cluster' is not a parameter of KMeans"),
    ("[source]\nkind='blobs'\n[train]\nestimator='kmeans'\n[outputs]\npng=true", r"\[outputs\] key 'png' is not known; valid keys: dir, model"),
])
def test_bad_pipeline_text_says_what_and_where(text, message):
    with pytest.raises(ConfigError, match=message):
        Pipeline.from_string(text)


def test_file_errors_name_the_file(tmp_path):
    (tmp_path / "bad.toml").write_text("[source]\nkind='blobs'\nn_sampels=3\n[train]\nestimator='kmeans'\n")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'bad.toml'}: \[source\] key 'n_sampels'"):
        Pipeline.from_toml(tmp_path / "bad.toml")
    with pytest.raises(FileNotFoundError, match="pipeline file .*absent.toml does not exist"):
        Pipeline.from_toml(tmp_path / "absent.toml")


def test_readme_shows_the_main_job_as_it_is():
    root = Path(__file__).parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("less its opening comments):\n\n```toml\n")[1].split("```")[0]
    text = (root / "pipelines" / "kmeans_blobs.toml").read_text()
    assert Pipeline.from_string(block) == Pipeline.from_toml(root / "pipelines" / "kmeans_blobs.toml")
    assert block.strip() == text[text.index("name ="):].strip()
