"""One request's own rules: a local file's size cap, and the figures it returns as metrics.

Where inputs come from and how each bad one fails (names, schemes, paths outside the
project) is the matrix of ``test_bad_inputs.py``; a request run end to end is in
``test_cli.py`` and ``test_predictor.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from codeformer.config import RequestOptions
from codeformer.errors import InputError
from codeformer.serving import request
from codeformer.serving.fetch import Deadline, Dialer
from codeformer.serving.request import read_input, request_metrics


def test_a_local_file_over_the_size_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(request, "MAX_INPUT_BYTES", 1 << 20)
    (tmp_path / "small.png").write_bytes(bytes(1 << 20))
    (tmp_path / "big.png").write_bytes(bytes((1 << 20) + 1))
    deadline, dialer = Deadline.after(60), Dialer()
    assert len(read_input("small.png", deadline, dialer, tmp_path)) == 1 << 20
    with pytest.raises(InputError, match=r"^the file is over 1 MB; send a smaller"):
        read_input("big.png", deadline, dialer, tmp_path)


IMAGE = {
    "label": "images[0] (a.jpg)",
    "width": 64,
    "height": 48,
    "faces_found": 2,
    "faces_restored": 1,
    "stages_ms": {"read_decode": 3.04, "detect": 5.06, "encode": 1.0},
}


@pytest.mark.parametrize(
    ("stability", "compile_backend", "ran"), [("optimized", "eager", "eager"), ("safe", "inductor", "none")]
)
def test_request_metrics_name_the_options_that_ran(stability: str, compile_backend: str, ran: str) -> None:
    options = RequestOptions.parse(0.7, "fast", stability, compile_backend)
    metrics = request_metrics([IMAGE], options, 2.04, 390.0)
    assert metrics["options"] == {
        "codeformer_fidelity": 0.7,
        "runtime_profile": "fast",
        "stability_mode": stability,
        "compile_backend": ran,  # the safe mode compiles nothing, whatever was asked
    }
    assert metrics["admission_wait_ms"] == 2.0 and metrics["wall_ms"] == 390.0
    assert metrics["shared_forwards"] == 0


def test_request_metrics_keep_each_image_in_order_with_its_stages_rounded_to_a_tenth() -> None:
    second = {**IMAGE, "label": "images[1] (b.png)", "faces_found": 0, "faces_restored": 0}
    metrics = request_metrics(
        [IMAGE, second], RequestOptions(), 0.0, 10.0, shared_forwards=3, admission_pixels=6144
    )
    assert [image["label"] for image in metrics["images"]] == ["images[0] (a.jpg)", "images[1] (b.png)"]
    assert metrics["images"][0] == {**IMAGE, "stages_ms": {"read_decode": 3.0, "detect": 5.1, "encode": 1.0}}
    assert metrics["shared_forwards"] == 3
    assert metrics["admission_pixels"] == 6144
