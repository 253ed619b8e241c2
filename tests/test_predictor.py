"""``predict.py`` in-process: the Cog interface, validation, failure semantics, inputs, logs.

One ``Predictor`` is set up per module (random seed-0 weights, at most one face per
image, so that a photo costs one CodeFormer pass). Tests that only need an image to go
through the plumbing use a flat grey canvas, on which the random detector finds no face.
The HTTP side of the same cases is in ``test_http_server.py``.
"""

from __future__ import annotations

import asyncio
import inspect
import io
import logging
import os
import pathlib
import tempfile
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
from cog import Path as CogPath
from helpers import (
    face_photo,
    flat_canvas,
    jpeg_bytes,
    png_bytes,
    project_folder,
    recording_connections,
    set_up_predictor,
)
from PIL import Image
from weights_server import FileServer

from codeformer.config import RequestOptions
from codeformer.errors import CodeFormerError, ConfigError, ImageFailedError, InputError
from codeformer.runtime import cpu_has_bf16_kernels
from codeformer.serving.client import data_uri
from codeformer.serving.records import SETUP_MARKER, read_records
from predict import PROJECT_ROOT, Predictor

pytestmark = pytest.mark.nets

# the interface table of the product README: names and defaults, exactly
DEFAULTS = {
    "codeformer_fidelity": 0.5,
    "runtime_profile": "baseline",
    "stability_mode": "safe",
    "compile_backend": "none",
}
CHEAP = {"runtime_profile": "max_speed"}  # no ParseNet pass where the profile does not matter


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def decoded_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.size


def run(predictor: Predictor, images: list, **options: object) -> list[Path]:
    """Call run() as Cog would: every input given (in-process, the defaults are Input() objects)."""
    return asyncio.run(predictor.run(images=images, **{**DEFAULTS, **options}))


class SetupRecord(NamedTuple):
    predictor: Predictor
    messages: list[str]  # what setup() logged
    connections: list[object]  # addresses setup() connected a socket to


@pytest.fixture(scope="module")
def predictor_and_setup_log(weights_dir: Path) -> Iterator[SetupRecord]:
    handler = _ListHandler()
    logging.getLogger("codeformer").addHandler(handler)
    with recording_connections() as connections:
        predictor = set_up_predictor(weights_dir)
    logging.getLogger("codeformer").removeHandler(handler)
    yield SetupRecord(predictor, handler.messages, connections)


@pytest.fixture(scope="module")
def predictor(predictor_and_setup_log: SetupRecord) -> Predictor:
    return predictor_and_setup_log.predictor


@pytest.fixture
def project_tmp() -> Iterator[Path]:
    """A temporary folder inside the project, where local-path inputs are allowed."""
    with project_folder() as folder:
        yield folder


# -- interface -----------------------------------------------------------------------------
def test_inputs_have_the_documented_names_and_defaults() -> None:
    parameters = inspect.signature(Predictor.run).parameters
    assert list(parameters) == ["self", "images", *DEFAULTS]
    readme = (PROJECT_ROOT / "README.md").read_text()
    for name, default in DEFAULTS.items():
        assert parameters[name].default.default == default, name
        assert f"| `{name}` | `{default}` |" in readme, name
    # one default per option: the library's (and the CLI's) are the same
    assert RequestOptions.parse(*DEFAULTS.values()) == RequestOptions()
    assert parameters["images"].default.default is None  # required
    assert parameters["codeformer_fidelity"].default.ge == 0.0
    assert parameters["codeformer_fidelity"].default.le == 1.0
    assert parameters["runtime_profile"].default.choices == ["baseline", "fast", "max_speed"]
    assert parameters["stability_mode"].default.choices == ["safe", "optimized"]
    assert parameters["compile_backend"].default.choices == [
        "none",
        "eager",
        "aot_eager",
        "inductor",
        "cudagraphs",
        "inductor-cudagraphs",
    ]


def test_setup_with_the_weight_files_present_connects_nowhere(predictor_and_setup_log: SetupRecord) -> None:
    # loading, the runtime's set-up and the warm-up: not one socket (the weights are in weights_dir)
    assert predictor_and_setup_log.connections == []


