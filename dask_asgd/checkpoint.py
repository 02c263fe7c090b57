"""Checkpoint files: a model's state as ``.npz`` (never pickle) with a format version,
metadata and a sha256 checksum, written atomically, found and loaded with validation.

A checkpoint directory holds ``checkpoint-00000001.npz``, ``checkpoint-00000002.npz``,
...; the highest number is the newest. One writer per directory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import config
from .errors import DataError, MissingFileError

FORMAT = "dask-asgd-checkpoint"
VERSION = 1
_NAME = re.compile(r"checkpoint-(\d{8,})\.npz")
_META, _SHA = "__meta__", "__sha256__"

logger = logging.getLogger(__name__)


class CheckpointError(DataError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


class CorruptCheckpoint(CheckpointError):
    """The file is truncated, damaged, or not a checkpoint of a format this version reads."""


class MismatchedCheckpoint(CheckpointError):
    """A sound checkpoint of another model, size or dtype than the one asked for."""


@dataclass(frozen=True)
class Checkpoint:
    """One loaded checkpoint: ``arrays["params"]`` is the flat parameter vector;
    other arrays (e.g. per-worker state) ride along under their own names."""

    path: Path
    arrays: dict[str, np.ndarray]
    model: str
    n_params: int
    dtype: str
    samples: int
    sequence: int
    created: float
    settings: dict = field(default_factory=dict)

    @property
    def params(self) -> np.ndarray:
        return self.arrays["params"]


def save(directory, arrays: Mapping[str, np.ndarray], *, model: str, samples: int,
         settings: Mapping | None = None, keep: int | None = None) -> Path:
    """Write a new checkpoint into ``directory`` and return its path.

    The file is written to a temporary name in the same directory, flushed to
    disk, then renamed into place, so a crash at any point leaves either the
    complete file or none under a checkpoint name. Only the newest ``keep``
    checkpoints (default ``asgd.checkpoint.keep``) are kept.

    Example::

        path = save("ckpt", {"params": params}, model="KMeansModel", samples=120_000,
                    settings={"n_clusters": 10})
        load(path, model="KMeansModel", n_params=params.size).params
    """
    keep = int(config.get("checkpoint.keep") if keep is None else keep)
    if keep < 1:
        raise ValueError(f"keep={keep} is not valid; keep at least the newest checkpoint (keep >= 1)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(a) for name, a in arrays.items()}
    params = arrays.get("params")
    if params is None or params.ndim != 1:
        raise ValueError("arrays must hold 'params', the flat (1-D) parameter vector")
    for name, a in arrays.items():
        if a.dtype.hasobject or name in (_META, _SHA):
            raise ValueError(f"array {name!r} cannot go into a checkpoint; use numeric arrays under other names")
    existing = list_checkpoints(directory)
    sequence = _sequence(existing[0]) + 1 if existing else 1
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model": model,
        "n_params": int(params.size),
        "dtype": params.dtype.str,
        "samples": int(samples),
        "sequence": sequence,
        "created": time.time(),
        "settings": dict(settings or {}),
        "arrays": {name: {"dtype": a.dtype.str, "shape": list(a.shape)} for name, a in arrays.items()},
    }
    meta_json = json.dumps(meta, sort_keys=True)
    final = directory / f"checkpoint-{sequence:08d}.npz"
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **{_META: np.asarray(meta_json), _SHA: np.asarray(_checksum(meta_json, arrays))})
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    for old in list_checkpoints(directory)[keep:]:
        old.unlink(missing_ok=True)
    return final


def list_checkpoints(directory) -> list[Path]:
    """The checkpoint files in ``directory``, newest first (temporary files are never listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if _NAME.fullmatch(p.name)]
    return sorted(found, key=_sequence, reverse=True)


