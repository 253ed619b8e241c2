"""Face detection (docs/reference.md §3): RetinaFace on a 640-short-side copy, then the official
post-processing.

Every step follows the official ``get_face_landmarks_5`` with resize 640 and eye-distance
threshold 5, quirks included: the result rows are divided by the nominal scale (score
column too), and the eye-distance filter reads the wrong columns. Tensors stay on the
detector's device until the final (F, 15) rows, which are copied to the host once: the
device part (``FaceDetector.detect_rows``) takes and returns host tensors and makes exactly
those two copies, so that it runs on fake CUDA tensors in the tests.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torchvision

from codeformer.errors import InternalError
from codeformer.image_sizes import detector_input_size
from codeformer.nets.retinaface import RetinaFace
from codeformer.runtime import divide_exactly, upload

logger = logging.getLogger(__name__)

DETECTOR_MEAN_BGR = (104.0, 117.0, 123.0)  # subtracted from the BGR pixels, no /255
PRIOR_STEPS = (8, 16, 32)  # cfg_re50 steps, one per pyramid level
PRIOR_MIN_SIZES = ((16, 32), (64, 128), (256, 512))  # cfg_re50 min_sizes: two anchors per location
VARIANCES = (0.1, 0.2)  # centre/landmark offsets, log sizes
CONFIDENCE_THRESHOLD = 0.8  # detect_faces' default, which CodeFormer's helper relies on (strict >)
NMS_IOU_THRESHOLD = 0.4
EYE_DISTANCE_THRESHOLD = 5.0  # rows whose (buggy) eye distance is under this are dropped
PRIOR_CACHE_SIZE = 16  # detector input shapes whose priors are kept
# Off the CPU, the candidates over the threshold are taken as a fixed number of the
# best-scoring anchors (no data-dependent size, so no wait for the device); an image with
# more candidates than this runs the exact steps again. Tens of anchors fire per face.
MAX_CANDIDATES = 2048


@dataclass(frozen=True)
class Detections:
    """Faces of one working image, in detection order (descending score).

    Coordinates are in working-image pixels exactly as the official helper stores them:
    the detector's rows divided by the nominal scale 640 / min(h, w).
    """

    boxes: np.ndarray  # (F, 4) float32 x1, y1, x2, y2
    scores: np.ndarray  # (F,) float32 face probability, also divided by the nominal scale (quirk)
    landmarks: np.ndarray  # (F, 5, 2) float32 (x, y): image-left eye, other eye, nose, left/right mouth
    dropped: int = 0  # faces found beyond the ``max_faces`` cap (the lowest-scoring ones)

    def __len__(self) -> int:
        return int(self.boxes.shape[0])

    @classmethod
    def empty(cls) -> Detections:
        return cls(
            boxes=np.zeros((0, 4), np.float32),
            scores=np.zeros((0,), np.float32),
            landmarks=np.zeros((0, 5, 2), np.float32),
        )


def resize_for_detector(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(detector input, nominal scale): INTER_AREA when shrinking, INTER_LINEAR when enlarging."""
    height, width = image.shape[:2]
    scale, new_height, new_width = detector_input_size(height, width)
    if (new_height, new_width) == (height, width):
        return image, scale
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (new_width, new_height), interpolation=interpolation), scale


def prior_boxes(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(P, 4) float32 anchors (cx, cy, w, h), normalised by the input size (§3 step 4).

    Order: level (stride 8, 16, 32), then row, column, min size, matching the heads'
    concatenation. Computed in float64 (only +, * and / of exact small integers, correctly
    rounded on every device that has float64), then stored as float32 like the official
    list-to-Tensor conversion. Built on ``device``: nothing to upload.
    """
    levels = []
    for step, min_sizes in zip(PRIOR_STEPS, PRIOR_MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        centres = torch.arange(max(rows, cols), dtype=torch.float64, device=device) + 0.5
        centre_x = divide_exactly(centres[:cols] * step, width)  # (cols,)
        centre_y = divide_exactly(centres[:rows] * step, height)  # (rows,)
        # the two min sizes as arange(2) * (second - first) + first: made on the device
        first, second = min_sizes
        sizes = torch.arange(2, dtype=torch.float64, device=device) * (second - first) + first
        grid = torch.broadcast_tensors(
            centre_x[None, :, None],
            centre_y[:, None, None],
            divide_exactly(sizes, width)[None, None, :],
            divide_exactly(sizes, height)[None, None, :],
        )
        levels.append(torch.stack(grid, dim=-1).reshape(-1, 4))  # (rows * cols * 2, 4)
    return torch.cat(levels).to(torch.float32)


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(K, 4) offsets and priors -> (K, 4) corners x1, y1, x2, y2, normalised (§3 step 5)."""
    centres = priors[:, :2] + loc[:, :2] * VARIANCES[0] * priors[:, 2:]
    sizes = priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCES[1])
    top_left = centres - sizes / 2
    return torch.cat([top_left, top_left + sizes], dim=1)


