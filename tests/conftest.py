"""Shared fixtures: random weights in the official formats, and the pipeline and predictor on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from codeformer.tools import random_weights
from codeformer.tools.local_server import apply_suite_environment, mark_quick
from tests.helpers import FACELESS_FETCH_TIMEOUT_S, set_up_predictor

apply_suite_environment()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    mark_quick(items)


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the three weight files for seed 0 (the golden outputs' weights)."""
    return random_weights.written(tmp_path_factory.mktemp("weights-seed0"), seed=0)


@pytest.fixture(scope="session")
def faceless_weights_dir(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seed-0 weights with a detector whose face logits never fire: every output is its input.

    For tests of what reaches the pipeline (decoding, fetching): the seed-0 detector finds
    "faces" on most pictures that are not mid-grey, and each costs a CodeFormer pass.
    """
    import torch

    detector = "detection_Resnet50_Final.pth"
    out = tmp_path_factory.mktemp("weights-faceless")
    for file in random_weights.FILES:
        if file != detector:
            (out / file).symlink_to(weights_dir / file)
    torch.save(random_weights.file_object(detector, seed=0, face_bias=-1000.0), out / detector)
    return out


@pytest.fixture(scope="session")
def parse_net():
    """ParseNet on the seed-0 weights, in eval mode (tests/test_parse.py, tests/test_paste.py)."""
    from codeformer.nets.parsenet import ParseNet

    net = ParseNet()
    net.load_state_dict(random_weights.state_dict("parsing_parsenet.pth", 0), strict=True)
    return net.eval()


@pytest.fixture(scope="session")
def restorer_seed0(weights_dir: Path):
    """The pipeline on CPU with the seed-0 random weights, shared by the end-to-end tests."""
    from codeformer.config import Settings
    from codeformer.pipeline import Restorer

    return Restorer.load(weights_dir, "cpu", Settings.from_env(max_faces=20, face_batch=4))


@pytest.fixture(scope="session")
def faceless_predictor(faceless_weights_dir: Path):
    """A ``predict.Predictor`` after ``setup()`` on ``faceless_weights_dir``, shared by the session.

    Every output is its input; a fetch deadline of ``FACELESS_FETCH_TIMEOUT_S``. Set-up (the
    nets' warm-up) is the cost: the modules that only need requests through ``predict.py``
    share this one.
    """
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CODEFORMER_FETCH_TIMEOUT_S", str(FACELESS_FETCH_TIMEOUT_S))
        return set_up_predictor(faceless_weights_dir)


@pytest.fixture(scope="session")
def shared_server(weights_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real Cog server for the session: the seed-0 weights, at most one face per image.

    For every test module that needs no setting of its own: starting a server (coglet, its
    worker, the nets' set-up) is the costliest fixture of the suite. The face cap is the one
    setting it fixes: the seed-0 detector finds 2 or 3 "faces" on the portrait crops the tests
    send, and each costs a CodeFormer pass on the CPU. State a request leaves behind (the
    compile backend, locked by the first optimized request) must be ``none`` or unset.
    """
    from codeformer.tools.local_server import LocalServer

    log_path = tmp_path_factory.mktemp("shared-server") / "cog-server.log"
    env = {"CODEFORMER_WEIGHTS_DIR": str(weights_dir), "CODEFORMER_MAX_FACES": "1"}
    with LocalServer(env, log_path=log_path) as server:
        yield server
