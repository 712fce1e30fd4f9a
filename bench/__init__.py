"""echolabel's benchmark suite: `echolabel bench` (docs/performance.md).

Benchmarks are scripts that print numbers measured in one run, side by side, with ratios
against baselines measured in the same run; tests only check that they run and parse.
"""
