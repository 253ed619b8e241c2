"""predict.py against Cog 0.23's current API: loaded as coglet loads it, failures never read as cancels.

coglet 0.23 treats an async prediction whose exception text contains ``cancelled`` or
``CancelledError`` as cancelled (coglet-python's worker_bridge.rs); ``run()`` must report
every failure as a failure, whatever a user named the input, and a real cancel as a cancel.
"""

from __future__ import annotations

import asyncio
import threading
import warnings
from types import SimpleNamespace

import pytest
import yaml
from helpers import flat_canvas, png_bytes
from PIL import Image

from codeformer.config import Settings
from codeformer.errors import CodeFormerError, ImageFailedError, InputError, reported_as_failure
from codeformer.serving.client import data_uri
from codeformer.serving.lifecycle import InFlight
from codeformer.serving.outputs import OutputFolders
from codeformer.serving.serve import runner_concurrency
from predict import MAX_CONCURRENT_REQUESTS, PROJECT_ROOT, Predictor

COGLET_CANCEL_MARKERS = ("cancelled", "CancelledError")  # what coglet looks for, case-sensitive
# called directly, run() sees Input() objects for options it is not given: pass them all
OPTIONS = {
    "codeformer_fidelity": 0.5,
    "runtime_profile": "max_speed",
    "stability_mode": "safe",
    "compile_backend": "none",
}


def reads_as_cancel(exc: BaseException) -> bool:
    """coglet's test on the text it gets for an exception (``ClassName: message``)."""
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in COGLET_CANCEL_MARKERS)


