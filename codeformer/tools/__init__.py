"""Tooling beside the product, shared by the tests and the benchmarks; the server never imports it.

``random_weights``: random weights in the official file formats; ``local_server``: the local
Cog server as a child process group and the coglet worker's memory; ``inputs``: generated
request inputs (good, bad, pixel-bomb headers, gray and CMYK ICC profiles, the soak's plan).

What ``benchmarks/`` measures with, here so that the tests check it without importing that
folder: ``summary`` (statistics), ``reports`` (portable JSON reports), ``load`` (timed HTTP
requests and concurrency levels), ``host_pass`` (a request's host stages without the nets),
``plans`` (which configurations a benchmark runs, and which won) and ``gpu_checks`` (what
gpu_check.py sends and decides).
"""
