"""Face parsing (docs/reference.md §6.3 step 9 a–f): ParseNet labels of each restored face -> blend mask.

The masks limit paste-back to skin, features and hair (``FaceMasks``, ``paste_faces``' ``masks``);
the ``max_speed`` profile skips this stage (§6.4).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from codeformer.config import FACE_SIZE
from codeformer.errors import InternalError
from codeformer.nets.parsenet import PARSE_CLASSES, ParseNet
from codeformer.stages.face_batch import FaceBatchNet, FaceBatchRun, element_type
from codeformer.stages.restore import RestoredFaces

logger = logging.getLogger(__name__)

# CelebAMask-HQ classes kept as "face" by the official MASK_COLORMAP (docs/reference.md §6.3 9c): skin,
# nose, eyeglasses, eyes, brows, ears, mouth, lips, hair (1..13) and earrings (15); not
# background, hat, necklace, neck or cloth.
PARSE_FACE_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 15)
PARSE_BLUR_KSIZE = 101  # the parse mask is blurred twice with a 101x101, sigma 11 Gaussian
PARSE_BLUR_SIGMA = 11
PARSE_BLUR_PASSES = 2
PARSE_BORDER_ZERO_PX = 10  # then a 10-px band on every side is zeroed


@dataclass(frozen=True)
class FaceMasks:
    """The blend masks of one image's restored faces, in ``RestoredFaces`` order: where paste-back writes.

    Checked once, when built (``FaceParser.masks``, or the pipeline around its steps):
    paste-back takes the masks as they are. ``InternalError`` when malformed.
    """

    # (F, 512, 512) float64 in [0, 1] (``face_pixels_to_masks``); a device tensor on the device pixel path
    masks: np.ndarray | torch.Tensor

    def __post_init__(self) -> None:
        if (
            self.masks.ndim != 3
            or tuple(self.masks.shape[1:]) != (FACE_SIZE, FACE_SIZE)
            or element_type(self.masks) != np.float64
        ):
            raise InternalError(
                f"parse masks must be an (F, {FACE_SIZE}, {FACE_SIZE}) float64 array (face_pixels_to_masks), "
                f"got {self.masks.dtype} {self.masks.shape}"
            )

    def __len__(self) -> int:
        return int(self.masks.shape[0])


def face_pixels_to_masks(face_pixels: np.ndarray) -> np.ndarray:
    """(F, 512, 512) bool face-class pixels -> (F, 512, 512) float64 blend masks in [0, 1].

    Spec §6.3 step 9 c–f: 255 on face pixels, two 101x101 σ 11 Gaussian blurs in float64
    (REFLECT_101), a 10-px zero band on every side, / 255.
    """
    masks = np.empty(face_pixels.shape, dtype=np.float64)
    band = PARSE_BORDER_ZERO_PX
    for index, face_pixels_one in enumerate(face_pixels):
        parse_mask = np.where(face_pixels_one, 255.0, 0.0)  # (512, 512) float64
        for _ in range(PARSE_BLUR_PASSES):
            parse_mask = cv2.GaussianBlur(parse_mask, (PARSE_BLUR_KSIZE, PARSE_BLUR_KSIZE), PARSE_BLUR_SIGMA)
        parse_mask[:band, :] = 0
        parse_mask[-band:, :] = 0
        parse_mask[:, :band] = 0
        parse_mask[:, -band:] = 0
        masks[index] = parse_mask / 255.0
    return masks


def reflect_101_filter_matrix(size: int, kernel: np.ndarray) -> np.ndarray:
    """(size, size) float64 ``F`` such that ``F @ x`` filters ``x`` along axis 0 as OpenCV does.

    OpenCV's 1-D filter with ``BORDER_REFLECT_101`` (``...cb|abcd|cb...``, the edge not repeated):
    output ``i`` is the sum over taps ``t`` of ``kernel[t] * x[reflect(i + t - radius)]``. A tap
    that reflects onto a source already in the row adds to it. Needs ``radius < size``.
    """
    radius = len(kernel) // 2
    if radius >= size:
        raise ValueError(f"a {len(kernel)}-tap kernel needs at least {radius + 1} pixels, got {size}")
    rows = np.arange(size)
    matrix = np.zeros((size, size), dtype=np.float64)
    for tap, weight in enumerate(kernel):
        source = np.abs(rows + tap - radius)  # reflected off index 0
        source = np.where(source > size - 1, 2 * (size - 1) - source, source)  # and off index size - 1
        np.add.at(matrix, (rows, source), weight)
    return matrix


def _parse_mask_operator() -> np.ndarray:
    """(512, 512) float64 ``A`` with ``A @ face_pixels @ A.T`` = ``face_pixels_to_masks`` up to rounding.

    Both blurs along one axis are one linear map, ``G @ G`` (``G``: OpenCV's 101-tap σ 11
    kernel with its border, ``reflect_101_filter_matrix``), and the 10-px zero band is its
    first and last rows zeroed; the ×255 of step c and the /255 of step f cancel.
    """
    kernel = cv2.getGaussianKernel(PARSE_BLUR_KSIZE, PARSE_BLUR_SIGMA, cv2.CV_64F)[:, 0]
    one_blur = reflect_101_filter_matrix(FACE_SIZE, kernel)
    operator = one_blur
    for _ in range(PARSE_BLUR_PASSES - 1):
        operator = one_blur @ operator
    band = PARSE_BORDER_ZERO_PX
    operator[:band] = 0.0
    operator[-band:] = 0.0
    operator.flags.writeable = False
    return operator


# computed once, at import: not on the device thread, where OpenCV calls count as host work
PARSE_MASK_OPERATOR = _parse_mask_operator()


def face_pixels_to_masks_tensor(face_pixels: torch.Tensor, operator: torch.Tensor) -> torch.Tensor:
    """``face_pixels_to_masks`` as two matrix products, on ``face_pixels``' device (any torch device).

    (F, 512, 512) bool face-class pixels and the (512, 512) float64 ``PARSE_MASK_OPERATOR``
    on the same device -> (F, 512, 512) float64 masks in [0, 1] there. The same linear map as the host
    stage's two separable blurs, but not the same rounding: within float64 rounding of it,
    not bit-identical (OpenCV's row pass fuses multiply-adds on AVX2 builds, its column pass
    does not; torch has no fused multiply-add that rounds the same on CPU and CUDA), and a
    last-bit change can move a truncated output pixel by one level: baseline keeps the host
    stage (``codeformer.pipeline.pixels_on_device``).
    """
    masks = operator @ face_pixels.to(torch.float64) @ operator.T
    # a whole row of face sums a hair over 1: 1 exactly keeps the face's own value in the blend
    return masks.clamp_(max=1.0)


class FaceParser(FaceBatchNet):
    """Runs a loaded ParseNet over restored faces and turns its labels into blend masks."""

    net: ParseNet
    net_name = "ParseNet"

    def __init__(
        self, net: ParseNet, device: torch.device, batch_size: int = 4, float32_net: ParseNet | None = None
    ) -> None:
        super().__init__(net, device, batch_size, float32_net)
        colormap = torch.zeros(PARSE_CLASSES, dtype=torch.bool)
        colormap[list(PARSE_FACE_CLASSES)] = True
        self._face_classes = colormap.to(device)  # class index -> kept as face
        self._mask_operator = torch.tensor(PARSE_MASK_OPERATOR, device=device)  # (512, 512) float64

    def labels(self, faces: np.ndarray | torch.Tensor, mixed_precision: bool = False) -> np.ndarray:
        """(F, 512, 512, 3) uint8/float64 BGR faces -> (F, 512, 512) bool, True on face classes.

        The input normalisation is the restorer's, which is also ParseNet's official one
        (float32 cast, / 255 in float32; see ``crops_to_tensor``). ``faces`` are
        ``RestoredFaces.faces`` (checked when built), or several images' faces joined by the
        scheduler (on CUDA, already on the device): they are not checked again here.
        """
        if len(faces) == 0:
            return np.zeros((0, FACE_SIZE, FACE_SIZE), dtype=bool)
        return self.labels_tensor(torch.as_tensor(faces), mixed_precision).numpy()

    def labels_tensor(self, faces: torch.Tensor, mixed_precision: bool) -> torch.Tensor:
        """``labels``' device part: (F, 512, 512, 3) BGR faces, host or device -> (F, 512, 512) bool, host."""
        return self.labelling(mixed_precision)(faces)

    def labelling(self, mixed_precision: bool) -> FaceBatchRun:
        """``labels_tensor`` as a run in two halves (``FaceBatchRun``)."""
        return self._parsing(mixed_precision, self._face_pixels)

    def masks_tensor(self, faces: torch.Tensor, mixed_precision: bool, to_host: bool = True) -> torch.Tensor:
        """(F, 512, 512, 3) BGR faces -> (F, 512, 512) float64 blend masks: ParseNet's labels and
        ``face_pixels_to_masks_tensor`` on the parser's device, the labels never on the host.

        Host faces in, host masks out; faces on the device with ``to_host=False`` (the device
        pixel path): the masks stay there.
        """
        return self.masking(mixed_precision, to_host)(faces)

    def masking(self, mixed_precision: bool, to_host: bool = True) -> FaceBatchRun:
        """``masks_tensor`` as a run in two halves (``FaceBatchRun``)."""

        def masks(logits: torch.Tensor) -> torch.Tensor:
            return face_pixels_to_masks_tensor(self._face_pixels(logits), self._mask_operator)

        return self._parsing(mixed_precision, masks, to_host)

    def _face_pixels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, 19, 512, 512) ParseNet logits -> (B, 512, 512) bool on their device, True on face classes.

        First maximum wins, as NumPy's argmax; new memory, taken before the next chunk runs:
        nothing stays in a compiled graph's memory (cudagraphs replays into it).
        """
        return self._face_classes[logits.argmax(dim=1)]

    def _parsing(
        self,
        mixed_precision: bool,
        finish: Callable[[torch.Tensor], torch.Tensor],
        to_host: bool = True,
    ) -> FaceBatchRun:
        """A run of ParseNet over (F, 512, 512, 3) BGR faces: ``finish`` of each chunk's logits, joined."""

        def forward(net: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
            return net(chunk)[0]  # (B, 19, 512, 512) logits

        return FaceBatchRun(self, mixed_precision, forward, finish, to_host)

    def masks(self, faces: RestoredFaces, mixed_precision: bool = False) -> FaceMasks:
        """One image's restored faces -> their (F, 512, 512) float64 blend masks in [0, 1], on the host path.

        Spec §6.3 step 9 a–f: ParseNet labels, then ``face_pixels_to_masks`` on the host (the
        device pixel path makes them with ``masks_tensor``).
        ``mixed_precision`` runs ParseNet under autocast (bfloat16 on CPU, float16 on CUDA).
        """
        masks = FaceMasks(face_pixels_to_masks(self.labels(faces.faces, mixed_precision)))
        logger.debug("parsed %d faces (mixed_precision=%s)", len(faces), mixed_precision)
        return masks
