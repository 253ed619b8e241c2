"""Tooling beside the product, shared by the tests and the benchmarks; the server never imports it.

``random_weights``: random weights in the official file formats; ``local_server``: the local
Cog server as a child process group, the coglet worker's memory, the test suites'
environment; ``inputs``: generated request inputs (good, bad, pixel-bomb headers, gray and
CMYK ICC profiles, the soak's plan). What the benchmarks measure with lives in ``benchmarks/``.
"""
