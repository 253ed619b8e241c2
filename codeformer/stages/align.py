"""Alignment (docs/reference.md §4.2-4.4, §6.1): five landmarks -> similarity transform -> 512 x 512 crop.

The transforms are estimated with OpenCV's robust LMEDS fit and the crops warped with
OpenCV's fixed-point bilinear warp, as the official helper does: both have quirks (a
landmark can be rejected as an outlier; 1/32-pixel coordinate quantisation) that a
re-implementation would not reproduce.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from codeformer.config import FACE_SIZE
from codeformer.errors import CodeFormerError, InternalError
from codeformer.stages.detect import Detections
from codeformer.stages.face_batch import check_face_batch

# Where the five landmarks of an FFHQ-aligned 512 x 512 face sit (x, y): image-left eye,
# other eye, nose tip, left and right mouth corners. With face size 512 and crop ratio
# (1, 1) the official helper uses it unscaled and unshifted.
FFHQ_TEMPLATE_512 = np.array(
    [
        [192.98138, 239.94708],
        [318.90277, 240.1936],
        [256.63416, 314.01935],
        [201.26117, 371.41043],
        [313.08905, 371.15118],
    ],
    dtype=np.float64,
)
FFHQ_TEMPLATE_512.setflags(write=False)
CROP_BORDER_BGR = (135, 133, 132)  # fill outside the image, in the image's channel order (B, G, R)


class AlignmentError(CodeFormerError):
    """No similarity transform could be fitted to a face's landmarks."""


@dataclass(frozen=True)
class AlignedFaces:
    """The aligned crops of one working image and the transforms between image and crop.

    Checked once, when built (``align_faces`` builds it): restore and paste-back take the
    crops and the inverse transforms as they are. ``InternalError`` when a field has the
    wrong shape or type, or a face cannot be mapped back (a transform of zero size).
    """

    crops: np.ndarray | torch.Tensor  # (F, 512, 512, 3) uint8 BGR; on the device pixel path a device tensor
    affines: np.ndarray  # (F, 2, 3) float64, working image -> crop
    inverse_affines: np.ndarray  # (F, 2, 3) float64, crop -> working image

    def __post_init__(self) -> None:
        check_face_batch(self.crops, "crops", (np.uint8,))
        for name, transforms in (("affines", self.affines), ("inverse_affines", self.inverse_affines)):
            if transforms.shape != (len(self), 2, 3):
                raise InternalError(
                    f"{name} must be ({len(self)}, 2, 3), one per face, got {transforms.shape}"
                )
        inverse = self.inverse_affines
        determinants = inverse[:, 0, 0] * inverse[:, 1, 1] - inverse[:, 0, 1] * inverse[:, 1, 0]
        if not np.all(np.isfinite(inverse)) or np.any(np.abs(determinants) < 1e-12):
            raise InternalError(
                "inverse_affines must be finite and invertible (a face of non-zero size), "
                f"got determinants {determinants.tolist()}"
            )

    def __len__(self) -> int:
        return int(self.crops.shape[0])


def estimate_affines(landmarks: np.ndarray) -> np.ndarray:
    """(F, 5, 2) float32 landmarks -> (F, 2, 3) float64 similarity transforms image -> crop.

    ``landmarks`` are ``Detections.landmarks``, (F, 5, 2) as ``FaceDetector.detections``
    builds them; not checked again here. ``cv2.estimateAffinePartial2D`` with LMEDS and
    OpenCV's defaults (reprojection threshold 3, 2000 iterations, confidence 0.99, 10
    refinement steps). Its RNG has a fixed seed, so the fit is deterministic.
    """
    landmarks = np.asarray(landmarks, dtype=np.float32)
    affines = np.zeros((landmarks.shape[0], 2, 3), dtype=np.float64)
    for index, points in enumerate(landmarks):
        affine, _inliers = cv2.estimateAffinePartial2D(points, FFHQ_TEMPLATE_512, method=cv2.LMEDS)
        if affine is None:
            raise AlignmentError(
                f"face {index}: no similarity transform fits its landmarks {points.tolist()} "
                "(degenerate or non-finite points); drop this face before aligning"
            )
        affines[index] = affine
    return affines


def warp_crops(image: np.ndarray, affines: np.ndarray) -> np.ndarray:
    """Warp (h, w, 3) uint8 BGR ``image`` with each affine -> (F, 512, 512, 3) uint8 crops."""
    crops = np.empty((len(affines), FACE_SIZE, FACE_SIZE, image.shape[2]), dtype=image.dtype)
    for index, affine in enumerate(affines):
        crops[index] = cv2.warpAffine(
            image,
            affine,
            (FACE_SIZE, FACE_SIZE),
            flags=cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=CROP_BORDER_BGR,
        )
    return crops


def invert_affines(affines: np.ndarray) -> np.ndarray:
    """(F, 2, 3) image -> crop transforms -> (F, 2, 3) float64 crop -> image transforms."""
    inverses = np.zeros((len(affines), 2, 3), dtype=np.float64)
    for index, affine in enumerate(affines):
        inverses[index] = cv2.invertAffineTransform(np.asarray(affine, dtype=np.float64))
    return inverses


def align_faces(image: np.ndarray, detections: Detections) -> AlignedFaces:
    """Estimate, warp and invert for every detected face of the working ``image``."""
    affines = estimate_affines(detections.landmarks)
    return AlignedFaces(
        crops=warp_crops(image, affines),
        affines=affines,
        inverse_affines=invert_affines(affines),
    )
