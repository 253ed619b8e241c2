"""Face parsing (spec §6.3 step 9 a–f): ParseNet labels of each restored face -> blend mask.

The masks limit paste-back to skin, features and hair (``FaceMasks``, ``paste_faces``' ``masks``);
the ``max_speed`` profile skips this stage (§6.4).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from codeformer.config import FACE_SIZE
from codeformer.errors import InternalError
from codeformer.nets.parsenet import PARSE_CLASSES, ParseNet
from codeformer.stages.restore import FaceBatchNet, RestoredFaces

logger = logging.getLogger(__name__)

# CelebAMask-HQ classes kept as "face" by the official MASK_COLORMAP (spec §6.3 9c): skin,
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

    masks: np.ndarray  # (F, 512, 512) float64 in [0, 1] (``face_pixels_to_masks``)

    def __post_init__(self) -> None:
        if (
            self.masks.ndim != 3
            or self.masks.shape[1:] != (FACE_SIZE, FACE_SIZE)
            or self.masks.dtype != np.float64
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

    def labels(self, faces: np.ndarray, mixed_precision: bool = False) -> np.ndarray:
        """(F, 512, 512, 3) uint8/float64 BGR faces -> (F, 512, 512) bool, True on face classes.

        The input normalisation is the restorer's, which is also ParseNet's official one
        (float32 cast, / 255 in float32; see ``crops_to_tensor``). ``faces`` are
        ``RestoredFaces.faces`` (checked when built), or several images' faces joined by the
        scheduler: they are not checked again here.
        """
        if len(faces) == 0:
            return np.zeros((0, FACE_SIZE, FACE_SIZE), dtype=bool)
        return self.labels_tensor(torch.from_numpy(faces), mixed_precision).numpy()

    def labels_tensor(self, faces: torch.Tensor, mixed_precision: bool) -> torch.Tensor:
        """``labels``' device part: (F, 512, 512, 3) BGR faces -> (F, 512, 512) bool, both on the host."""

        def forward(net: nn.Module, chunk: torch.Tensor) -> torch.Tensor:
            return net(chunk)[0]  # (B, 19, 512, 512) logits

        def face_classes(logits: torch.Tensor) -> torch.Tensor:
            # first maximum wins, as NumPy's argmax; new memory, taken before the next chunk runs:
            # nothing stays in a compiled graph's memory (cudagraphs replays into it)
            return self._face_classes[logits.argmax(dim=1)]

        with torch.inference_mode():
            # the one device->host copy
            return self._run(faces, mixed_precision, forward, face_classes).cpu()

    def masks(self, faces: RestoredFaces, mixed_precision: bool = False) -> FaceMasks:
        """One image's restored faces -> their (F, 512, 512) float64 blend masks in [0, 1].

        Spec §6.3 step 9 a–f: ParseNet labels, then ``face_pixels_to_masks``.
        ``mixed_precision`` runs ParseNet under autocast (bfloat16 on CPU, float16 on CUDA).
        """
        masks = FaceMasks(face_pixels_to_masks(self.labels(faces.faces, mixed_precision)))
        logger.debug("parsed %d faces (mixed_precision=%s)", len(faces), mixed_precision)
        return masks