def load(path, *, model: str | None = None, n_params: int | None = None, dtype=None) -> Checkpoint:
    """Read and validate one checkpoint; ``model``, ``n_params`` and ``dtype``, where
    given, must match what the file holds.

    Raises ``CorruptCheckpoint`` for a truncated or damaged file (the checksum of
    the arrays and metadata is recomputed) and ``MismatchedCheckpoint`` for a sound
    file of another model or shape.
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"checkpoint {path} does not exist; pass a file from list_checkpoints(directory)")
    try:
        with np.load(path, allow_pickle=False) as f:
            stored = {name: f[name] for name in f.files}  # reading every member checks its zip CRC
    except ValueError as e:
        # numpy refused to unpickle: an object array (in a .npz or .npy), or a file
        # that is a pickle (protocol 2+ starts with 0x80); numpy takes any other
        # unknown file for a pickle too, and that is mere corruption.
        if "Object arrays" in str(e) or ("allow_pickle" in str(e) and _starts_with(path, b"\x80")):
            raise CorruptCheckpoint(
                f"checkpoint {path} holds pickled Python objects, which no checkpoint does and which could run "
                "code when loaded; it was not loaded. Delete it, and find out who wrote it"
            ) from e
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or corrupt (ValueError: {e}); delete it and use an older one") from e
    except (OSError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
        raise CorruptCheckpoint(f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {e}); delete it and use an older one") from e
    if _META not in stored or _SHA not in stored:
        raise CorruptCheckpoint(f"{path} is not a dask-asgd checkpoint (no metadata or checksum); point at a checkpoint directory")
    meta_json, digest = str(stored.pop(_META)), str(stored.pop(_SHA))
    try:
        meta = json.loads(meta_json)
    except json.JSONDecodeError as e:
        raise CorruptCheckpoint(f"checkpoint {path} has unreadable metadata ({e}); delete it and use an older one") from e
    if meta.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{path} is not a dask-asgd checkpoint (format {meta.get('format')!r}); point at a checkpoint directory")
    if meta.get("version") != VERSION:
        raise CorruptCheckpoint(
            f"checkpoint {path} has format version {meta.get('version')}, this dask-asgd reads version {VERSION}; "
            "resume with the dask-asgd version that wrote it, or start afresh"
        )
    if _checksum(meta_json, stored) != digest:
        raise CorruptCheckpoint(f"checkpoint {path} fails its sha256 checksum: its contents changed after writing; delete it and use an older one")
    described = {name: (np.dtype(d["dtype"]).str, tuple(d["shape"])) for name, d in meta["arrays"].items()}
    if described != {name: (a.dtype.str, a.shape) for name, a in stored.items()} or stored["params"].size != meta["n_params"]:
        raise CorruptCheckpoint(f"checkpoint {path} holds arrays that differ from its metadata; delete it and use an older one")
    problems = []
    if model is not None and meta["model"] != model:
        problems.append(f"model {meta['model']!r}, not {model!r}")
    if n_params is not None and meta["n_params"] != int(n_params):
        problems.append(f"{meta['n_params']} parameters, not {int(n_params)}")
    if dtype is not None and np.dtype(meta["dtype"]) != np.dtype(dtype):
        problems.append(f"dtype {np.dtype(meta['dtype'])}, not {np.dtype(dtype)}")
    if problems:
        raise MismatchedCheckpoint(
            f"checkpoint {path} does not fit this run: it holds {', '.join(problems)}; "
            "use another checkpoint directory for this model, or delete the old checkpoints"
        )
    return Checkpoint(
        path=path, arrays=stored, model=meta["model"], n_params=meta["n_params"], dtype=meta["dtype"],
        samples=meta["samples"], sequence=meta["sequence"], created=meta["created"], settings=meta["settings"],
    )


def load_latest(directory, *, model: str | None = None, n_params: int | None = None, dtype=None) -> Checkpoint | None:
    """The newest checkpoint in ``directory`` that loads, or None if there is none.

    A corrupt file is skipped with a warning (an older one is still good); a
    sound one of another model or shape is an error, since the directory then
    belongs to another run.
    """
    for path in list_checkpoints(directory):
        try:
            return load(path, model=model, n_params=n_params, dtype=dtype)
        except CorruptCheckpoint as e:
            logger.warning("skipping %s", e)
    return None


def _checksum(meta_json: str, arrays: Mapping[str, np.ndarray]) -> str:
    h = hashlib.sha256(meta_json.encode())
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"\0{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8))  # the bytes as they are, without a copy
    return h.hexdigest()


def _sequence(path: Path) -> int:
    return int(_NAME.fullmatch(path.name).group(1))


def _fsync_dir(directory: Path) -> None:
    # The rename is durable only once the directory entry itself is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _starts_with(path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic
