"""Unit checks of the benchmarks' own logic (data, splits, statistics, goal
verdicts, files written). They live beside `bench/` so that `tests/` never
imports the benchmarks; pytest collects them through `testpaths`."""
