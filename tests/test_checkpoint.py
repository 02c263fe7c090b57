"""Checkpoint files: atomic writes that survive a crash mid-write, the newest one
found, and every kind of bad file (truncated, altered, foreign, mismatched) refused."""

import signal
import subprocess
import sys
import textwrap
import time
import zipfile

import numpy as np
import pytest

from dask_asgd import checkpoint
from dask_asgd.checkpoint import CorruptCheckpoint, MismatchedCheckpoint
from dask_asgd.errors import MissingFileError


def _params(n=1_000, value=1.0):
    return np.full(n, value)


def test_round_trip_keeps_arrays_and_metadata(tmp_path):
    aux = np.arange(12, dtype=np.int64).reshape(3, 4)
    path = checkpoint.save(tmp_path, {"params": _params(), "counts": aux}, model="KMeansModel",
                           samples=12_345, settings={"n_clusters": 10, "learning_rate": 1.0})
    assert path.name == "checkpoint-00000001.npz"
    with np.load(path, allow_pickle=False) as f:  # plain arrays only: loads without pickle
        assert "params" in f.files
    ck = checkpoint.load(path, model="KMeansModel", n_params=1_000, dtype=np.float64)
    np.testing.assert_array_equal(ck.params, _params())
    np.testing.assert_array_equal(ck.arrays["counts"], aux)
    assert (ck.model, ck.n_params, ck.samples, ck.sequence) == ("KMeansModel", 1_000, 12_345, 1)
    assert ck.settings == {"n_clusters": 10, "learning_rate": 1.0}
    assert np.dtype(ck.dtype) == np.float64


def test_newest_is_found_and_only_keep_are_kept(tmp_path):
    for i in range(5):
        checkpoint.save(tmp_path, {"params": _params(value=i)}, model="m", samples=i, keep=3)
    names = [p.name for p in checkpoint.list_checkpoints(tmp_path)]
    assert names == ["checkpoint-00000005.npz", "checkpoint-00000004.npz", "checkpoint-00000003.npz"]
    assert checkpoint.load_latest(tmp_path).samples == 4
    assert checkpoint.load_latest(tmp_path / "nothing-here") is None


def test_truncated_file_is_refused_naming_it(tmp_path):
    path = checkpoint.save(tmp_path, {"params": np.random.default_rng(0).normal(size=50_000)}, model="m", samples=1)
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        torn = tmp_path / f"torn-{cut}.npz"
        torn.write_bytes(data[:cut])
        with pytest.raises(CorruptCheckpoint, match=rf"checkpoint {torn} is truncated or corrupt .*use an older one"):
            checkpoint.load(torn)


def test_altered_contents_fail_the_checksum(tmp_path):
    path = checkpoint.save(tmp_path, {"params": _params()}, model="m", samples=1)
    with np.load(path, allow_pickle=False) as f:
        members = {k: f[k] for k in f.files}
    members["params"] = members["params"] + 1e-9  # a valid zip whose array no longer matches
    forged = tmp_path / "checkpoint-00000002.npz"
    np.savez(forged, **members)
    with pytest.raises(CorruptCheckpoint, match="fails its sha256 checksum"):
        checkpoint.load(forged)
    # A flipped byte inside the stored array is caught as well (zip CRC or checksum).
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("params.npy")
    raw[info.header_offset + 30 + len(info.filename) + 200] ^= 0xFF
    flipped = tmp_path / "flipped.npz"
    flipped.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint):
        checkpoint.load(flipped)


def test_mismatched_model_shape_or_dtype_is_refused(tmp_path):
    path = checkpoint.save(tmp_path, {"params": _params(40).astype(np.float32)}, model="KMeansModel", samples=1)
    with pytest.raises(MismatchedCheckpoint, match=r"model 'KMeansModel', not 'LogisticModel'"):
        checkpoint.load(path, model="LogisticModel")
    with pytest.raises(MismatchedCheckpoint, match=r"40 parameters, not 48; use another checkpoint directory"):
        checkpoint.load(path, n_params=48)
    with pytest.raises(MismatchedCheckpoint, match=r"dtype float32, not float64"):
        checkpoint.load(path, dtype="float64")
    # load_latest skips corrupt files but never a sound one of another model.
    with pytest.raises(MismatchedCheckpoint):
        checkpoint.load_latest(tmp_path, model="LogisticModel")


def test_foreign_and_missing_files_are_refused(tmp_path):
    plain = tmp_path / "plain.npz"
    np.savez(plain, params=_params())
    with pytest.raises(CorruptCheckpoint, match="is not a dask-asgd checkpoint"):
        checkpoint.load(plain)
    text = tmp_path / "notes.npz"
    text.write_text("not a zip file")
    with pytest.raises(CorruptCheckpoint, match="truncated or corrupt"):
        checkpoint.load(text)
    with pytest.raises(MissingFileError, match="does not exist"):
        checkpoint.load(tmp_path / "checkpoint-00000009.npz")
    with pytest.raises(ValueError, match="'params'"):
        checkpoint.save(tmp_path, {"weights": _params()}, model="m", samples=0)
    with pytest.raises(ValueError, match="keep=0 is not valid"):
        checkpoint.save(tmp_path, {"params": _params()}, model="m", samples=0, keep=0)


def test_newer_corrupt_file_falls_back_to_the_older_good_one(tmp_path, caplog):
    checkpoint.save(tmp_path, {"params": _params(value=1.0)}, model="m", samples=1)
    newest = checkpoint.save(tmp_path, {"params": _params(value=2.0)}, model="m", samples=2)
    newest.write_bytes(newest.read_bytes()[:300])
    ck = checkpoint.load_latest(tmp_path, model="m")
    assert ck.samples == 1 and ck.params[0] == 1.0
    assert "skipping" in caplog.text and newest.name in caplog.text


WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from dask_asgd import checkpoint
    directory, n = sys.argv[1], int(sys.argv[2])
    i = 0
    while True:
        i += 1
        # Every value equals the write's number: a file that loads must be all one value.
        checkpoint.save(directory, {"params": np.full(n, float(i))}, model="m", samples=i, keep=4)
        print(i, flush=True)
""")


@pytest.mark.parametrize("delay", [0.35, 0.8, 1.3])
def test_kill_mid_write_leaves_only_loadable_checkpoints(tmp_path, delay):
    n = 2_000_000  # 16 MB a file: a kill lands mid-write most of the time
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path), str(n)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "1"  # one complete checkpoint before the kill
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    files = checkpoint.list_checkpoints(tmp_path)
    assert files
    for path in files:
        ck = checkpoint.load(path, model="m", n_params=n)
        assert np.all(ck.params == ck.samples)
    leftovers = [p for p in tmp_path.iterdir() if p not in files]
    assert all(p.name.startswith(".checkpoint-") and p.name.endswith(".tmp") for p in leftovers)
    latest = checkpoint.load_latest(tmp_path, model="m")
    assert latest.path == files[0] and latest.sequence == max(ck.sequence for ck in map(checkpoint.load, files))
    # Writing goes on after the crash, numbering past the newest file.
    assert checkpoint.save(tmp_path, {"params": np.zeros(n)}, model="m", samples=0).name == \
        f"checkpoint-{latest.sequence + 1:08d}.npz"
