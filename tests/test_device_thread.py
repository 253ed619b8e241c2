"""Where image work runs, through whole requests profiled thread by thread.

Host pixel path: a ``Restorer`` on the ``meta`` device takes the path a CUDA one takes with
``CODEFORMER_PIXEL_STAGES=host`` (any device but the CPU), and the device thread does device
work only. Device pixel path (``pixels_on_device``, here forced on the CPU): the host does no
pixel work at all, on any thread, besides the landmark fit. The nets' parts (``detect_rows``,
``restore_tensor``, ``labels_tensor``, ``masks_tensor``) are stand-ins that return what the
real ones return, noting the thread they ran on; everything else is the pipeline's own code.
A profiler records every OpenCV call, every NumPy array method on a pixel-sized array and
every call into the host stages' code on the thread it watches.
"""

from __future__ import annotations

import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import cv2
import numpy as np
import pytest
import torch
from helpers import stand_in_run
from torch import nn

import codeformer.stages
from codeformer.config import FACE_SIZE, RequestOptions, Settings
from codeformer.pipeline import Restorer
from codeformer.runtime import Nets
from codeformer.stages.align import FFHQ_TEMPLATE_512
from codeformer.stages.detect import FaceDetector
from codeformer.stages.face_batch import FaceBatchRun
from codeformer.stages.parse import PARSE_MASK_OPERATOR, FaceParser, face_pixels_to_masks_tensor
from codeformer.stages.restore import FaceRestorer

CV2_FUNCTIONS = {
    id(value): name for name, value in vars(cv2).items() if isinstance(value, types.BuiltinFunctionType)
}
STAGES = Path(codeformer.stages.__file__).parent
# the host stages' modules, and the host steps of the stages that also have a device part
HOST_MODULES = {str(STAGES / name) for name in ("prepare.py", "align.py", "paste.py", "warp.py")}
HOST_FUNCTIONS = {"resize_for_detector", "input_for", "face_pixels_to_masks", "to_gray_faces"}
PIXEL_SIZED = 64 * 64  # elements: smaller arrays are landmarks, transforms and rows
TEMPLATE = torch.from_numpy(FFHQ_TEMPLATE_512.astype(np.float64))  # (5, 2) landmarks in the 512 crop


class DeviceThreadProfile:
    """``sys.setprofile`` hook for one thread: what image work ran on it."""

    def __init__(self) -> None:
        self.image_work: list[str] = []

    def __call__(self, frame: FrameType, event: str, arg: object) -> None:
        if event == "c_call":
            if id(arg) in CV2_FUNCTIONS:
                self.image_work.append(f"cv2.{CV2_FUNCTIONS[id(arg)]}")
            elif (
                isinstance(array := getattr(arg, "__self__", None), np.ndarray) and array.size >= PIXEL_SIZED
            ):
                self.image_work.append(f"ndarray.{getattr(arg, '__name__', arg)}")
        elif event == "call":
            code = frame.f_code
            if code.co_filename in HOST_MODULES or code.co_name in HOST_FUNCTIONS:
                self.image_work.append(f"{Path(code.co_filename).name}:{code.co_name}")


class StandInDevice:
    """The stages' device parts, returning what the real ones return; notes where they ran."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.masks_made = 0  # masks_tensor calls: the device path of the parse masks
        self.kept_on_device: list[bool] = []  # per restore and mask call: the result stayed on the device

    def detect_rows(self, detector: FaceDetector, pixels: torch.Tensor, scale: float) -> torch.Tensor:
        """One upright face covering half the working image's short side, in its centre.

        Computed with torch, as the real rows are: NumPy here would count as image work.
        """
        self.threads.append(threading.current_thread())
        height, width = (side / scale for side in pixels.shape[:2])
        face_scale = min(height, width) / 2 / FACE_SIZE
        landmarks = (TEMPLATE - FACE_SIZE / 2) * face_scale + torch.tensor([width / 2, height / 2])
        box = torch.tensor([width / 4, height / 4, width * 3 / 4, height * 3 / 4, 0.99])
        return torch.cat([box, landmarks.flatten(), torch.ones(1)]).to(torch.float32)[None]  # (1, 16): a face

    def restore_tensor(
        self,
        restorer: FaceRestorer,
        crops: torch.Tensor,
        fidelity: float,
        mixed_precision: bool,
        to_host: bool = True,
    ) -> torch.Tensor:
        self.threads.append(threading.current_thread())
        self.kept_on_device.append(not to_host)
        return crops.clone()  # (F, 512, 512, 3) uint8

    def labels_tensor(self, parser: FaceParser, faces: torch.Tensor, mixed_precision: bool) -> torch.Tensor:
        self.threads.append(threading.current_thread())
        labels = torch.zeros(faces.shape[:3], dtype=torch.bool)
        labels[:, 64:-64, 64:-64] = True  # the face classes inside a border
        return labels

    def masks_tensor(
        self, parser: FaceParser, faces: torch.Tensor, mixed_precision: bool, to_host: bool = True
    ) -> torch.Tensor:
        """The labels' masks as the device path returns them: float64, made by torch."""
        self.masks_made += 1
        self.kept_on_device.append(not to_host)
        labels = self.labels_tensor(parser, faces, mixed_precision)
        return face_pixels_to_masks_tensor(labels, torch.tensor(PARSE_MASK_OPERATOR))


