"""Tooling beside the product, shared by the tests and the benchmarks; the server never imports it.

``random_weights``: random weights in the official file formats; ``local_server``: the local
Cog server as a child process group and the coglet worker's memory; ``inputs``: generated
request inputs (good, bad, pixel-bomb headers, gray and CMYK ICC profiles).
"""
