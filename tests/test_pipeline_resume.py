"""Checkpoints from a pipeline file, and `dask-asgd run --resume`."""

import subprocess
import sys

from dask_asgd.checkpoint import list_checkpoints, load

PIPELINE = """
name = "resumable"
[source]
kind = "blobs"
n_samples = 40_000
n_features = 4
centers = 5
chunk_rows = 10_000
random_state = 0
[train]
estimator = "kmeans"
n_clusters = 5
max_epochs = 4
tol = "none"
random_state = 0
checkpoint = "ckpt"        # read from this file's folder
"""


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "dask_asgd.cli", "run", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_checkpoints_land_beside_the_pipeline_and_resume_continues(tmp_path):
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "p.toml").write_text(PIPELINE)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    first = _run(str(folder / "p.toml"), "--workers", "2", "--out", str(tmp_path / "out1"), cwd=elsewhere)
    assert first.returncode == 0, first.stderr[-2000:]
    written = list_checkpoints(folder / "ckpt")
    assert written and not (elsewhere / "ckpt").exists()
    before = load(written[0], model="KMeansModel")

    second = _run(str(folder / "p.toml"), "--resume", "--workers", "2", "--out", str(tmp_path / "out2"), cwd=elsewhere)
    assert second.returncode == 0, second.stderr[-2000:]
    after = load(list_checkpoints(folder / "ckpt")[0], model="KMeansModel")
    # Resumed: it counted on from the samples the first run had seen.
    assert after.sequence > before.sequence and after.samples > before.samples


def test_resume_without_a_checkpoint_folder_is_a_config_error(tmp_path):
    (tmp_path / "p.toml").write_text(PIPELINE.replace('checkpoint = "ckpt"        # read from this file\'s folder\n', ""))
    result = _run(str(tmp_path / "p.toml"), "--resume", cwd=tmp_path)
    assert result.returncode == 3
    assert '--resume needs a checkpoint folder: add checkpoint = "DIR" under [train]' in result.stderr
