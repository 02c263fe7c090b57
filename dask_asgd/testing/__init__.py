"""Helpers for testing and benchmarking dask-asgd under controlled conditions;
``dask_asgd.testing.netem`` emulates a multi-host cluster on one Linux machine."""