def decode_landmarks(landms: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """(K, 10) offsets and priors -> (K, 10) points x0, y0, ..., x4, y4, normalised (§3 step 6)."""
    offsets = landms.reshape(-1, 5, 2)
    points = priors[:, None, :2] + offsets * VARIANCES[0] * priors[:, None, 2:]
    return points.reshape(-1, 10)


def to_pixels(coords: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """(K, 2n) normalised x, y pairs -> (K, 2n) pixels: x times ``width``, y times ``height``.

    Python-number factors: float32 products equal to the official multiply by a float32
    [w, h, ...] tensor, without building that tensor on the host and uploading it.
    """
    pairs = coords.unflatten(1, (-1, 2))  # (K, n, 2)
    return torch.stack((pairs[..., 0] * width, pairs[..., 1] * height), dim=-1).flatten(1)


class FaceDetector:
    """Runs RetinaFace on one working image and applies the official post-processing.

    ``net`` must already hold its weights, sit on ``device`` and be float32; the detector
    always runs in float32 (the official half=False), whatever the pipeline's precision.
    """

    def __init__(self, net: RetinaFace, device: torch.device) -> None:
        self.net = net.eval()
        self.device = torch.device(device)
        self._mean = torch.tensor(DETECTOR_MEAN_BGR, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        # priors depend only on the detector input size; shared by concurrent requests
        self._priors: OrderedDict[tuple[int, int], torch.Tensor] = OrderedDict()
        self._priors_lock = threading.Lock()

    def priors(self, height: int, width: int) -> torch.Tensor:
        """(P, 4) float32 priors for an h' x w' detector input, on the device, cached."""
        key = (height, width)
        with self._priors_lock:
            if key in self._priors:
                self._priors.move_to_end(key)
                return self._priors[key]
        priors = prior_boxes(height, width, self.device)
        with self._priors_lock:
            self._priors[key] = priors
            while len(self._priors) > PRIOR_CACHE_SIZE:
                self._priors.popitem(last=False)
        return priors

    def net_input(self, pixels: torch.Tensor) -> torch.Tensor:
        """(h', w', 3) uint8 BGR detector input -> (1, 3, h', w') float32, BGR minus the mean, on the device.

        The one upload of ``pixels`` (none when they are on the device already). The permuted
        view keeps the channels-last strides the official numpy-transpose input had; on CPU
        that also selects the faster channels-last convolutions.
        """
        pixels_on_device = upload(pixels, self.device)  # (h', w', 3) uint8
        return pixels_on_device.permute(2, 0, 1).unsqueeze(0).to(torch.float32) - self._mean

    def detect_rows(self, pixels: torch.Tensor, scale: float) -> torch.Tensor:
        """(h', w', 3) uint8 BGR detector input -> (F', 16) float32 rows on the host.

        Each row: box x1, y1, x2, y2, score, then the five (x, y) landmarks, all divided by
        the nominal ``scale`` (official quirk), and a 16th column, 1 for a face, 0 for a row
        the filters drop (``detections`` drops them on the host); descending score. One
        upload of ``pixels`` (none when they are on the detector's device already: the device
        pixel path), one download of the rows; everything between stays on the
        detector's device, and off the CPU only NMS waits for it (``rows_without_waiting``).
        """
        with torch.inference_mode():
            heads = self.net(self.net_input(pixels))  # loc (1, P, 4), conf (1, P, 2), landms (1, P, 10)
            if self.device.type == "cpu":
                return self.rows_exact(heads, pixels.shape[:2], scale)
            return self.rows_without_waiting(heads, pixels.shape[:2], scale)

    def rows_exact(
        self, heads: tuple[torch.Tensor, ...], size: tuple[int, int], scale: float
    ) -> torch.Tensor:
        """The official post-processing step by step: (F, 15) rows on the host.

        Its candidate selection (``nonzero``) and eye-distance filter (a boolean index) have
        sizes only the data knows, so on a GPU each waits for the device.
        """
        loc, conf, landms = heads
        face_scores = conf[0, :, 1]  # (P,)
        keep = torch.nonzero(face_scores > CONFIDENCE_THRESHOLD).squeeze(1)
        scores = face_scores[keep]
        order = torch.argsort(scores, descending=True, stable=True)
        keep, scores = keep[order], scores[order]
        return self._kept_rows(loc, landms, keep, scores, size, scale).cpu()

    def rows_without_waiting(
        self, heads: tuple[torch.Tensor, ...], size: tuple[int, int], scale: float
    ) -> torch.Tensor:
        """``rows_exact``'s rows with one wait for the device (NMS's) and one download.

        The candidates are the ``MAX_CANDIDATES`` best anchors in the official order (a
        stable descending sort, anchors under the threshold last), the ones under the
        threshold carried along with a score of -1, which NMS visits after every real one,
        so they suppress none; the filters become a column of the rows, applied on the host.
        When every candidate is over the threshold, there may be more: ``rows_exact`` runs.
        """
        loc, conf, landms = heads
        face_scores = conf[0, :, 1]  # (P,)
        ranked = torch.where(face_scores > CONFIDENCE_THRESHOLD, face_scores, -1.0)
        keep = torch.sort(ranked, descending=True, stable=True).indices[:MAX_CANDIDATES]  # (K,)
        rows = self._kept_rows(loc, landms, keep, ranked[keep], size, scale)  # (F', 16)
        if len(keep) < MAX_CANDIDATES:  # every anchor was a candidate
            return rows.cpu()
        # one copy for the rows and for whether the last candidate was over the threshold
        flat = torch.cat([rows.flatten(), (ranked[keep[-1:]] > 0).to(rows.dtype)]).cpu()
        if bool(flat[-1]):
            logger.info("more than %d candidate faces: detecting them step by step", MAX_CANDIDATES)
            return self.rows_exact(heads, size, scale)
        return flat[:-1].view(-1, 16)

    def _kept_rows(
        self,
        loc: torch.Tensor,
        landms: torch.Tensor,
        keep: torch.Tensor,
        scores: torch.Tensor,
        size: tuple[int, int],
        scale: float,
    ) -> torch.Tensor:
        """(F', 16) rows NMS keeps of the candidates ``keep`` (anchor indices, descending
        ``scores``): 15 official columns and a 16th, 1 where the row is a face (score over
        the threshold and eye distance not under its threshold), else 0."""
        height, width = size
        priors = self.priors(height, width)[keep]
        boxes = to_pixels(decode_boxes(loc[0, keep], priors), width, height)  # (K, 4) input pixels
        points = to_pixels(decode_landmarks(landms[0, keep], priors), width, height)  # (K, 10)

        kept = torchvision.ops.nms(boxes, scores, NMS_IOU_THRESHOLD)  # descending score order
        rows = torch.cat([boxes[kept], scores[kept, None], points[kept]], dim=1)  # (F', 15)
        # The whole row, score included, is divided by the nominal scale (a float32
        # divide, as NumPy does it).
        rows = divide_exactly(rows, scale)

        # Official off-by-one: columns 6..9 are (le_y, re_x, re_y, nose_x), so this is
        # sqrt((le_y - re_y)^2 + (re_x - nose_x)^2), not the eye distance.
        eye_distance = torch.sqrt((rows[:, 6] - rows[:, 8]) ** 2 + (rows[:, 7] - rows[:, 9]) ** 2)
        is_face = ~(eye_distance < EYE_DISTANCE_THRESHOLD) & (scores[kept] > CONFIDENCE_THRESHOLD)
        return torch.cat([rows, is_face[:, None].to(rows.dtype)], dim=1)

    def detect(self, image: np.ndarray, max_faces: int | None = None) -> Detections:
        """Faces of one uint8 BGR working image (h, w, 3) (as ``input_for`` takes it), at most ``max_faces``.

        When more are found, the highest-scoring ``max_faces`` are kept and ``dropped``
        says how many were not. The three steps are public so that a caller can run the
        device part elsewhere (``codeformer.pipeline`` hands it to its scheduler).
        """
        pixels, scale = self.input_for(image)
        return self.detections(self.detect_rows(pixels, scale), max_faces)

    @staticmethod
    def input_for(image: np.ndarray) -> tuple[torch.Tensor, float]:
        """Host part before the net: the (h', w', 3) uint8 detector input as a host tensor, and its scale.

        ``image`` is a C-contiguous, writable (h, w, 3) uint8 BGR array, as ``Restorer.restore``
        checks (and copies, where needed) each input once; it is not checked again here.
        """
        resized, scale = resize_for_detector(image)
        return torch.from_numpy(resized), scale

    @staticmethod
    def detections(rows: torch.Tensor, max_faces: int | None = None) -> Detections:
        """Host part after the net: ``detect_rows``' (F', 16) rows -> ``Detections`` of the
        rows marked as faces, at most ``max_faces``."""
        if max_faces is not None and max_faces < 1:
            raise InternalError(f"max_faces must be a positive number of faces or None, got {max_faces}")
        result = rows.numpy()
        result = result[result[:, 15] > 0, :15]  # (F, 15), descending score
        dropped = 0
        if max_faces is not None and len(result) > max_faces:
            dropped = len(result) - max_faces
            result = result[:max_faces]
        if dropped:
            logger.info(
                "kept the %d highest-scoring faces of %d; raise max_faces to keep more",
                max_faces,
                len(result) + dropped,
            )
        return Detections(
            boxes=np.ascontiguousarray(result[:, 0:4]),
            scores=np.ascontiguousarray(result[:, 4]),
            landmarks=np.ascontiguousarray(result[:, 5:15]).reshape(-1, 5, 2),
            dropped=dropped,
        )