@pytest.fixture
def stand_in_device(monkeypatch: pytest.MonkeyPatch) -> StandInDevice:
    device = StandInDevice()
    monkeypatch.setattr(FaceDetector, "detect_rows", lambda self, *args: device.detect_rows(self, *args))
    monkeypatch.setattr(
        FaceRestorer,
        "restore_tensor",
        lambda self, *args, **kwargs: device.restore_tensor(self, *args, **kwargs),
    )
    monkeypatch.setattr(FaceParser, "labels_tensor", lambda self, *args: device.labels_tensor(self, *args))
    monkeypatch.setattr(
        FaceParser, "masks_tensor", lambda self, *args, **kwargs: device.masks_tensor(self, *args, **kwargs)
    )

    def restoring(
        restorer: FaceRestorer, fidelity: float, mixed_precision: bool, to_host: bool = True
    ) -> FaceBatchRun:
        def compute(crops: torch.Tensor) -> torch.Tensor:
            return device.restore_tensor(restorer, crops, fidelity, mixed_precision, to_host)

        return stand_in_run(restorer, compute, to_host)

    def labelling(parser: FaceParser, mixed_precision: bool) -> FaceBatchRun:
        def compute(faces: torch.Tensor) -> torch.Tensor:
            return device.labels_tensor(parser, faces, mixed_precision)

        return stand_in_run(parser, compute)

    def masking(parser: FaceParser, mixed_precision: bool, to_host: bool = True) -> FaceBatchRun:
        def compute(faces: torch.Tensor) -> torch.Tensor:
            return device.masks_tensor(parser, faces, mixed_precision, to_host)

        return stand_in_run(parser, compute, to_host)

    monkeypatch.setattr(FaceRestorer, "restoring", restoring)
    monkeypatch.setattr(FaceParser, "labelling", labelling)
    monkeypatch.setattr(FaceParser, "masking", masking)
    return device


@pytest.fixture
def meta_restorer() -> Iterator[Restorer]:
    """A Restorer on a device other than the CPU, as a CUDA one would be set up."""
    meta = torch.device("meta")
    nets = Nets(*(nn.Identity().to(meta) for _ in range(3)))
    restorer = Restorer(nets, meta, Settings(mixed_precision="off", face_batch=4, pixel_stages="host"))
    yield restorer
    restorer.scheduler.stop()


def photo(height: int, width: int, seed: int, gray: bool = False) -> np.ndarray:
    image = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return np.repeat(image[..., :1], 3, axis=-1) if gray else image


@pytest.mark.parametrize("profile", ["baseline", "fast", "max_speed"])
def test_off_the_cpu_no_image_work_runs_on_the_device_thread(
    meta_restorer: Restorer, stand_in_device: StandInDevice, profile: str
) -> None:
    profile_hook = DeviceThreadProfile()
    meta_restorer.scheduler.call(sys.setprofile, profile_hook)
    try:
        # a large photo (its detector copy is shrunk), a small one (enlarged to work on), a gray one
        images = [photo(1400, 1000, 1), photo(300, 400, 2), photo(700, 700, 3, gray=True)]
        results = meta_restorer.restore(images, RequestOptions.parse(profile=profile))
    finally:
        meta_restorer.scheduler.call(sys.setprofile, None)
    (device_thread,) = set(stand_in_device.threads)
    assert device_thread is not threading.current_thread()
    # detection per image, one restore for the request's faces, parsing per image (labels)
    parses = len(images) if profile != "max_speed" else 0
    assert len(stand_in_device.threads) == len(images) + 1 + parses
    assert stand_in_device.masks_made == 0 and not any(stand_in_device.kept_on_device)
    assert [len(result.faces) for result in results] == [1, 1, 1]
    assert [result.image.shape for result in results] == [image.shape for image in images]
    assert profile_hook.image_work == []


