"""The C allocator's thresholds while a worker trains.

Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that glibc
hands freed memory back to the system soon. Setting it also fixes glibc's mmap
threshold at 128 KiB (it otherwise grows to fit the blocks a program frees). A
training step allocates and frees the same few arrays thousands of times a
second: every array of 128 KiB or more is then mapped and unmapped each step,
and the heap shrinks and grows around the smaller ones, page faults and all.
Measured in a worker's thread (K-Means, 64 centres x 32 features, batch 256,
whose distance matrix is 128 KiB): 0.44 million samples/s and 520,000 page
faults a second with the nanny's setting; 1.04 million with a 4 MiB mmap
threshold; 1.20 million, and 32,000 faults a second, with a 64 MiB trim
threshold too; a bare process does 1.26 million. While a worker trains, both
are raised; afterwards they go back to the worker's own and the heap is
trimmed once.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import threading

M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's malloc.h
M_MMAP_THRESHOLD = -3
TRAINING_TRIM_THRESHOLD = 64 * 2**20
TRAINING_MMAP_THRESHOLD = 16 * 2**20  # glibc's largest is 32 MiB on 64-bit
GLIBC_MMAP_THRESHOLD = 128 * 2**10  # its default, fixed once a threshold is set


def _glibc():
    """glibc's ``mallopt`` and ``malloc_trim``, or ``None`` elsewhere (macOS, Windows, musl's are no-ops)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "malloc_trim"):
        return None
    return libc


_LIBC = _glibc()
_lock = threading.Lock()
_training = 0  # training segments running in this process now


def _configured() -> tuple[int, int] | None:
    """The (trim, mmap) thresholds the process was started with, if a trim
    threshold below ours was set (as Dask's nanny does); ``None`` otherwise: glibc's
    own thresholds then adapt to what the loop frees."""
    trim = os.environ.get("MALLOC_TRIM_THRESHOLD_", "")
    if not trim.isdigit() or int(trim) >= TRAINING_TRIM_THRESHOLD:
        return None
    mmap = os.environ.get("MALLOC_MMAP_THRESHOLD_", "")
    return int(trim), int(mmap) if mmap.isdigit() else GLIBC_MMAP_THRESHOLD


@contextlib.contextmanager
def thresholds_raised():
    """Raise the thresholds while the block runs (nested and concurrent blocks
    share one raise); a no-op without glibc or without a low trim threshold."""
    global _training
    configured = _configured()
    if _LIBC is None or configured is None:
        yield
        return
    with _lock:
        _training += 1
        if _training == 1:
            _LIBC.mallopt(M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
            _LIBC.mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)
    try:
        yield
    finally:
        with _lock:
            _training -= 1
            if _training == 0:
                trim, mmap = configured
                _LIBC.mallopt(M_MMAP_THRESHOLD, mmap)
                _LIBC.mallopt(M_TRIM_THRESHOLD, trim)
                _LIBC.malloc_trim(0)
