"""The benchmark scripts' shared code (harness.py aside, which only the scripts import) and their
tests (benchmarks/tests). Nothing here ships in the image or is imported by the product."""
