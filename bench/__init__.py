"""Benchmark: expert federations, held-out new tasks, baselines, report."""
