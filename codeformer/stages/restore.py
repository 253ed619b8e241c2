"""Restore each aligned 512x512 crop with CodeFormer (docs/reference.md §5).

uint8 BGR crops go to the device once, are normalised there, run through the network in
chunks, and come back to the CPU once as uint8 BGR faces. The device part
(``FaceRestorer.restore_tensor``) takes and returns host tensors, so that it runs on fake
CUDA tensors in the tests. Unlike the official helper, a failing network call is not
replaced by the input face: the error propagates.

In reduced precision a chunk whose output is not finite is computed again in float32: fp16
convolutions in CodeFormer's decoder can overflow, and a NaN survives the clamp to [-1, 1]
and becomes arbitrary pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from codeformer.config import FACE_SIZE
from codeformer.nets.codeformer import CodeFormer
from codeformer.runtime import autocast_dtype, divide_exactly, download_with_flags, upload
from codeformer.stages.align import check_face_batch

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

    faces: np.ndarray  # (F, 512, 512, 3) uint8 BGR, or float64 once a gray input's faces are made gray

    def __post_init__(self) -> None:
        check_face_batch(self.faces, "faces", RESTORED_FACE_DTYPES)

    def __len__(self) -> int:
        return int(self.faces.shape[0])


def crops_to_tensor(crops: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """(F, 512, 512, 3) uint8 (or float64) BGR -> (F, 3, 512, 512) float32 RGB in [-1, 1] on ``device``.

    The input normalisation of both CodeFormer (§5 step 1) and ParseNet (§6.3 step 9a),
    bit for bit. CodeFormer's official recipe divides uint8 u by 255 in float64 and casts
    to float32; ParseNet's casts to float32 and divides in float32. For uint8 u the two
    are equal (docs/reference.md Appendix C; tests check all 256 levels), so one cast-then-divide serves
    both, and it is ParseNet's recipe exactly for the float64 gray faces it also receives.
    """
    if isinstance(crops, np.ndarray):
        crops = torch.from_numpy(np.ascontiguousarray(crops))
    crops_bgr = upload(crops, device)  # the one host->device copy
    crops_rgb = crops_bgr.flip(-1).permute(0, 3, 1, 2)  # (F, 3, H, W) RGB
    unit = divide_exactly(crops_rgb.to(torch.float32), 255.0)  # [0, 1]
    return ((unit - 0.5) / 0.5).contiguous()


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


def non_finite_chunks(finite: torch.Tensor) -> list[int]:
    """The indices of the False entries of (C,) bool ``finite``, a host tensor: a read of host memory."""
    return [index for index, chunk_finite in enumerate(finite.tolist()) if not chunk_finite]


def face_batch_sizes(batch_size: int) -> tuple[int, ...]:
    """The chunk sizes a compiled net sees: powers of two below ``batch_size``, then ``batch_size``.

    1, 2, 4 for the CUDA default of 4: a chunk is padded up to the next of these
    (``pad_chunk``), so that a graph per size serves every face count, and no size sees
    more than twice its faces.
    """
    sizes = [1 << power for power in range(batch_size.bit_length()) if 1 << power < batch_size]
    return (*sizes, batch_size)


def pad_chunk(chunk: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """(B, ...) ``chunk`` -> (S, ...) with S the first of ascending ``sizes`` >= B, padded with its last row.

    A copy of a real face, not zeros: the padding rows compute what a face computes (finite
    where it is), and each row of these nets depends on its own input only (eval-mode norms,
    per-face attention), so the real rows' outputs are those of the unpadded chunk.
    """
    target = next(size for size in sizes if size >= len(chunk))
    if target == len(chunk):
        return chunk
    return torch.cat([chunk, chunk[-1:].expand(target - len(chunk), *chunk.shape[1:])])


Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
Finish = Callable[[torch.Tensor], torch.Tensor]


class FaceBatchNet:
    """A loaded net on ``device``, run over normalised faces ``batch_size`` at a time.

    What the restorer and the parser share: the input normalisation (``crops_to_tensor``),
    the chunking that bounds activation memory, autocast when mixed precision is asked, the
    float32 recompute of a reduced-precision chunk whose output is not finite, and the one
    copy of the result back to the host. ``float32_net`` computes that chunk: the same net
    when its weights are float32 (autocast off is enough), the float32 original when ``net``
    stores weights in reduced precision (the runtime's optimized mixed-precision copies).

    The device never waits for the host between chunks: each chunk's finiteness is a flag
    on the device, and the flags come back with the result, in its one device->host copy
    (``download_with_flags``); only then are the rare non-finite chunks computed again.

    When ``net`` is a ``torch.compile`` module (``compiled``), every chunk is padded to one
    of ``face_batch_sizes`` (1, 2, 4 by default) and the padding rows dropped from its
    output: a fixed set of shapes, each one graph, which a graph-replaying backend records
    once and replays. Each chunk's output is finished into new memory before the next chunk
    runs (CUDA graphs replay into the same memory).
    """

    net_name = "net"  # how the log names the net

    def __init__(
        self, net: nn.Module, device: torch.device, batch_size: int = 4, float32_net: nn.Module | None = None
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.net = net
        self.float32_net = net if float32_net is None else float32_net
        self.device = device
        self.batch_size = batch_size
        self.compiled = isinstance(net, OptimizedModule)
        self.chunk_sizes = face_batch_sizes(batch_size)

    def _run(
        self, faces: torch.Tensor, mixed_precision: bool, forward: Forward, finish: Finish
    ) -> torch.Tensor:
        """(F, 512, 512, 3) host BGR faces -> ``finish(forward(net, chunk))`` per chunk, joined, on the host.

        ``finish`` turns a chunk's network output into the stage's result rows on the device
        (faces, labels, masks): (B, ...) per chunk, whatever the output's shape.
        """
        precision = autocast_dtype(self.device)
        faces_in = crops_to_tensor(faces, self.device)  # (F, 3, 512, 512) float in [-1, 1]
        chunks = faces_in.split(self.batch_size)
        results, finite = [], []
        for chunk in chunks:
            net_input = pad_chunk(chunk, self.chunk_sizes) if self.compiled else chunk
            with torch.autocast(self.device.type, dtype=precision, enabled=mixed_precision):
                output = forward(self.net, net_input)[: len(chunk)]  # the padding rows dropped
            if mixed_precision:
                finite.append(torch.isfinite(output).all())  # a 0-d bool on the device: no wait
            results.append(finish(output))
        if not mixed_precision:
            return torch.cat(results).cpu()  # the one device->host copy
        result, chunk_finite = download_with_flags(torch.cat(results), torch.stack(finite))
        for index in non_finite_chunks(chunk_finite):
            chunk = chunks[index]
            logger.warning(
                "%s: %d faces gave non-finite values in %s; computing them again in float32",
                self.net_name,
                len(chunk),
                str(precision).removeprefix("torch."),
            )
            start = index * self.batch_size
            result[start : start + len(chunk)] = finish(forward(self.float32_net, chunk)).cpu()
        return result


class FaceRestorer(FaceBatchNet):
    """Runs a loaded CodeFormer over aligned crops; holds no per-request state."""

    net: CodeFormer
    net_name = "CodeFormer"

    def restore(self, crops: np.ndarray, fidelity: float, mixed_precision: bool = False) -> np.ndarray:
        """(F, 512, 512, 3) uint8 BGR crops -> (F, 512, 512, 3) uint8 BGR restored faces.

        The crops are ``AlignedFaces.crops`` (checked when built), or several images' crops
        joined by the scheduler: they are not checked again here.

        ``fidelity`` is CodeFormer's w in [0, 1] (``RequestOptions.fidelity``, checked there);
        ``mixed_precision`` runs the network under autocast (bfloat16 on CPU, float16 on CUDA).
        """
        if len(crops) == 0:
            return np.empty((0, FACE_SIZE, FACE_SIZE, 3), dtype=np.uint8)

        faces_out = self.restore_tensor(torch.from_numpy(crops), fidelity, mixed_precision)
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

    def restore_tensor(self, crops: torch.Tensor, fidelity: float, mixed_precision: bool) -> torch.Tensor:
        """``restore``'s device part: (F, 512, 512, 3) uint8 BGR crops -> restored faces, both on the host."""

        weight = self.fidelity_argument(fidelity)

        def forward(net: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
            w = weight if net is self.net else float(fidelity)  # the float32 recompute is not compiled
            return net(chunk, w=w, adain=True)[0]  # (B, 3, 512, 512)

        with torch.inference_mode():
            return self._run(crops, mixed_precision, forward, output_to_faces)