def test_coglet_loads_the_predictor_without_a_deprecation(monkeypatch: pytest.MonkeyPatch) -> None:
    from cog.predictor import load_predictor_from_ref

    monkeypatch.chdir(PROJECT_ROOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        predictor = load_predictor_from_ref("predict.py:Predictor")
    assert type(predictor).__name__ == "Predictor"
    config = yaml.safe_load((PROJECT_ROOT / "cog.yaml").read_text())
    assert config["run"] == "predict.py:Predictor"
    assert "predict" not in config and "concurrency" not in config  # both deprecated in Cog 0.23


def test_the_local_server_reads_concurrency_where_cog_does() -> None:
    assert Predictor.run.__cog_concurrent_max__ == MAX_CONCURRENT_REQUESTS  # type: ignore[attr-defined]
    assert runner_concurrency() == MAX_CONCURRENT_REQUESTS
    assert asyncio.iscoroutinefunction(Predictor.run)  # coglet needs async for more than one slot


@pytest.mark.parametrize(
    "message",
    [
        "images[0] (cancelled.png): not a readable image",
        "images[2] (CancelledError.jpg): the server answered 404",
        "images[1] (data URI, image/x-cancelled): the data URI's base64 payload is invalid",
        "images[3] (a-cancelled-b-Cancelled-c.png): no such file in the project folder",
    ],
)
def test_a_failure_quoting_a_cancel_word_does_not_read_as_a_cancel(message: str) -> None:
    original = InputError(message)
    reported = reported_as_failure(original)
    assert not reads_as_cancel(reported)
    assert type(reported) is InputError
    assert str(reported).replace("%6C", "l") == message  # the same sentence, one letter encoded


def test_a_failure_without_cancel_words_is_reported_as_it_is() -> None:
    error = InputError("images[0] (holiday.png): not a readable image")
    assert reported_as_failure(error) is error


def test_the_reported_copy_keeps_the_errors_attributes() -> None:
    reported = reported_as_failure(ImageFailedError(1, "cancelled.png is broken"))
    assert isinstance(reported, ImageFailedError) and reported.index == 1 and not reads_as_cancel(reported)


def stand_in_predictor() -> Predictor:
    """A Predictor without nets: enough for requests that fail before any image is decoded."""
    predictor = Predictor()
    predictor.restorer = SimpleNamespace(check_options=lambda options: None, settings=Settings())  # type: ignore[assignment]
    predictor.output_folders = OutputFolders()
    predictor.in_flight = InFlight()
    return predictor


@pytest.mark.parametrize("name", ["cancelled.png", "CancelledError.png"])
def test_run_fails_an_input_named_like_a_cancel_as_a_failure(name: str) -> None:
    predictor = stand_in_predictor()
    image = f"data:image/png;name={name};base64,bm90IGFuIGltYWdl"  # "not an image"
    with pytest.raises(CodeFormerError) as failed:
        asyncio.run(predictor.run(images=[image], **OPTIONS))
    assert not reads_as_cancel(failed.value)
    assert str(failed.value).startswith(
        f"images[0] ({name.replace('ancelled', 'ancel%6Ced')}): not a readable"
    )


def test_a_real_cancel_of_run_stays_a_cancel_and_stops_the_request() -> None:
    predictor = stand_in_predictor()
    entered, seen_cancel = threading.Event(), threading.Event()

    def blocking_request(images, options, cancel, request_start, reached):  # noqa: ANN001, ARG001
        entered.set()
        if cancel.wait(30):
            seen_cancel.set()
        return []

    predictor.serve_request = blocking_request  # type: ignore[method-assign]

    async def cancel_while_running() -> None:
        task = asyncio.ensure_future(predictor.run(images=["data:image/png;base64,AAAA"], **OPTIONS))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        await task

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(cancel_while_running())
    assert seen_cancel.wait(30)  # the request's thread saw its cancel flag


def test_run_in_process_returns_one_jpg_per_input_in_order_with_its_metrics(
    faceless_weights_dir, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request path through ``run()`` in seconds: a Predictor on the faceless weights (the
    nets loaded, no warm-up), two inputs of two sizes, a JPG per input at its size, and the
    figures handed to Cog's recorder."""
    from codeformer.pipeline import Restorer

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the output folders
    predictor = stand_in_predictor()
    predictor.restorer = Restorer.load(faceless_weights_dir, "cpu", Settings.from_env())
    recorded: dict[str, object] = {}
    monkeypatch.setattr(
        predictor, "record_metric", lambda key, value, mode="replace": recorded.update({key: value})
    )
    sizes = [(48, 80), (64, 32)]
    images = [
        data_uri(png_bytes(flat_canvas(width, height)), name=f"{index}.png")
        for index, (height, width) in enumerate(sizes)
    ]
    outputs = asyncio.run(predictor.run(images=images, **OPTIONS))
    assert [Image.open(path).size for path in outputs] == [(width, height) for height, width in sizes]
    assert all(Image.open(path).format == "JPEG" for path in outputs)
    assert [image["label"] for image in recorded["images"]] == ["images[0] (0.png)", "images[1] (1.png)"]
    assert recorded["options"]["runtime_profile"] == "max_speed"
    assert recorded["admission_pixels"] == sum(height * width for height, width in sizes)


def test_a_failed_request_records_its_image_count_and_the_step_it_reached(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """coglet returns what a prediction recorded before it failed (a stand-in predictor: the
    request fails reading its second input, before any net runs)."""
    predictor = stand_in_predictor()
    recorded: dict[str, object] = {}
    monkeypatch.setattr(
        predictor, "record_metric", lambda key, value, mode="replace": recorded.update({key: value})
    )
    good = data_uri(png_bytes(flat_canvas(32, 32)), name="good.png")
    bad = "data:image/png;name=bad.png;base64,bm90IGFuIGltYWdl"  # "not an image"
    with pytest.raises(CodeFormerError, match=r"^images\[1\] \(bad.png\): not a readable"):
        asyncio.run(predictor.run(images=[good, bad, good], **OPTIONS))
    assert recorded == {"image_count": 3, "failed_at": "images[1] (bad.png): read"}


@pytest.mark.parametrize(
    ("count", "options"),
    [(5, OPTIONS), (1, {**OPTIONS, "runtime_profile": "fastest"})],
    ids=["five-images", "unknown-profile"],
)
def test_a_request_refused_before_its_work_records_its_image_count_and_says_so(
    count: int, options: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    predictor = stand_in_predictor()
    recorded: dict[str, object] = {}
    monkeypatch.setattr(
        predictor, "record_metric", lambda key, value, mode="replace": recorded.update({key: value})
    )
    with pytest.raises(CodeFormerError):
        asyncio.run(predictor.run(images=["data:image/png;base64,AAAA"] * count, **options))
    assert recorded == {"image_count": count, "failed_at": "checking the request"}
