"""The official pipeline's way of computing, rebuilt on our nets: an oracle for tests, a yardstick for timing.

Same numbers as our ``baseline`` (the parity tests prove that), computed the way the
official helper does it (docs/reference.md): priors rebuilt in Python for every photo,
post-processing in NumPy, one face per CodeFormer and ParseNet forward, and paste-back by
five whole-canvas OpenCV passes per face. ``test_paste.py`` uses ``reference_canvas`` as the
plain transcription that the region-local paste must equal; ``benchmarks/bench_stages.py``
times ``run`` as its "official" row (importing it as ``tests.official_recipe``).
"""

from __future__ import annotations

import itertools
import math
import time

import cv2
import numpy as np
import torch
import torchvision

from codeformer.pipeline import to_gray_faces
from codeformer.runtime import Nets
from codeformer.stages import detect
from codeformer.stages.align import estimate_affines, invert_affines, warp_crops
from codeformer.stages.face_batch import crops_to_tensor
from codeformer.stages.parse import PARSE_FACE_CLASSES
from codeformer.stages.prepare import is_gray, to_working_image
from codeformer.stages.restore import tensor_to_faces

FACE = 512
PARSE_BLUR = ((101, 101), 11)


def reference_parse_mask(logits: np.ndarray) -> np.ndarray:
    """(19, 512, 512) ParseNet logits -> (512, 512) float64 mask (docs/reference.md §6.3 9 b–f)."""
    labels = logits.argmax(axis=0)
    parse_mask = np.where(np.isin(labels, list(PARSE_FACE_CLASSES)), 255.0, 0.0)
    parse_mask = cv2.GaussianBlur(parse_mask, *PARSE_BLUR)
    parse_mask = cv2.GaussianBlur(parse_mask, *PARSE_BLUR)
    border = 10
    parse_mask[:border, :] = 0
    parse_mask[-border:, :] = 0
    parse_mask[:, :border] = 0
    parse_mask[:, -border:] = 0
    return parse_mask / 255.0


def reference_canvas(
    image: np.ndarray, faces: np.ndarray, inverse_affines: np.ndarray, parse_masks: np.ndarray | None
) -> np.ndarray:
    """Spec §6.2–§6.3 (§6.4 without parse masks) over the whole canvas, before the final cast."""
    h_up, w_up = image.shape[:2]
    img = image
    for index, restored_face in enumerate(faces):
        inverse_affine = inverse_affines[index]
        inv_restored = cv2.warpAffine(restored_face, inverse_affine, (w_up, h_up))
        mask = np.ones((FACE, FACE), dtype=np.float32)
        inv_mask = cv2.warpAffine(mask, inverse_affine, (w_up, h_up))
        inv_mask_erosion = cv2.erode(inv_mask, np.ones((2, 2), np.uint8))
        pasted_face = inv_mask_erosion[:, :, None] * inv_restored
        total_face_area = np.sum(inv_mask_erosion)
        w_edge = int(total_face_area**0.5) // 20
        erosion_radius = w_edge * 2
        inv_mask_center = cv2.erode(inv_mask_erosion, np.ones((erosion_radius, erosion_radius), np.uint8))
        blur_size = w_edge * 2
        inv_soft_mask = cv2.GaussianBlur(inv_mask_center, (blur_size + 1, blur_size + 1), 0)
        inv_soft_mask = inv_soft_mask[:, :, None]
        if parse_masks is not None:
            inv_soft_parse_mask = cv2.warpAffine(parse_masks[index], inverse_affine, (w_up, h_up), flags=3)
            inv_soft_parse_mask = inv_soft_parse_mask[:, :, None]
            fuse_mask = (inv_soft_parse_mask < inv_soft_mask).astype("int")
            inv_soft_mask = inv_soft_parse_mask * fuse_mask + inv_soft_mask * (1 - fuse_mask)
        img = inv_soft_mask * pasted_face + (1 - inv_soft_mask) * img
    return img


def reference_paste(
    image: np.ndarray, faces: np.ndarray, inverse_affines: np.ndarray, parse_masks: np.ndarray | None
) -> np.ndarray:
    """The full-canvas recipe with the official §6.5 cast: uint8 by truncation, uint16 if max > 256."""
    img = reference_canvas(image, faces, inverse_affines, parse_masks)
    if np.max(img) > 256:
        return img.astype(np.uint16)
    return img.astype(np.uint8)


