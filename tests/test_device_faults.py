"""``codeformer.device_faults``: which errors break the device, the worker's exit, no silent CPU.

Without a GPU, the sticky CUDA error is a stand-in raised by a device function, and "no usable
CUDA" is this machine as it is (``torch.cuda.is_available()`` is False here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import stand_in_run
from torch import nn

from codeformer.config import RequestOptions, Settings
from codeformer.device_faults import (
    BROKEN_DEVICE_EXIT_STATUS,
    MIN_NVIDIA_DRIVER,
    is_broken_device,
    nvidia_driver_version,
    require_cuda,
)
from codeformer.errors import ConfigError, ImageFailedError
from codeformer.pipeline import Restorer
from codeformer.runtime import Nets
from codeformer.stages.detect import FaceDetector
from codeformer.stages.face_batch import FaceBatchRun
from codeformer.stages.parse import FaceParser
from codeformer.stages.restore import FaceRestorer

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("error", "broken"),
    [
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
        (RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors might be ..."), True),
        (RuntimeError("Triton Error [CUDA]: an illegal memory access was encountered"), True),
        (torch.AcceleratorError("CUDA error: unspecified launch failure"), True),
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (torch.AcceleratorError("CUDA error: invalid argument"), False),
        (RuntimeError("shape '[1, 3]' is invalid for input of size 4"), False),
        (ValueError("an illegal memory access was encountered"), False),  # not from the device
    ],
)
def test_only_sticky_cuda_errors_break_the_device(error: BaseException, broken: bool) -> None:
    assert is_broken_device(error) is broken


_BROKEN_WORKER = """
import logging, time
import torch
from codeformer.errors import DeviceBrokenError
from codeformer.scheduler import DeviceScheduler

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
scheduler = DeviceScheduler(batch_size=1, batch_wait_s=0.0)

def forward():
    raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

try:
    scheduler.call(forward)
except DeviceBrokenError as exc:
    print("request failed:", exc, flush=True)
try:
    scheduler.call(lambda: None)
except DeviceBrokenError as exc:
    print("later request failed:", exc, flush=True)
time.sleep(60)  # a worker serves on until the device thread ends the process
print("still serving", flush=True)
"""


@pytest.mark.process  # a fresh interpreter that imports torch, and the exit grace period
def test_a_broken_device_stops_the_worker_with_the_cause_in_the_log() -> None:
    completed = subprocess.run(
        [sys.executable, "-c", _BROKEN_WORKER],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == BROKEN_DEVICE_EXIT_STATUS, completed.stderr[-2000:]
    # the requests in flight get their answer before the process ends
    assert "request failed: the GPU failed and cannot recover" in completed.stdout
    assert "later request failed:" in completed.stdout and "still serving" not in completed.stdout
    critical = [line for line in completed.stderr.splitlines() if line.startswith("CRITICAL")]
    assert len(critical) == 1
    assert "an illegal memory access" in critical[0] and "Stopping the worker" in critical[0]


# -- no silent CPU -----------------------------------------------------------------------------
@pytest.mark.skipif(torch.cuda.is_available(), reason="shows a machine without usable CUDA")
def test_requiring_a_gpu_without_usable_cuda_fails_saying_why() -> None:
    with pytest.raises(ConfigError) as raised:
        require_cuda(torch.device("cpu"), driver="535.104.05")
    message = str(raised.value)
    assert "CODEFORMER_REQUIRE_GPU=1" in message and "torch.cuda.is_available() is False" in message
    if torch.version.cuda:
        assert f"built with CUDA {torch.version.cuda}" in message
        assert f"driver >= {MIN_NVIDIA_DRIVER}" in message
    assert "NVIDIA driver 535.104.05 is too old" in message
    assert "CODEFORMER_REQUIRE_GPU=0" in message  # the way to serve on the CPU on purpose


def test_the_driver_version_is_read_from_the_kernel_module(tmp_path: Path) -> None:
    version_file = tmp_path / "version"
    version_file.write_text(
        "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  580.65.06  Release Build\n"
        "GCC version:  gcc version 12.3.0\n"
    )
    assert nvidia_driver_version(version_file) == "580.65.06"
    version_file.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 2023\n")
    assert nvidia_driver_version(version_file) == "535.104.05"
    assert nvidia_driver_version(tmp_path / "missing") is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="shows a machine without usable CUDA")
def test_a_restorer_that_requires_a_gpu_fails_before_it_loads_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("CODEFORMER_REQUIRE_GPU", "1")
    monkeypatch.setenv("CODEFORMER_WEIGHTS_DIR", str(tmp_path))  # empty: loading would download
    monkeypatch.setenv("CODEFORMER_WEIGHTS_URL", "http://127.0.0.1:9/")
    with pytest.raises(ConfigError, match="no usable CUDA device"):
        Restorer.load()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("raw", "required"), [(None, False), ("", False), ("0", False), ("1", True)])
def test_require_gpu_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, raw: str | None, required: bool
) -> None:
    if raw is None:
        monkeypatch.delenv("CODEFORMER_REQUIRE_GPU", raising=False)
    else:
        monkeypatch.setenv("CODEFORMER_REQUIRE_GPU", raw)
    assert Settings.from_env().require_gpu is required
    monkeypatch.setenv("CODEFORMER_REQUIRE_GPU", "yes")
    with pytest.raises(ConfigError, match="CODEFORMER_REQUIRE_GPU must be 0 or 1, got 'yes'"):
        Settings.from_env()


def test_cog_yaml_requires_the_gpu_in_the_image() -> None:
    import yaml

    config = yaml.safe_load((PROJECT_ROOT / "cog.yaml").read_text())
    assert config["build"]["gpu"] is True
    assert "CODEFORMER_REQUIRE_GPU=1" in config["environment"]


# -- out of memory in a request ----------------------------------------------------------------
def _one_face_rows(pixels: torch.Tensor, scale: float) -> torch.Tensor:
    """``detect_rows``' answer for a face in the middle of the working image, none on grey 127."""
    if int(pixels[0, 0, 0]) == 127:
        return torch.zeros((0, 16))
    height, width = (side / scale for side in pixels.shape[:2])
    centre = torch.tensor([width / 2, height / 2])
    offsets = torch.tensor([[-20.0, -20.0], [20.0, -20.0], [0.0, 0.0], [-15.0, 20.0], [15.0, 20.0]])
    box = torch.cat([centre - 40, centre + 40, torch.ones(1)])
    return torch.cat([box, (centre + offsets).flatten(), torch.ones(1)]).to(torch.float32)[None]  # a face


