"""Tooling beside the product: random weights in the official formats, for tests and benchmarks."""
