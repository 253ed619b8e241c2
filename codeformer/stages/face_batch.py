"""A batch of 512x512 faces, and a net run over it chunk by chunk: what restore and parse share.

``check_face_batch`` is the check the typed stage results (``AlignedFaces``,
``RestoredFaces``) make once, when built. ``FaceBatchNet`` is the base of ``FaceRestorer``
and ``FaceParser``: the faces go to the device once, are normalised there
(``crops_to_tensor``), run ``batch_size`` at a time, and come back to the host once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from codeformer.config import FACE_SIZE
from codeformer.errors import InternalError
from codeformer.runtime import autocast_dtype, divide_exactly, download_with_flags, upload

logger = logging.getLogger(__name__)


def element_type(values: np.ndarray | torch.Tensor) -> np.dtype:
    """The NumPy dtype of an array's or a tensor's elements (torch.uint8 -> uint8, ...)."""
    if isinstance(values, torch.Tensor):
        return np.dtype(str(values.dtype).removeprefix("torch."))
    return values.dtype


def check_face_batch(faces: np.ndarray | torch.Tensor, name: str, dtypes: tuple[type, ...]) -> None:
    """Raise ``InternalError`` unless ``faces`` is an (F, 512, 512, 3) array of one of ``dtypes``.

    What the typed stage results (``AlignedFaces``, ``RestoredFaces``) check once, when
    built, so that the stages that take them need not check again. A host array, or on the
    device pixel path a tensor on the nets' device.
    """
    shape = tuple(faces.shape[1:])
    if faces.ndim != 4 or shape != (FACE_SIZE, FACE_SIZE, 3) or element_type(faces) not in dtypes:
        kinds = " or ".join(np.dtype(dtype).name for dtype in dtypes)
        raise InternalError(
            f"{name} must be an (F, {FACE_SIZE}, {FACE_SIZE}, 3) {kinds} array (aligned crops are uint8, "
            f"restored faces uint8 or, for gray inputs, float64), got {faces.dtype} {faces.shape}"
        )


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
        self,
        faces: torch.Tensor,
        mixed_precision: bool,
        forward: Forward,
        finish: Finish,
        to_host: bool = True,
    ) -> torch.Tensor:
        """(F, 512, 512, 3) BGR faces -> ``finish(forward(net, chunk))`` per chunk, joined.

        ``finish`` turns a chunk's network output into the stage's result rows on the device
        (faces, labels, masks): (B, ...) per chunk, whatever the output's shape. ``faces`` on
        the host are uploaded once; faces already on the device are used as they are. The
        result comes back to the host in one copy, or with ``to_host=False`` stays on the
        device (the device pixel path): then only the chunks' finiteness flags are
        downloaded, a few bytes, when mixed precision needs them.
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
            joined = torch.cat(results)
            return joined.cpu() if to_host else joined  # the one device->host copy, if any
        if to_host:
            result, chunk_finite = download_with_flags(torch.cat(results), torch.stack(finite))
        else:
            result, chunk_finite = torch.cat(results), torch.stack(finite).cpu()
        for index in non_finite_chunks(chunk_finite):
            chunk = chunks[index]
            logger.warning(
                "%s: %d faces gave non-finite values in %s; computing them again in float32",
                self.net_name,
                len(chunk),
                str(precision).removeprefix("torch."),
            )
            start = index * self.batch_size
            recomputed = finish(forward(self.float32_net, chunk))
            result[start : start + len(chunk)] = recomputed.cpu() if to_host else recomputed
        return result
