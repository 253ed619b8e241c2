"""A test hook the product does not carry: the ``Predictor`` with its device thread held until
``TEST_DEVICE_GATE`` requests are in progress at once.

Tests that need concurrent requests' faces to share a forward, whatever the timing, run the
server on ``tests/gated_predictor.py:GatedPredictor`` (``LocalServer(predictor=GATED_PREDICTOR)``)
with a long ``CODEFORMER_BATCH_WAIT_MS``: the device thread runs nothing until the requests
are all in progress, and from then on a part-filled batch waits for the requests that will
still bring faces (``DeviceScheduler``'s own rule), running their other calls meanwhile.
"""

from __future__ import annotations

import os

from predict import Predictor
from tests.helpers import hold_device_until

GATED_PREDICTOR = "tests/gated_predictor.py:GatedPredictor"


class GatedPredictor(Predictor):
    """``Predictor`` whose device thread waits, after set-up, for ``TEST_DEVICE_GATE`` requests."""

    def setup(self) -> None:
        super().setup()
        hold_device_until(self.restorer.scheduler, int(os.environ.get("TEST_DEVICE_GATE", "1")))
