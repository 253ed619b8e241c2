"""A batch of 512x512 faces, and a net run over it chunk by chunk: what restore and parse share.

``check_face_batch`` is the check the typed stage results (``AlignedFaces``,
``RestoredFaces``) make once, when built. ``FaceBatchNet`` is the base of ``FaceRestorer``
and ``FaceParser``: the faces go to the device once, are normalised there
(``crops_to_tensor``), run ``batch_size`` at a time, and come back to the host once.
``FaceBatchRun`` is one stage's run of such a net, in two halves: what the device thread
queues, and what the request's thread finishes once the results have arrived.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

from codeformer.config import FACE_SIZE
from codeformer.errors import InternalError
from codeformer.runtime import Download, arrived, autocast_dtype, divide_exactly, downloads, upload

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


def non_finite_faces(finite: torch.Tensor) -> list[int]:
    """The indices of the False entries of (F,) bool ``finite``, a host tensor: a read of host memory."""
    return [index for index, face_finite in enumerate(finite.tolist()) if not face_finite]


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
# a run's first half: (the rows, on their way to the host or kept on the device; each face's
# finiteness on its way to the host, None in float32)
Launched = tuple[torch.Tensor | Download, Download | None]
Faces = np.ndarray | torch.Tensor | list[np.ndarray] | list[torch.Tensor]  # a run's input, or its parts


def call_here(function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)`` on the calling thread: how a run makes its device calls outside a scheduler."""
    return function(*args)


class FaceBatchNet:
    """A loaded net on ``device``, run over normalised faces ``batch_size`` at a time (``FaceBatchRun``).

    What the restorer and the parser share. ``float32_net`` computes the faces whose
    reduced-precision output is not finite: the same net when its weights are float32
    (autocast off is enough), the float32 original when ``net`` stores weights in reduced
    precision (the runtime's optimized mixed-precision copies).

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


@dataclass(frozen=True)
class FaceBatchRun:
    """One stage's run of ``net`` over (F, 512, 512, 3) BGR faces: ``finish(forward(net, chunk))``
    per chunk, joined.

    ``finish`` turns a chunk's network output into the stage's result rows on the device
    (faces, labels, masks): (B, ...) per chunk, whatever the output's shape. Faces on the
    host are uploaded once; faces already on the device are used as they are. The rows come
    back to the host in one copy, or with ``to_host=False`` stay on the device (the device
    pixel path). ``mixed_precision`` runs the net under autocast.

    In two halves, so that the device thread never waits for the device. ``launch``, on the
    device thread, queues everything: the chunks, each face's finiteness flag (a bool on the
    device, in reduced precision), and the copies of the rows and the flags to the host
    (``runtime.downloads``), and returns at once. ``complete``, on the request's thread once
    they have arrived (``runtime.arrived``), reads the flags and computes the rare faces whose
    output is not finite again in float32, through ``run``: a device call of its own (the
    scheduler's ``call``). Each face's result depends on its own input only, whichever faces
    shared its chunk. Calling the run does both on the calling thread.
    """

    net: FaceBatchNet
    mixed_precision: bool
    forward: Forward
    finish: Finish
    to_host: bool = True

    def __call__(self, faces: np.ndarray | torch.Tensor) -> torch.Tensor:
        return self.complete(arrived(self.launch(faces)), faces)

    def launch(self, faces: np.ndarray | torch.Tensor) -> Launched:
        """The device half: (rows, finite), both queued, nothing waited for (``Launched``)."""
        net = self.net
        precision = autocast_dtype(net.device)
        with torch.inference_mode():
            faces_in = crops_to_tensor(faces, net.device)  # (F, 3, 512, 512) float in [-1, 1]
            results, finite = [], []
            for chunk in faces_in.split(net.batch_size):
                net_input = pad_chunk(chunk, net.chunk_sizes) if net.compiled else chunk
                with torch.autocast(net.device.type, dtype=precision, enabled=self.mixed_precision):
                    output = self.forward(net.net, net_input)[: len(chunk)]  # the padding rows dropped
                if self.mixed_precision:
                    finite.append(torch.isfinite(output).flatten(1).all(1))  # (B,) bool on the device
                results.append(self.finish(output))
            rows = torch.cat(results)
            flags = torch.cat(finite) if finite else None
            copied = iter(downloads(*([rows] if self.to_host else []), *([] if flags is None else [flags])))
            return (next(copied) if self.to_host else rows), (None if flags is None else next(copied))

    def complete(
        self,
        launched: tuple[torch.Tensor, torch.Tensor | None],
        faces: Faces,
        run: Callable[..., Any] = call_here,
    ) -> torch.Tensor:
        """The request's half: ``launch``'s rows, arrived, with any non-finite face computed again.

        ``launched``: this request's rows of what was launched, arrived (the scheduler hands
        each request its share of a batch, waited for: ``runtime.arrived``); ``faces``: the
        request's input to it (an array or tensor, or a list of parts, as the scheduler joins
        them); ``run(function, *args)``: how to make a device call.
        """
        rows, finite = launched
        bad = [] if finite is None else non_finite_faces(finite)
        if bad:
            logger.warning(
                "%s: %d face%s gave non-finite values in %s; computing them again in float32",
                self.net.net_name,
                len(bad),
                "s" * (len(bad) != 1),
                str(autocast_dtype(self.net.device)).removeprefix("torch."),
            )
            recomputed = arrived(run(self._recompute, rows, faces, bad))
            if recomputed is not None:  # host rows: written here, once their copy has arrived
                with torch.inference_mode():
                    for row, index in enumerate(bad):
                        rows[index] = recomputed[row]
        return rows

    def _recompute(self, rows: torch.Tensor, faces: Faces, bad: list[int]) -> torch.Tensor | Download | None:
        """On the device: the faces at ``bad`` through the float32 net, by chunks, nothing waited for.

        Rows on the device are written there (stream order keeps the write after the launch
        that made them); for rows on the host the recomputed rows come back on their way there,
        for ``complete`` to write. Only the bad faces are taken from ``faces`` (or its parts).
        """
        net = self.net
        parts = [torch.as_tensor(part) for part in (faces if isinstance(faces, list) else [faces])]
        starts = np.cumsum([0, *(len(part) for part in parts)])
        picked = []  # (1, 512, 512, 3) views, one per bad face, from the part that holds it
        for index in bad:
            part = int(np.searchsorted(starts, index, side="right")) - 1
            local = index - int(starts[part])
            picked.append(parts[part][local : local + 1])
        recomputed = []
        with torch.inference_mode():
            for start in range(0, len(picked), net.batch_size):
                chunk = crops_to_tensor(torch.cat(picked[start : start + net.batch_size]), net.device)
                recomputed.append(self.finish(self.forward(net.float32_net, chunk)))
            again = torch.cat(recomputed)
            if rows.device != again.device:
                return downloads(again)[0]
            for row, index in enumerate(bad):
                rows[index] = again[row]
        return None
