"""Benchmarks run by `make bench`: speed and memory goals, measured as medians and ratios."""
