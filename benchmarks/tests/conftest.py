"""Fixtures of the benchmarks' own tests: the suite's settings (tests/conftest.py) and the
seed-0 random weights the benchmark scripts run on."""

from __future__ import annotations

from pathlib import Path

import pytest

from codeformer.tools import random_weights
from codeformer.tools.local_server import apply_suite_environment, mark_quick

apply_suite_environment()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_quick(items)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three weight files for seed 0."""
    return random_weights.written(tmp_path_factory.mktemp("weights-seed0"), seed=0)
