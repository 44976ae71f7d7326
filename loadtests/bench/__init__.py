"""Benchmarks: ours next to the peer in one run, printed as ratio tables."""