def test_setup_records_device_dtype_and_timings(predictor_and_setup_log: SetupRecord) -> None:
    predictor, messages, _ = predictor_and_setup_log
    assert sum(message.startswith("setup:") for message in messages) == 1  # the operator's one line
    # the suite sets CODEFORMER_MIXED_PRECISION=on where the CPU has bf16 kernels, auto
    # (float32 without measuring) where it has none (conftest)
    fast_dtype = "bfloat16" if cpu_has_bf16_kernels() else "float32"
    # the record the benchmarks read: the same figures as the line, for programs
    [record] = read_records("\n".join(messages), SETUP_MARKER)
    assert record["precision"] == {"baseline": "float32", "fast/max_speed": fast_dtype}
    assert record["fetch_timeout_s"] == 60
    assert (record["cog"], record["coglet"]) == (version("cog"), version("coglet"))  # what the worker runs
    # build, verify, load (read + strict load_state_dict), warm-up: each timed on its own
    assert all(record[f"{part}_ms"] >= 0 for part in ("build", "verify", "load")), record
    assert record["warmup_ms"] > 0
    assert record["device"] == str(predictor.restorer.device)


# -- success -------------------------------------------------------------------------------
def test_outputs_are_jpgs_in_input_order_at_input_size(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes = [(200, 260), (256, 192)]
    names = ["tall.jpg", "wide.png"]
    images = [
        data_uri(jpeg_bytes(face_photo(*sizes[0])), name=names[0]),
        data_uri(png_bytes(face_photo(*sizes[1])), name=names[1]),
    ]
    # in-process there is no prediction scope: the test stands in for Cog's metric recorder
    metrics: dict[str, Any] = {}
    monkeypatch.setattr(predictor, "record_metric", metrics.__setitem__)
    outputs = run(predictor, images, **CHEAP)
    assert [decoded_size(path.read_bytes()) for path in outputs] == sizes
    # a face was restored: the output is not a plain re-encode of the input
    with Image.open(outputs[1]) as first_output:
        restored = np.asarray(first_output.convert("RGB")).astype(np.int16)
    assert np.abs(restored - face_photo(*sizes[1]).astype(np.int16)).mean() > 2.0
    assert all(path.suffix == ".jpg" for path in outputs)
    for index, ((width, height), name, record) in enumerate(
        zip(sizes, names, metrics["images"], strict=True)
    ):
        assert (record["label"], record["width"], record["height"]) == (
            f"images[{index}] ({name})",
            width,
            height,
        )
        assert record["faces_restored"] <= record["faces_found"]
        assert {"detect", "encode"} <= record["stages_ms"].keys()


def test_the_same_request_twice_gives_identical_bytes(predictor: Predictor) -> None:
    image = data_uri(jpeg_bytes(face_photo(180, 180)), name="face.jpg")
    first = [path.read_bytes() for path in run(predictor, [image], **CHEAP)]
    second = [path.read_bytes() for path in run(predictor, [image], **CHEAP)]
    assert first == second


# -- inputs: URLs, data URIs, local paths --------------------------------------------------
def test_http_url_and_local_path_inside_the_project_are_read(
    predictor: Predictor, project_tmp: Path, tmp_path: Path
) -> None:
    (project_tmp / "canvas.png").write_bytes(png_bytes(flat_canvas(96, 64)))
    (tmp_path / "served.jpg").write_bytes(jpeg_bytes(flat_canvas(80, 48)))
    relative = str((project_tmp / "canvas.png").relative_to(PROJECT_ROOT))
    with FileServer(tmp_path) as server:
        outputs = run(
            predictor, [server.url_for("served.jpg"), relative, project_tmp / "canvas.png"], **CHEAP
        )
    assert [decoded_size(path.read_bytes()) for path in outputs] == [(80, 48), (96, 64), (96, 64)]


@pytest.mark.parametrize("where", ["absolute", "dotdot", "symlink"])
def test_local_paths_outside_the_project_are_refused(
    predictor: Predictor, project_tmp: Path, tmp_path: Path, where: str
) -> None:
    outside = tmp_path / "secret.png"
    outside.write_bytes(png_bytes(flat_canvas()))
    if where == "absolute":
        item: str = str(outside)
    elif where == "dotdot":
        item = os.path.relpath(outside, PROJECT_ROOT)  # "../../tmp/.../secret.png"
        assert item.startswith("..")
    else:
        (project_tmp / "link.png").symlink_to(outside)
        item = str(project_tmp / "link.png")
    with pytest.raises(InputError) as error:
        run(predictor, [item])
    assert str(error.value).startswith("images[0] (")
    assert "inside the project folder" in str(error.value)


def test_cog_passes_url_and_data_uri_strings_through_unfetched() -> None:
    # predict.py's import made cog.types.Path.validate (what coglet's worker calls on each
    # Path input) keep remote strings, so that codeformer.serving.fetch fetches them under its limits
    url, uri = "http://127.0.0.1:9/a.jpg", "data:image/png;base64,AAA"
    assert CogPath.validate(url) == url and isinstance(CogPath.validate(url), str)
    assert CogPath.validate(uri) == uri
    assert isinstance(CogPath.validate("data/1.jpg"), pathlib.Path)


def test_cog_style_downloads_in_the_temp_folder_are_local_paths_outside_the_project(
    predictor: Predictor,
) -> None:
    # coglet no longer downloads anything: a temp-folder path is just a path outside the project
    with tempfile.NamedTemporaryFile(suffix="corrupt.jpg") as download:
        download.write(b"not an image")
        download.flush()
        for item in (CogPath(download.name), download.name):
            with pytest.raises(InputError, match="inside the project folder") as error:
                run(predictor, [item])
            assert tempfile.gettempdir() not in str(error.value)


def test_missing_local_file_is_named(predictor: Predictor) -> None:
    with pytest.raises(InputError, match=r"^images\[0\] \(nope\.jpg\): no such file"):
        run(predictor, ["data/nope.jpg"])


def test_unreachable_url_fails_naming_the_input(predictor: Predictor, tmp_path: Path) -> None:
    good = data_uri(png_bytes(flat_canvas()), name="good.png")
    with FileServer(tmp_path) as server, pytest.raises(InputError) as error:
        missing = server.url_for("missing.jpg")
        run(predictor, [good, missing])
    assert str(error.value).startswith("images[1] (missing.jpg): the server answered 404")
    assert missing not in str(error.value)


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("count", [0, 5])
def test_image_count_outside_1_to_4_is_refused(predictor: Predictor, count: int) -> None:
    images = [data_uri(png_bytes(flat_canvas()), name="x.png")] * count
    with pytest.raises(InputError, match=rf"images: send 1 to 4 images, got {count}"):
        run(predictor, images)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"codeformer_fidelity": 1.5}, "codeformer_fidelity"),
        ({"codeformer_fidelity": -0.01}, "codeformer_fidelity"),
        ({"runtime_profile": "turbo"}, "runtime_profile"),
        ({"stability_mode": "reckless"}, "stability_mode"),
        ({"compile_backend": "tensorrt"}, "compile_backend"),
    ],
)
def test_bad_options_are_refused_before_any_input_is_read(
    predictor: Predictor, options: dict, named: str
) -> None:
    # the image would fail too (no such file): the option error must come first
    with pytest.raises(InputError, match=named):
        run(predictor, ["data/does-not-exist.jpg"], **options)


