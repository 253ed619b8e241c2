"""Restore each aligned 512x512 crop with CodeFormer (docs/reference.md §5).

uint8 BGR crops go to the device once, are normalised there, run through the network in
chunks, and come back to the CPU once as uint8 BGR faces. The device part
(``FaceRestorer.restore_tensor``) takes and returns host tensors, so that it runs on fake
CUDA tensors in the tests. Unlike the official helper, a failing network call is not
replaced by the input face: the error propagates.

In reduced precision a face whose output is not finite is computed again in float32
(``FaceBatchRun``): fp16 convolutions in CodeFormer's decoder can overflow, and a NaN
survives the clamp to [-1, 1] and becomes arbitrary pixels.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from codeformer.config import FACE_SIZE
from codeformer.nets.codeformer import CodeFormer
from codeformer.stages.face_batch import FaceBatchNet, FaceBatchRun, check_face_batch

logger = logging.getLogger(__name__)

# Restored faces are uint8, or float64 once a gray input's faces are made gray (docs/reference.md §5.5)
RESTORED_FACE_DTYPES = (np.uint8, np.float64)


@dataclass(frozen=True)
class RestoredFaces:
    """The restored faces of one working image, in ``AlignedFaces`` order: parsing's and paste-back's input.

    Checked once, when built (the pipeline builds one per image from ``FaceRestorer.restore``'s
    output, which the scheduler may have computed together with other images' faces): the
    parser and paste-back take the faces as they are. ``InternalError`` when malformed.
    """

    # (F, 512, 512, 3) uint8 BGR, or float64 once a gray input's faces are made gray; a device
    # tensor on the device pixel path
    faces: np.ndarray | torch.Tensor

    def __post_init__(self) -> None:
        check_face_batch(self.faces, "faces", RESTORED_FACE_DTYPES)

    def __len__(self) -> int:
        return int(self.faces.shape[0])


def output_to_faces(out: torch.Tensor) -> torch.Tensor:
    """(F, 3, 512, 512) network output -> (F, 512, 512, 3) uint8 BGR on its device (docs/reference.md §5.3).

    Clamp to [-1, 1], (t + 1) / 2, x 255 in float32, round half to even, uint8: the
    official ``tensor2img`` step by step, computed on the tensor's device, in new memory.
    """
    unit = (out.to(torch.float32).clamp(-1.0, 1.0) + 1.0) / 2.0
    levels = (unit * 255.0).round()  # torch.round is half-to-even, like NumPy's
    faces_bgr = levels.to(torch.uint8).flip(1).permute(0, 2, 3, 1)  # (F, H, W, 3) BGR
    return faces_bgr.contiguous()


def tensor_to_faces(out: torch.Tensor) -> np.ndarray:
    """``output_to_faces`` as a NumPy array on the host."""
    return output_to_faces(out).cpu().numpy()


class FaceRestorer(FaceBatchNet):
    """Runs a loaded CodeFormer over aligned crops; holds no per-request state."""

    net: CodeFormer
    net_name = "CodeFormer"

    def restore(
        self, crops: np.ndarray | torch.Tensor, fidelity: float, mixed_precision: bool = False
    ) -> np.ndarray:
        """(F, 512, 512, 3) uint8 BGR crops -> (F, 512, 512, 3) uint8 BGR restored faces on the host.

        The crops are ``AlignedFaces.crops`` (checked when built), or several images' crops
        joined by the scheduler (on CUDA, already on the device): they are not checked again here.

        ``fidelity`` is CodeFormer's w in [0, 1] (``RequestOptions.fidelity``, checked there);
        ``mixed_precision`` runs the network under autocast (bfloat16 on CPU, float16 on CUDA).
        """
        if len(crops) == 0:
            return np.empty((0, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)

        faces_out = self.restore_tensor(torch.as_tensor(crops), fidelity, mixed_precision)
        logger.debug("restored %d faces (w=%.3f, mixed_precision=%s)", len(crops), fidelity, mixed_precision)
        return faces_out.numpy()

    def fidelity_argument(self, fidelity: float) -> float | torch.Tensor:
        """CodeFormer's ``w`` for ``fidelity``: a number, or for compiled nets and w > 0 a device tensor.

        As a tensor on the nets' device (float32, 0-d, filled there: nothing uploaded) w is
        an input of the compiled graph: one graph for every w > 0, and no host scalar that
        would make the cudagraphs backend skip the graph. 0 stays a number: no fusion.
        """
        if self.compiled and fidelity > 0:
            return torch.full((), fidelity, dtype=torch.float32, device=self.device)
        return float(fidelity)

    def restore_tensor(
        self, crops: torch.Tensor, fidelity: float, mixed_precision: bool, to_host: bool = True
    ) -> torch.Tensor:
        """``restore``'s device part: (F, 512, 512, 3) uint8 BGR crops -> restored faces, same shape.

        Host crops in, host faces out; crops on the device with ``to_host=False`` (the device
        pixel path): the faces stay there.
        """
        return self.restoring(fidelity, mixed_precision, to_host)(crops)

    def restoring(self, fidelity: float, mixed_precision: bool, to_host: bool = True) -> FaceBatchRun:
        """``restore_tensor`` as a run in two halves (``FaceBatchRun``): the scheduler's device
        thread launches it, the request's thread completes it."""
        weight = self.fidelity_argument(fidelity)

        def forward(net: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
            w = weight if net is self.net else float(fidelity)  # the float32 recompute is not compiled
            return net(chunk, w=w, adain=True)[0]  # (B, 3, 512, 512)

        return FaceBatchRun(self, mixed_precision, forward, output_to_faces, to_host)
