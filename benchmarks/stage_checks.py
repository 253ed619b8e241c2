"""The stages moved to the device against their host versions: the bound, and gpu_check's measurement.

Issue 29's bound for the stages after the nets (fast and max_speed): given the same inputs,
the device stage's output within 1 level (on the 0-255 scale the blend uses) of the host
stage's on at least ``MIN_WITHIN_ONE_LEVEL`` of the values, none further than ``MAX_LEVELS``.
``level_difference`` measures it (tests/test_device_masks.py holds the stages to it on CPU
tensors); ``parse_mask_stage`` times the parse masks both ways on the photos' faces and
reports the difference, so that the first GPU run checks the bound on real kernels.

Nothing here imports Cog: gpu_check runs on a bare GPU machine with torch, OpenCV and NumPy.
"""

from __future__ import annotations

import time
from typing import Any

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


def photo_face_crops(retinaface: Any, device: Any, photos: list[np.ndarray], max_faces: int) -> np.ndarray:
    """The photos' aligned (F, 512, 512, 3) uint8 face crops, as the pipeline cuts them."""
    from codeformer.stages.align import align_faces
    from codeformer.stages.detect import FaceDetector
    from codeformer.stages.prepare import to_working_image

    detector = FaceDetector(retinaface, device)
    crops = []
    for photo in photos:
        working, _ = to_working_image(photo)
        crops.append(align_faces(working, detector.detect(working, max_faces)).crops)
    return np.concatenate(crops)


def parse_mask_stage(parsenet: Any, device: Any, faces: np.ndarray, repeats: int) -> dict[str, Any]:
    """The parse masks of ``faces``' ParseNet labels on the host and on ``device``: ms per face, difference.

    The labels are computed once (``FaceParser.labels``); then, after one untimed call each,
    ``repeats`` timed calls of the host stage (``face_pixels_to_masks``) and of the device
    stage from labels on the device to masks on the host (``face_pixels_to_masks_tensor``
    and its one download, which waits for the device). ``faces``: (F, 512, 512, 3), F >= 1.
    """
    import torch

    from codeformer.stages.parse import (
        PARSE_MASK_OPERATOR,
        FaceParser,
        face_pixels_to_masks,
        face_pixels_to_masks_tensor,
    )

    face_pixels = FaceParser(parsenet, device).labels(faces)  # (F, 512, 512) bool
    face_pixels_on_device = torch.from_numpy(face_pixels).to(device)
    operator = torch.tensor(PARSE_MASK_OPERATOR, device=device)

    def on_device() -> np.ndarray:
        return face_pixels_to_masks_tensor(face_pixels_on_device, operator).cpu().numpy()

    def on_host() -> np.ndarray:
        return face_pixels_to_masks(face_pixels)

    report: dict[str, Any] = {"faces": len(faces), "repeats": repeats, "bound": STAGE_BOUND}
    for name, stage in (("host", on_host), ("device", on_device)):
        masks = stage()
        per_face_ms = []
        for _ in range(repeats):
            start = time.perf_counter()
            stage()
            per_face_ms.append((time.perf_counter() - start) * 1000.0 / len(faces))
        report[f"{name}_ms_per_face"] = summary.summarize(per_face_ms)
        report[f"{name}_masks"] = masks
    difference = level_difference(report.pop("device_masks"), report.pop("host_masks"), 255.0)
    return report | difference


def stage_line(name: str, report: dict[str, Any]) -> str:
    """One line for stdout: the verdict, both timings and the difference (or the error)."""
    if "error" in report:
        return f"FAIL stage {name}: {report['error']}"
    verdict = "PASS" if report["within_bound"] else "FAIL"
    host, device = report["host_ms_per_face"]["p50"], report["device_ms_per_face"]["p50"]
    return (
        f"{verdict} stage {name}: {report['faces']} faces, host p50={host:.2f} ms/face, "
        f"device p50={device:.2f} ms/face, max {report['max_levels']:.3g} levels, "
        f"{report['within_one_level']:.4%} within 1 level"
    )
