"""The peers benchmark's plumbing: a tiny suite on a real LocalCluster runs every
method and writes results.json, results.md and the plots (not its speed)."""

import json
import os

import numpy as np
import pytest
from sklearn.metrics import log_loss

from dask_asgd import bench_peers, cli
from dask_asgd.bench_peers import PeerProblem
from dask_asgd.bench_peers_methods import logistic_metric

REQUIRED = {"problem", "method", "regime", "time_to_target_s", "final_metric", "repeats", "status"}


def _strict_json(text):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("peers")
    tiny_problems = [
        PeerProblem("kmeans-blobs", "kmeans", "blobs", 20_000, 8, 4, budget_s=1.0, cost_cap_s=6.0, restarts=2,
                    regimes=("local", bench_peers.SLOW_RATE)),
        PeerProblem("logistic-classification", "logistic", "classification", 20_000, 8, 2, budget_s=1.0,
                    cost_cap_s=6.0, restarts=1),
    ]
    records = bench_peers.run(out, repeats=1, problem_list=tiny_problems,
                              efficiency={"n_samples": 20_000, "seconds": 1.0}, log=lambda *a: None)
    return out, records


def test_tiny_suite_writes_valid_json_with_every_method(tiny):
    out, records = tiny
    written = _strict_json((out / "results.json").read_text())
    assert written == json.loads(json.dumps(records))
    for record in written:
        assert REQUIRED <= set(record), record["method"]
        assert record["status"] in ("ok", "failed", "skipped")
        if record["status"] != "ok":
            assert record["reason"], record
    local = {(r["problem"], r["method"]) for r in written if r["regime"] == "local"}
    assert {("kmeans-blobs", m) for m in bench_peers.KMEANS_METHODS} <= local
    assert {("logistic-classification", m) for m in bench_peers.LOGISTIC_METHODS} <= local
    assert {r["problem"] for r in written} >= {"efficiency-kmeans", "efficiency-logistic"}


def test_tiny_suite_measures_what_it_claims(tiny):
    _, records = tiny
    for r in (r for r in records if r["status"] == "ok" and not r["problem"].startswith("efficiency")):
        assert r["repeats"] == 1 and r["final_metric"] > 0
        assert r["target_metric"] == pytest.approx(r["reference_metric"] * 1.01)
        for points in r["traces"]:
            assert points and all(w > 0 for w, _ in points)
        t = r["time_to_target_s"]
        assert t is None or t == next(w for w, m in r["traces"][0] if m <= r["target_metric"])
    asgd = next(r for r in records if r["problem"] == "kmeans-blobs" and r["method"] == "asgd" and r["regime"] == "local")
    assert asgd["status"] == "ok", asgd.get("reason")
    info = asgd["info"][0]
    assert info["setup_s"] > 0 and info["samples"] > 0
    for r in (r for r in records if r["problem"].startswith("efficiency")):
        assert 0 < r["final_metric"] < 5
        # Bare loops side by side: the sum of n processes' rates over n x one alone.
        assert 0 < r["side_by_side"] < 1.5 and len(r["side_by_side_all"]) == r["repeats"]
        # The engine without state messages, beside it: what the exchange costs.
        assert 0 < r["simuparallel_efficiency"] < 5 and len(r["simuparallel_efficiency_all"]) == r["repeats"]


def test_slow_network_runs_as_root_or_is_skipped_with_the_reason(tiny):
    _, records = tiny
    slow = [r for r in records if r["regime"] == bench_peers.SLOW_RATE]
    assert {r["method"] for r in slow} == {"asgd", "sync"}
    if os.geteuid() == 0:
        assert all(r["status"] == "ok" for r in slow), [r.get("reason") for r in slow]
    else:
        assert all(r["status"] == "skipped" and "root" in r["reason"] for r in slow)


def test_tiny_suite_writes_table_and_plots(tiny):
    out, _ = tiny
    table = (out / "results.md").read_text()
    assert "| kmeans-blobs | local | asgd |" in table and "parallel efficiency" in table
    for kind in ("kmeans", "logistic"):
        assert (out / f"peers_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unwritable_out_is_refused_before_any_work(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert cli.main(["bench", "--quick", "--out", str(blocker / "results")]) == 4
    err = capsys.readouterr().err
    assert "cannot write the results into" in err and "--out" in err


def test_a_slow_network_only_problem_is_not_loaded_when_the_slow_network_is_off(tmp_path):
    wide = PeerProblem("kmeans-wide", "kmeans", "blobs", 10_000, 8, 4, budget_s=1.0, cost_cap_s=6.0, restarts=1,
                       regimes=(bench_peers.SLOW_RATE,))
    logged = []
    records = bench_peers.run(tmp_path, repeats=1, problem_list=[wide], slow_network=False, efficiency={},
                              log=logged.append)
    assert records == [] and not any("reference" in line for line in logged)


def test_the_logistic_metric_matches_scikit_learn_for_two_classes_and_for_many():
    # The objective every method is scored on: mean cross-entropy (scikit-learn's
    # log_loss of the predicted probabilities) + alpha/2 ||coef||^2, intercept spared.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 6))
    alpha = 1e-2
    w, b = rng.normal(size=6), 0.3
    y2 = rng.integers(2, size=500)
    p = 1.0 / (1.0 + np.exp(-(X @ w + b)))
    expected = log_loss(y2, p, labels=[0, 1]) + 0.5 * alpha * float(w @ w)
    assert logistic_metric(X, y2, w[None, :], [b], alpha) == pytest.approx(expected, rel=1e-12)
    W, c = rng.normal(size=(5, 6)), rng.normal(size=5)
    y5 = rng.integers(5, size=500)
    Z = X @ W.T + c
    P = np.exp(Z - Z.max(axis=1, keepdims=True))
    P /= P.sum(axis=1, keepdims=True)
    expected = log_loss(y5, P, labels=range(5)) + 0.5 * alpha * float(np.sum(W * W))
    assert logistic_metric(X, y5, W, c, alpha) == pytest.approx(expected, rel=1e-9)
