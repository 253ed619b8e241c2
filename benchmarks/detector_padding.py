"""What padding the detector's input to a fixed size would change: the faces, per photo.

A graph-replaying backend needs fixed shapes. CodeFormer and ParseNet get them by padding
the face batch (a row depends on its own face only); the detector's input has a new width
for each photo shape, and padding it up to a few sizes ("buckets") is the obvious way to
give it fixed shapes. This script measures what that costs in exactness before anyone
builds it: each photo's detector input is run as it is and zero-padded (in the mean-
subtracted domain, what the first convolution's own padding sees) on the right and bottom
up to the next bucket; the padded heads are cut back to the unpadded anchor grid, so that
both go through the same post-processing. Reported per photo: the anchors whose face score
moved, and the largest change of a detected face's box, landmarks and score.

    python benchmarks/detector_padding.py --random-weights       # seed-0 weights
    python benchmarks/detector_padding.py --weights-dir weights  # the release weights

Writes benchmarks/results/detector_padding.json.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import cv2
import harness
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from bench_stages import default_images

from benchmarks.reports import command_line, environment_info, now_iso, portable_path, write_report
from codeformer import weights
from codeformer.stages.detect import PRIOR_STEPS, FaceDetector
from codeformer.stages.prepare import to_working_image

# long sides a bucketed detector input would be padded to (short side 640): 1:1, 4:3, 16:9, 2:1
BUCKETS = (640, 864, 1152, 1280)
MOVED = 1e-4  # a face score that changed by more than this counts as moved


def bucket_for(height: int, width: int) -> tuple[int, int] | None:
    """The padded (h, w) of an (h, w) detector input, or None when its long side is over every bucket."""
    long_side = next((size for size in BUCKETS if size >= max(height, width)), None)
    if long_side is None:
        return None
    return (640, long_side) if height <= width else (long_side, 640)


def unpadded_anchors(heads: tuple[torch.Tensor, ...], padded: tuple[int, int], size: tuple[int, int]):
    """Each (1, P', k) head of a padded input cut to the anchors of the unpadded (h, w) grid, in its order."""
    cut = []
    for head in heads:
        levels, start = [], 0
        for step in PRIOR_STEPS:
            rows, cols = math.ceil(padded[0] / step), math.ceil(padded[1] / step)
            grid = head[0, start : start + rows * cols * 2].reshape(rows, cols, 2, -1)
            levels.append(
                grid[: math.ceil(size[0] / step), : math.ceil(size[1] / step)].reshape(-1, head.shape[-1])
            )
            start += rows * cols * 2
        cut.append(torch.cat(levels)[None])
    return tuple(cut)


def compare(detector: FaceDetector, image: np.ndarray) -> dict[str, object]:
    """One photo: its detector input's size, the bucket, and what padding changed."""
    working, _ = to_working_image(image)
    pixels, scale = detector.input_for(working)
    size = tuple(pixels.shape[:2])
    padded = bucket_for(*size)
    figures: dict[str, object] = {"detector_input": list(size), "bucket": padded and list(padded)}
    if padded is None:
        return figures
    with torch.inference_mode():
        net_input = detector.net_input(pixels)
        heads = detector.net(net_input)
        padded_input = F.pad(net_input, (0, padded[1] - size[1], 0, padded[0] - size[0]))
        padded_heads = unpadded_anchors(detector.net(padded_input), padded, size)
        rows = detector.rows_exact(heads, size, scale)
        padded_rows = detector.rows_exact(padded_heads, size, scale)
    moved = (padded_heads[1][0, :, 1] - heads[1][0, :, 1]).abs()
    faces, padded_faces = rows[rows[:, 15] > 0].numpy(), padded_rows[padded_rows[:, 15] > 0].numpy()
    figures |= {
        "anchors": int(moved.numel()),
        "anchors_moved": int((moved > MOVED).sum()),
        "largest_score_change": float(moved.max()),
        "faces": [len(faces), len(padded_faces)],
    }
    if len(faces) == len(padded_faces) and len(faces):
        difference = np.abs(faces - padded_faces)
        figures |= {
            "box_px": float(difference[:, :4].max()),
            "landmark_px": float(difference[:, 5:15].max()),
            "face_score": float(difference[:, 4].max()),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_weights_arguments(parser)
    parser.add_argument("--images", type=Path, nargs="*", default=None, help="default: the golden photos")
    parser.add_argument(
        "--out", type=Path, default=harness.PROJECT_ROOT / "benchmarks" / "results" / "detector_padding.json"
    )
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        choice = harness.choose_weights(args, stack)
        _, retinaface, _ = weights.load_nets(choice.env.get("CODEFORMER_WEIGHTS_DIR"))
    detector = FaceDetector(retinaface, torch.device("cpu"))
    photos = {}
    for path in args.images or default_images():
        photos[portable_path(path)] = figures = compare(detector, cv2.imread(str(path), cv2.IMREAD_COLOR))
        print(path.name, figures, flush=True)
    report = {"command": command_line(), "when": now_iso(), "environment": environment_info()}
    write_report(report | {"weights": choice.as_report(), "buckets": BUCKETS, "photos": photos}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