@pytest.mark.parametrize("where", ["forward", "float32 recompute"])
def test_out_of_memory_while_restoring_fails_the_request_naming_the_images_with_faces(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In CodeFormer's forward, or in the float32 recompute of faces that were not finite (a
    device call of its own, from the request's thread): the same answer."""
    cpu = torch.device("cpu")
    nets = Nets(*(nn.Identity() for _ in range(3)))
    restorer = Restorer(nets, cpu, Settings(retained_memory_mb=0, mixed_precision="off"))
    # flat images: 127 has no face, the others one each
    images = [np.full((200, 200, 3), level, np.uint8) for level in (90, 127, 160)]

    def out_of_memory(*_args: object) -> np.ndarray:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def restoring(restorer: FaceRestorer, *_args: object, **_kwargs: object) -> FaceBatchRun:
        if where == "forward":
            return stand_in_run(restorer, out_of_memory)
        return stand_in_run(restorer, lambda crops: crops.clone(), forward=out_of_memory)

    monkeypatch.setattr(FaceDetector, "detect_rows", lambda _detector, *args: _one_face_rows(*args))
    monkeypatch.setattr(FaceRestorer, "restoring", restoring)
    with pytest.raises(ImageFailedError) as raised:
        restorer.restore(images, RequestOptions.parse(profile="max_speed"))
    assert raised.value.indices == (0, 2)
    assert str(raised.value).startswith("images 0, 2: the device ran out of memory restoring 2 faces")
    assert "CUDA out of memory. Tried to allocate 2.00 GiB" in str(raised.value)
    assert restorer.restore([images[1]])[0].faces == []  # the next request is served


@pytest.mark.parametrize(
    ("pixel_stages", "parse_call", "doing"),
    [("host", "labelling", "parsing"), ("device", "masking", "parsing and pasting back")],
)
def test_out_of_memory_after_restoring_fails_only_its_image_naming_the_step(
    pixel_stages: str, parse_call: str, doing: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After CodeFormer the device parses, and on the device pixel path pastes back too: a message
    for each path, the image that failed named."""
    nets = Nets(*(nn.Identity() for _ in range(3)))
    settings = Settings(retained_memory_mb=0, mixed_precision="off", pixel_stages=pixel_stages)
    restorer = Restorer(nets, torch.device("cpu"), settings)
    images = [np.full((200, 200, 3), level, np.uint8) for level in (90, 127)]  # a face, then none

    def out_of_memory(*_args: object, **_kwargs: object) -> np.ndarray:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(FaceDetector, "detect_rows", lambda _detector, *args: _one_face_rows(*args))
    monkeypatch.setattr(
        FaceRestorer,
        "restoring",
        lambda restorer, _fidelity, _mp, to_host=True: stand_in_run(restorer, torch.clone, to_host),
    )
    monkeypatch.setattr(
        FaceParser, parse_call, lambda parser, *_args, **_kwargs: stand_in_run(parser, out_of_memory)
    )
    with pytest.raises(ImageFailedError) as raised:
        restorer.restore(images, RequestOptions.parse(profile="fast"))
    assert raised.value.indices == (0,)
    assert str(raised.value).startswith(f"image 0: the device ran out of memory {doing} 1 faces")
