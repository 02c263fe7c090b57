"""What can go wrong in a pipeline that the user can fix, one class per kind of cause;
the command line turns each into one line and its own exit code."""

from __future__ import annotations


class PipelineError(Exception):
    """A problem with a pipeline's settings, files, cluster or data; the message says what to do."""


class ConfigError(PipelineError, ValueError):
    """The pipeline file or a stage's settings are invalid: TOML syntax, unknown key, bad value."""


class MissingFileError(PipelineError, FileNotFoundError):
    """A file or directory the pipeline needs does not exist or cannot be read or written."""


class SchedulerUnreachable(PipelineError, ConnectionError):
    """The Dask scheduler cannot be reached, or too few workers joined it in time."""


class DataError(PipelineError, ValueError):
    """The data does not match the pipeline: an unknown variable or dim, a wrong shape."""


class TrainingFailed(PipelineError, RuntimeError):
    """Training stopped with an error (e.g. it diverged, or the data holds NaN)."""