def test_a_corrupt_image_among_good_ones_fails_before_any_restore(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    restore_calls: list[int] = []
    real_restore = predictor.restorer.restore

    def counting_restore(*args: object, **kwargs: object) -> object:
        restore_calls.append(1)
        return real_restore(*args, **kwargs)

    monkeypatch.setattr(predictor.restorer, "restore", counting_restore)
    good = data_uri(png_bytes(flat_canvas()), name="good.png")
    whole = jpeg_bytes(face_photo(128, 128))
    truncated = whole[: len(whole) * 2 // 3]  # header intact, pixels cut
    for bad, reason in [(b"this is not an image", "not a readable image"), (truncated, "cannot decode")]:
        with pytest.raises(InputError) as error:
            run(predictor, [good, data_uri(bad, name="corrupt.jpg"), good])
        assert str(error.value).startswith("images[1] (corrupt.jpg): ")
        assert reason in str(error.value)
    assert restore_calls == []


def test_a_processing_failure_names_the_image(predictor: Predictor, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_restore(*args: object, **kwargs: object) -> object:
        raise ImageFailedError(1, "the detector found a NaN")

    monkeypatch.setattr(predictor.restorer, "restore", failing_restore)
    images = [data_uri(png_bytes(flat_canvas()), name=name) for name in ("a.png", "b.png")]
    with pytest.raises(CodeFormerError, match=r"^images\[1\] \(b\.png\): the detector found a NaN$"):
        run(predictor, images)


def test_a_failed_request_leaves_the_predictor_healthy(predictor: Predictor) -> None:
    image = data_uri(png_bytes(flat_canvas(64, 64)), name="ok.png")
    [first] = run(predictor, [image])
    assert first.exists()
    with pytest.raises(InputError):
        run(predictor, [data_uri(b"garbage", name="bad.jpg")])
    [output] = run(predictor, [image])
    assert decoded_size(output.read_bytes()) == (64, 64)


def test_output_folders_outlive_their_request_by_the_retention_then_go(
    predictor: Predictor, monkeypatch: pytest.MonkeyPatch
) -> None:
    image = data_uri(png_bytes(flat_canvas(64, 64)), name="ok.png")
    [first] = run(predictor, [image])
    [second] = run(predictor, [image])
    # with concurrent slots, Cog may still be reading another request's files: they stay a while
    assert first.exists() and second.exists()
    monkeypatch.setattr(predictor.output_folders, "retention_s", 0.0)
    [third] = run(predictor, [image])  # the next request removes the expired folders
    assert not first.parent.exists() and not second.parent.exists()
    assert third.exists()


# -- compile_backend lock --------------------------------------------------------------------
def test_compile_backend_is_locked_by_the_first_optimized_request(predictor: Predictor) -> None:
    if predictor.restorer.compile_backend not in (None, "none"):
        pytest.fail(
            f"another test initialised the optimized runtime with {predictor.restorer.compile_backend}"
        )
    image = data_uri(png_bytes(flat_canvas(64, 64)), name="ok.png")
    [output] = run(predictor, [image], stability_mode="optimized", compile_backend="none", **CHEAP)
    assert decoded_size(output.read_bytes()) == (64, 64)
    assert predictor.restorer.compile_backend == "none"

    with pytest.raises(ConfigError, match="fixed to 'none'"):
        run(predictor, [image], stability_mode="optimized", compile_backend="eager")
    # safe requests ignore compile_backend, whatever it says
    run(predictor, [image], stability_mode="safe", compile_backend="inductor", **CHEAP)
    run(predictor, [image], stability_mode="optimized", compile_backend="none", **CHEAP)


def test_the_same_image_four_times_gives_four_identical_restored_outputs(predictor: Predictor) -> None:
    photo = data_uri(jpeg_bytes(face_photo(160, 160)), name="face.jpg")
    outputs = [path.read_bytes() for path in run(predictor, [photo] * 4, **CHEAP)]
    assert len(outputs) == 4 and all(output == outputs[0] for output in outputs)
    # a face was restored (a re-encode of the input would not prove batch independence)
    with Image.open(io.BytesIO(outputs[0])) as image:
        restored = np.asarray(image.convert("RGB")).astype(np.int16)
    assert np.abs(restored - face_photo(160, 160)).mean() > 2.0


def test_a_64x64_face_photo_keeps_its_size(predictor: Predictor) -> None:
    # tiny faces go through the enlargement to the working size and back (docs/reference.md §4.1)
    [output] = run(predictor, [data_uri(png_bytes(face_photo(64, 64)), name="small.png")], **CHEAP)
    assert decoded_size(output.read_bytes()) == (64, 64)
