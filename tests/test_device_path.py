"""The device pixel path through the pipeline (``pixels_on_device``), run here on CPU tensors.

On CUDA, fast and max_speed take their pixel stages to the device: one upload of each image,
the stages in ``codeformer.stages.device_warp`` and ``device_paste``, one download of the
finished pixels (tests/test_fake_cuda.py counts the copies; tests/test_device_thread.py shows
that the host does no pixel work meanwhile). ``CODEFORMER_PIXEL_STAGES=device`` runs the same
code on a CPU. Each stage is held to its bound against its host stage in
tests/test_device_warp.py and test_device_paste.py; end to end, CodeFormer's top-1 codebook
lookup can turn a one-level change of a crop into large changes of a face, so the whole
request is held to gpu_check's mean bound against the host path, and its detections to the
landmark bound.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch
from helpers import GOLDEN_PHOTOS, face_photo, golden_photo

from benchmarks.gpu_checks import MAX_MEAN_ABS
from codeformer.config import PIXEL_STAGES_CHOICES, PROFILES, RequestOptions
from codeformer.pipeline import Restorer, pixels_on_device

CUDA, CPU = torch.device("cuda", 0), torch.device("cpu")
LANDMARK_BOUND_PX = 0.05


@pytest.mark.parametrize("setting", PIXEL_STAGES_CHOICES)
@pytest.mark.parametrize("device", [CUDA, CPU], ids=["cuda", "cpu"])
def test_only_fast_and_max_speed_take_the_device_path_and_auto_only_on_cuda(
    setting: str, device: torch.device
) -> None:
    chosen = {
        name: pixels_on_device(setting, device, RequestOptions(profile=profile))
        for name, profile in PROFILES.items()
    }
    on_device = setting == "device" or (setting == "auto" and device.type == "cuda")
    # baseline's promise is the official output: its stages stay the host's, bit for bit
    assert chosen == {"baseline": False, "fast": on_device, "max_speed": on_device}


@pytest.mark.nets  # the seed-0 nets over three photos, both paths
def test_the_device_path_finds_the_same_faces_and_stays_within_the_mean_bound(
    restorer_seed0: Restorer,
) -> None:
    """A golden photo, a small photo (enlarged to work on, shrunk back) and a gray one, in fast:
    every moved stage, the parse masks included (max_speed's paste-back without them is held
    to its bound in tests/test_device_paste.py)."""
    photo = golden_photo(next(iter(GOLDEN_PHOTOS)))
    gray = np.repeat(photo[..., 1:2], 3, axis=-1)
    images = [photo, face_photo(300, 240), gray]
    options = RequestOptions(profile=PROFILES["fast"])
    results = {}
    for stages in ("host", "device"):
        settings = dataclasses.replace(restorer_seed0.settings, pixel_stages=stages, max_faces=2)
        restorer = Restorer(restorer_seed0.runtime.safe_nets, CPU, settings)
        results[stages] = restorer.restore(images, options)
        restorer.scheduler.stop()
    for host, device in zip(results["host"], results["device"], strict=True):
        assert device.image.shape == host.image.shape and device.image.dtype == np.uint8
        assert device.working_size == host.working_size
        assert len(device.faces) == len(host.faces) >= 1
        for on_device, on_host in zip(device.faces, host.faces, strict=True):
            assert np.abs(on_device.landmarks - on_host.landmarks).max() <= LANDMARK_BOUND_PX
        mean_abs = np.abs(device.image.astype(np.int16) - host.image.astype(np.int16)).mean()
        assert mean_abs <= MAX_MEAN_ABS
    # the gray photo came back gray: the gray test on the device decided as the host's
    restored_gray = results["device"][2].image.astype(np.int16)
    assert np.abs(restored_gray - restored_gray[..., 1:2]).max() <= 1


class OverflowingCodeFormer(torch.nn.Module):
    """A CodeFormer whose reduced-precision output is NaN, as an fp16 overflow would make it;
    with ``float32_always`` it computes in float32 whatever autocast says (the reference)."""

    def __init__(self, net: torch.nn.Module, float32_always: bool = False) -> None:
        super().__init__()
        self.net, self.float32_always = net, float32_always

    def forward(self, x: torch.Tensor, w: float = 0.0, adain: bool = False) -> tuple[torch.Tensor, ...]:
        if self.float32_always:
            with torch.autocast("cpu", enabled=False):
                return self.net(x, w=w, adain=adain)
        out, *rest = self.net(x, w=w, adain=adain)
        if torch.is_autocast_enabled("cpu"):
            out = torch.full_like(out, torch.nan)
        return (out, *rest)


@pytest.mark.nets  # the seed-0 nets, one face, four requests
@pytest.mark.parametrize("stages", ["host", "device"])
def test_a_face_that_overflows_in_reduced_precision_comes_back_as_float32_computes_it(
    restorer_seed0: Restorer, stages: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The request's thread reads the finiteness flags and has the face computed again, on
    either pixel path: the output is the one a float32 CodeFormer gives, to the bit."""
    nets = restorer_seed0.runtime.safe_nets
    settings = dataclasses.replace(
        restorer_seed0.settings, pixel_stages=stages, max_faces=1, mixed_precision="on"
    )
    photo = golden_photo(next(iter(GOLDEN_PHOTOS)))
    options = RequestOptions(profile=PROFILES["fast"])
    results = []
    for float32_always in (False, True):
        codeformer = OverflowingCodeFormer(nets.codeformer, float32_always)
        restorer = Restorer(dataclasses.replace(nets, codeformer=codeformer), CPU, settings)
        with caplog.at_level(logging.WARNING, logger="codeformer.stages.face_batch"):
            results.append(restorer.restore([photo], options)[0])
        restorer.scheduler.stop()
    overflowed, reference = results
    assert len(overflowed.faces) == 1
    assert np.array_equal(overflowed.image, reference.image)
    recomputed = [record.getMessage() for record in caplog.records if record.name.endswith("face_batch")]
    assert recomputed == [
        "CodeFormer: 1 face gave non-finite values in bfloat16; computing them again in float32"
    ]
