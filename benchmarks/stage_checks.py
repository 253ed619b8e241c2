"""The stages moved to the device against their host versions: the bound, and gpu_check's measurement.

Issue 29's bound for the stages after the nets (fast and max_speed): given the same inputs,
the device stage's output within 1 level (on the 0-255 scale the blend uses) of the host
stage's on at least ``MIN_WITHIN_ONE_LEVEL`` of the values, none further than ``MAX_LEVELS``.
``level_difference`` measures it (tests/test_device_warp.py, test_device_paste.py and
test_device_masks.py hold the stages to it on CPU tensors); ``moved_stages`` times each
moved stage both ways on the photos and reports the difference, so that the first GPU run
checks the bounds on real kernels.

Nothing here imports Cog: gpu_check runs on a bare GPU machine with torch, OpenCV and NumPy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

from benchmarks import summary

MIN_WITHIN_ONE_LEVEL = 0.9999
MAX_LEVELS = 2.0
STAGE_BOUND = {"min_within_one_level": MIN_WITHIN_ONE_LEVEL, "max_levels": MAX_LEVELS}


def level_difference(device_output: np.ndarray, host_output: np.ndarray, scale: float) -> dict[str, Any]:
    """How far ``device_output`` is from ``host_output``, in levels (values x ``scale``; 255 for masks).

    ``max_levels``, ``within_one_level`` (the share of values at most 1 level apart) and
    ``within_bound`` (both inside ``STAGE_BOUND``). Shapes must match.
    """
    if device_output.shape != host_output.shape:
        raise ValueError(f"device output {device_output.shape} and host output {host_output.shape} differ")
    levels = np.abs(device_output.astype(np.float64) - host_output.astype(np.float64)) * scale
    max_levels = float(levels.max()) if levels.size else 0.0
    within_one = float((levels <= 1.0).mean()) if levels.size else 1.0
    within_bound = within_one >= MIN_WITHIN_ONE_LEVEL and max_levels <= MAX_LEVELS
    return {"max_levels": max_levels, "within_one_level": within_one, "within_bound": within_bound}


@dataclass(frozen=True)
class PhotoFaces:
    """One photo as the host pipeline sees it: its working image and its aligned faces."""

    photo: np.ndarray  # (H, W, 3) uint8 BGR
    working: np.ndarray  # (h, w, 3) uint8 BGR, the photo enlarged if small (docs/reference.md §4.1)
    aligned: Any  # codeformer.stages.align.AlignedFaces


def photo_faces(retinaface: Any, device: Any, photos: list[np.ndarray], max_faces: int) -> list[PhotoFaces]:
    """The photos' working images and aligned faces, cut by the host stages."""
    from codeformer.stages.align import align_faces
    from codeformer.stages.detect import FaceDetector
    from codeformer.stages.prepare import to_working_image

    detector = FaceDetector(retinaface, device)
    found = []
    for photo in photos:
        working, _ = to_working_image(photo)
        found.append(PhotoFaces(photo, working, align_faces(working, detector.detect(working, max_faces))))
    return found


def compare_stage(
    host: Callable[[], np.ndarray],
    device: Callable[[], np.ndarray],
    count: int,
    unit: str,
    repeats: int,
    scale: float = 1.0,
) -> dict[str, Any]:
    """One stage both ways: ms per ``unit`` (``count`` of them per call) and the outputs' difference.

    ``host`` and ``device`` compute the stage on the same inputs and return host arrays of one
    shape (the device version ends with its result's download, which waits for the device).
    Each runs once untimed, then ``repeats`` times timed. ``scale``: the output's levels per
    unit value (255 for masks in [0, 1], 1 for pixels).
    """
    report: dict[str, Any] = {"count": count, "unit": unit, "repeats": repeats, "bound": STAGE_BOUND}
    outputs = {}
    for name, stage in (("host", host), ("device", device)):
        outputs[name] = stage()
        per_unit_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            stage()
            per_unit_ms.append((time.perf_counter() - start) * 1000.0 / count)
        report[f"{name}_ms_per_{unit}"] = summary.summarize(per_unit_ms)
    return report | level_difference(outputs["device"], outputs["host"], scale)


