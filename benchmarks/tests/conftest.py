"""The benchmarks' tests run with the product suite's settings, collection hook (named groups,
``quick``) and seed-0 weights: taken from tests/conftest.py by name."""

from tests.conftest import pytest_collection_modifyitems, weights_dir  # noqa: F401  (a hook and a fixture)