# the host steps of the device pixel path, none pixel work: the landmark fit, (F, 5, 2) points ->
# (F, 2, 3) transforms, ``AlignedFaces``' check of them, and the gray decision from six
# downloaded sums
HOST_STEPS = {
    "align.py:estimate_affines",
    "align.py:invert_affines",
    "align.py:__post_init__",
    "align.py:__len__",
    "cv2.estimateAffinePartial2D",
    "cv2.invertAffineTransform",
    "prepare.py:is_gray_from_sums",
    "prepare.py:_decided",  # the margin decision on the score from the sums: a comparison
    "prepare.py:_score",
    "prepare.py:<listcomp>",
    "prepare.py:<genexpr>",
}


# on the device thread, OpenCV's Gaussian weights for the soft mask's blur: 2·w_edge + 1 numbers
KERNEL_WEIGHTS = {"cv2.getGaussianKernel"}


@pytest.mark.parametrize("profile", ["fast", "max_speed"])
def test_on_the_device_pixel_path_the_host_does_no_pixel_work(
    stand_in_device: StandInDevice, profile: str
) -> None:
    """Both threads profiled: the request's thread fits landmarks only, the device thread runs torch only."""
    nets = Nets(*(nn.Identity() for _ in range(3)))
    settings = Settings(mixed_precision="off", face_batch=4, pixel_stages="device")
    restorer = Restorer(nets, torch.device("cpu"), settings)
    images = [photo(1400, 1000, 1), photo(300, 400, 2), photo(700, 700, 3, gray=True)]
    device_hook, request_hook = DeviceThreadProfile(), DeviceThreadProfile()
    restorer.scheduler.call(sys.setprofile, device_hook)
    sys.setprofile(request_hook)
    try:
        results = restorer.restore(images, RequestOptions.parse(profile=profile))
    finally:
        sys.setprofile(None)
        restorer.scheduler.call(sys.setprofile, None)
        restorer.scheduler.stop()
    assert [len(result.faces) for result in results] == [1, 1, 1]
    assert [result.image.shape for result in results] == [image.shape for image in images]
    # every net call kept its result on the device: one restore, and in fast one mask call per image
    parses = len(images) if profile == "fast" else 0
    assert stand_in_device.kept_on_device == [True] * (1 + parses)
    assert stand_in_device.masks_made == parses
    assert set(device_hook.image_work) <= KERNEL_WEIGHTS, sorted(set(device_hook.image_work))
    assert set(request_hook.image_work) <= HOST_STEPS, sorted(set(request_hook.image_work))
    assert "cv2.estimateAffinePartial2D" in request_hook.image_work  # the hook watched this thread


def test_the_profile_sees_image_work_on_the_thread_it_watches() -> None:
    """The instrument itself: OpenCV, array methods and host-stage code are all recorded."""
    profile_hook = DeviceThreadProfile()
    image = photo(64, 64, 4)
    sys.setprofile(profile_hook)
    try:
        cv2.resize(image, (32, 32))
        image.astype(np.float32)
        codeformer.stages.prepare.is_gray(image)
    finally:
        sys.setprofile(None)
    assert profile_hook.image_work[:2] == ["cv2.resize", "ndarray.astype"]
    assert "prepare.py:is_gray" in profile_hook.image_work


def test_warming_the_device_pixel_path_runs_its_stages_with_results_kept_on_the_device(
    stand_in_device: StandInDevice,
) -> None:
    """``Restorer.warmup(fast)`` on the device pixel path: crops, CodeFormer, the masks and paste-back."""
    nets = Nets(*(nn.Identity() for _ in range(3)))
    settings = Settings(mixed_precision="off", face_batch=4, pixel_stages="device")
    restorer = Restorer(nets, torch.device("cpu"), settings)
    try:
        restorer.warmup(RequestOptions.parse(profile="fast"))
    finally:
        restorer.scheduler.stop()
    # the flat canvas's request (one detection from the stand-in), then the warm-up's own face
    assert stand_in_device.kept_on_device == [True, True, True, True]
    assert stand_in_device.masks_made == 2
