"""Restore each aligned 512x512 crop with CodeFormer (spec §5).

uint8 BGR crops go to the device once, are normalised there, run through the network in
chunks, and come back to the CPU once as uint8 BGR faces. Unlike the official helper, a
failing network call is not replaced by the input face: the error propagates.
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from codeformer.config import FACE_SIZE
from codeformer.errors import InputError
from codeformer.nets.codeformer import CodeFormer
from codeformer.runtime import autocast_dtype

logger = logging.getLogger(__name__)


def crops_to_tensor(crops: np.ndarray, device: torch.device) -> torch.Tensor:
    """(F, 512, 512, 3) uint8 BGR -> (F, 3, 512, 512) float32 RGB in [-1, 1] on ``device``.

    Bit-identical to the official recipe (u / 255 in float64, cast to float32, then
    (v - 0.5) / 0.5): for uint8 u, float32 u / 255 equals the float64 quotient rounded to
    float32 (spec Appendix C; tests check all 256 levels).
    """
    crops_bgr = torch.from_numpy(np.ascontiguousarray(crops)).to(device)  # the one host->device copy
    crops_rgb = crops_bgr.flip(-1).permute(0, 3, 1, 2)  # (F, 3, H, W) uint8 RGB
    unit = crops_rgb.to(torch.float32) / 255.0  # [0, 1]
    return ((unit - 0.5) / 0.5).contiguous()


def tensor_to_faces(out: torch.Tensor) -> np.ndarray:
    """(F, 3, 512, 512) network output -> (F, 512, 512, 3) uint8 BGR (spec §5.3).

    Clamp to [-1, 1], (t + 1) / 2, x 255 in float32, round half to even, uint8: the
    official ``tensor2img`` step by step, computed on the tensor's device.
    """
    unit = (out.to(torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0
    levels = (unit * 255.0).round()  # torch.round is half-to-even, like NumPy's
    faces_bgr = levels.to(torch.uint8).flip(1).permute(0, 2, 3, 1)  # (F, H, W, 3) BGR
    return faces_bgr.contiguous().cpu().numpy()  # the one device->host copy


class FaceRestorer:
    """Runs a loaded CodeFormer over aligned crops; holds no per-request state."""

    def __init__(self, net: CodeFormer, device: torch.device, batch_size: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.net = net
        self.device = device
        self.batch_size = batch_size

    def restore(self, crops: np.ndarray, fidelity: float, mixed_precision: bool = False) -> np.ndarray:
        """(F, 512, 512, 3) uint8 BGR crops -> (F, 512, 512, 3) uint8 BGR restored faces.

        ``fidelity`` is CodeFormer's w in [0, 1]; ``mixed_precision`` runs the network under
        autocast (bfloat16 on CPU, float16 on CUDA).
        """
        expected_shape = (FACE_SIZE, FACE_SIZE, 3)
        if crops.ndim != 4 or crops.shape[1:] != expected_shape or crops.dtype != np.uint8:
            raise InputError(
                f"face crops must be a (F, {FACE_SIZE}, {FACE_SIZE}, 3) uint8 array, "
                f"got {crops.dtype} {crops.shape}; align the faces to {FACE_SIZE}x{FACE_SIZE} first"
            )
        if not 0.0 <= fidelity <= 1.0:  # also rejects NaN
            raise InputError(f"codeformer_fidelity must be between 0 and 1, got {fidelity}")
        if len(crops) == 0:
            return np.empty((0, *expected_shape), dtype=np.uint8)

        precision = autocast_dtype(self.device)
        outputs = []
        with torch.inference_mode():
            faces_in = crops_to_tensor(crops, self.device)  # (F, 3, 512, 512) float in [-1, 1]
            for start in range(0, len(faces_in), self.batch_size):
                chunk = faces_in[start : start + self.batch_size]
                with torch.autocast(self.device.type, dtype=precision, enabled=mixed_precision):
                    restored = self.net(chunk, w=float(fidelity), adain=True)[0]
                outputs.append(restored.to(torch.float32))
            faces_out = tensor_to_faces(torch.cat(outputs))
        logger.debug("restored %d faces (w=%.3f, mixed_precision=%s)", len(crops), fidelity, mixed_precision)
        return faces_out
