"""Benchmark scripts; each also runs on its own: python benchmarks/<name>.py --help."""
