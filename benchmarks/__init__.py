"""Benchmarks: measurements of crosskd, run from the repository root as `python -m benchmarks.NAME`
(results in benchmarks/results/). Shared helpers live in `benchmarks.common`."""