def moved_stages(
    retinaface: Any, parsenet: Any, device: Any, found: list[PhotoFaces], repeats: int
) -> dict[str, dict[str, Any]]:
    """Each stage the device pixel path moved, against its host version, on the photos.

    ``detector_input`` (the working image and the detector's copy, per image; with the
    largest landmark shift between the detector's faces on either copy, in px),
    ``crops`` (the alignment warp, per face), ``parse_masks`` (from the labels, per face),
    ``paste`` (paste-back and the final resize, per image, the crops standing for restored
    faces and the host's masks for both). ``found``: ``photo_faces``' output, with a face.
    """
    import torch

    from codeformer.stages.align import warp_crops
    from codeformer.stages.detect import FaceDetector, resize_for_detector
    from codeformer.stages.device_paste import paste_and_resize_tensor
    from codeformer.stages.device_warp import detector_input_tensor, warp_crops_tensor, working_image_tensor
    from codeformer.stages.parse import (
        PARSE_MASK_OPERATOR,
        FaceMasks,
        FaceParser,
        face_pixels_to_masks,
        face_pixels_to_masks_tensor,
    )
    from codeformer.stages.paste import paste_faces
    from codeformer.stages.prepare import to_working_image
    from codeformer.stages.restore import RestoredFaces

    def upload(array: np.ndarray) -> Any:
        return torch.from_numpy(np.ascontiguousarray(array)).to(device)

    photos = [upload(item.photo) for item in found]
    faces = np.concatenate([item.aligned.crops for item in found])  # stand for restored faces in paste
    face_pixels = FaceParser(parsenet, device).labels(faces)  # (F, 512, 512) bool
    face_pixels_on_device = upload(face_pixels)
    operator = torch.tensor(PARSE_MASK_OPERATOR, device=device)
    masks = face_pixels_to_masks(face_pixels)
    bounds = np.cumsum([0] + [len(item.aligned) for item in found])
    per_photo = [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    # per photo, on the device: working image, restored faces, masks
    on_device = [
        (upload(item.working), upload(faces[part]), upload(masks[part]))
        for item, part in zip(found, per_photo, strict=True)
    ]

    def host_inputs() -> np.ndarray:
        inputs = [resize_for_detector(to_working_image(item.photo)[0])[0] for item in found]
        return np.concatenate([pixels.ravel() for pixels in inputs])

    def device_inputs() -> np.ndarray:
        inputs = [detector_input_tensor(working_image_tensor(photo)[0])[0] for photo in photos]
        return torch.cat([pixels.flatten() for pixels in inputs]).cpu().numpy()

    def host_crops() -> np.ndarray:
        return np.concatenate([warp_crops(item.working, item.aligned.affines) for item in found])

    def device_crops() -> np.ndarray:
        crops = [
            warp_crops_tensor(working, item.aligned.affines)
            for (working, _, _), item in zip(on_device, found, strict=True)
        ]
        return torch.cat(crops).cpu().numpy()

    def host_paste() -> np.ndarray:
        pasted = []
        for item, part in zip(found, per_photo, strict=True):
            face_masks = FaceMasks(masks[part])
            image = paste_faces(
                item.working, RestoredFaces(faces[part]), item.aligned.inverse_affines, face_masks
            )
            if image.shape != item.photo.shape:
                image = cv2.resize(image, item.photo.shape[1::-1], interpolation=cv2.INTER_AREA)
            pasted.append(image.ravel())
        return np.concatenate(pasted)

    def device_paste() -> np.ndarray:
        pasted = [
            paste_and_resize_tensor(
                working, restored, item.aligned.inverse_affines, face_masks, item.photo.shape[:2]
            )
            for (working, restored, face_masks), item in zip(on_device, found, strict=True)
        ]
        return torch.cat([image.flatten() for image in pasted]).cpu().numpy()

    detector = FaceDetector(retinaface, device)
    shifts = []
    for item, photo in zip(found, photos, strict=True):
        host_input, scale = resize_for_detector(item.working)
        device_input, _ = detector_input_tensor(working_image_tensor(photo)[0])
        host_rows = detector.detect_rows(torch.from_numpy(host_input), scale)
        device_rows = detector.detect_rows(device_input, scale)
        host_points, device_points = (
            detector.detections(rows, len(item.aligned)).landmarks for rows in (host_rows, device_rows)
        )
        if host_points.shape != device_points.shape:
            shifts.append(float("inf"))  # a face found on one copy only
        elif len(host_points):
            shifts.append(float(np.abs(host_points - device_points).max()))

    return {
        "detector_input": compare_stage(host_inputs, device_inputs, len(found), "image", repeats)
        | {"max_landmark_shift_px": max(shifts, default=0.0)},
        "crops": compare_stage(host_crops, device_crops, len(faces), "face", repeats),
        "parse_masks": compare_stage(
            lambda: face_pixels_to_masks(face_pixels),
            lambda: face_pixels_to_masks_tensor(face_pixels_on_device, operator).cpu().numpy(),
            len(faces),
            "face",
            repeats,
            255.0,
        ),
        "paste": compare_stage(host_paste, device_paste, len(found), "image", repeats),
    }


def stage_line(name: str, report: dict[str, Any]) -> str:
    """One line for stdout: the verdict, both timings and the difference (or the error)."""
    if "error" in report:
        return f"FAIL stage {name}: {report['error']}"
    verdict = "PASS" if report["within_bound"] else "FAIL"
    unit = report["unit"]
    host, device = report[f"host_ms_per_{unit}"]["p50"], report[f"device_ms_per_{unit}"]["p50"]
    shift = report.get("max_landmark_shift_px")
    return (
        f"{verdict} stage {name}: {report['count']} {unit}s, host p50={host:.2f} ms/{unit}, "
        f"device p50={device:.2f} ms/{unit}, max {report['max_levels']:.3g} levels, "
        f"{report['within_one_level']:.4%} within 1 level"
        + ("" if shift is None else f", landmarks within {shift:.3g} px")
    )