def python_priors(height: int, width: int) -> torch.Tensor:
    """Anchors built the official way: nested Python loops per level, every photo anew."""
    anchors: list[float] = []
    for step, min_sizes in zip(detect.PRIOR_STEPS, detect.PRIOR_MIN_SIZES, strict=True):
        rows, cols = math.ceil(height / step), math.ceil(width / step)
        for i, j in itertools.product(range(rows), range(cols)):
            for min_size in min_sizes:
                anchors += [
                    (j + 0.5) * step / width,
                    (i + 0.5) * step / height,
                    min_size / width,
                    min_size / height,
                ]
    return torch.tensor(anchors).view(-1, 4)


def official_detect(net: torch.nn.Module, working: np.ndarray) -> np.ndarray:
    """(F, 5, 2) landmarks the official way: batch 1, Python priors, NumPy post-processing."""
    resized, scale = detect.resize_for_detector(working)
    height, width = resized.shape[:2]
    tensor = torch.from_numpy(resized.astype(np.float32).transpose(2, 0, 1).copy())
    tensor -= torch.tensor(detect.DETECTOR_MEAN_BGR).view(3, 1, 1)
    with torch.no_grad():
        loc, conf, landms = net(tensor[None])
    priors = python_priors(height, width)
    boxes = detect.decode_boxes(loc[0], priors) * torch.tensor([width, height] * 2)
    points = detect.decode_landmarks(landms[0], priors) * torch.tensor([width, height] * 5)
    scores = conf[0, :, 1].numpy()
    keep = np.where(scores > detect.CONFIDENCE_THRESHOLD)[0]
    order = scores[keep].argsort()[::-1]
    keep = keep[order]
    rows = np.hstack([boxes.numpy()[keep], scores[keep, None], points.numpy()[keep]]).astype(np.float32)
    kept = torchvision.ops.nms(
        torch.from_numpy(rows[:, :4]), torch.from_numpy(rows[:, 4]), detect.NMS_IOU_THRESHOLD
    )
    rows = rows[kept.numpy()] / scale
    landmarks = []
    for row in rows:
        # the official eye-distance filter, with its column bug (docs/reference.md §3 step 12)
        if np.sqrt((row[6] - row[8]) ** 2 + (row[7] - row[9]) ** 2) >= detect.EYE_DISTANCE_THRESHOLD:
            landmarks.append(row[5:15].reshape(5, 2))
    return np.array(landmarks, np.float32).reshape(-1, 5, 2)


def run(nets: Nets, image: np.ndarray, fidelity: float = 0.5) -> tuple[np.ndarray, dict[str, float]]:
    """The official pipeline on one BGR photo; returns (working-size output, stage -> ms)."""
    timings: dict[str, float] = {}

    def lap(stage: str, start: float) -> float:
        now = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + (now - start) * 1000.0
        return now

    start = time.perf_counter()
    gray = is_gray(image)
    working, _ = to_working_image(image)
    landmarks = official_detect(nets.retinaface, working)
    start = lap("detect", start)
    affines = estimate_affines(landmarks)
    crops = warp_crops(working, affines)
    start = lap("align", start)
    restored = []
    with torch.no_grad():
        for crop in crops:
            out = nets.codeformer(crops_to_tensor(crop[None], torch.device("cpu")), w=fidelity, adain=True)[0]
            restored.append(tensor_to_faces(out)[0])
    faces = np.array(restored, np.uint8).reshape(-1, FACE, FACE, 3)
    if gray:
        faces = to_gray_faces(faces)
    start = lap("restore", start)
    masks = []
    with torch.no_grad():
        for face in faces:
            face_input = torch.from_numpy(
                (face[..., ::-1] / 255.0).astype(np.float32).transpose(2, 0, 1).copy()
            )
            logits = nets.parsenet((face_input[None] - 0.5) / 0.5)[0]
            masks.append(reference_parse_mask(logits[0].numpy()))
    output = reference_paste(working, faces, invert_affines(affines), np.array(masks).reshape(-1, FACE, FACE))
    lap("parse+paste", start)
    return output, timings
