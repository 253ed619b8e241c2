"""Build the sample photos in data/ from the public-domain photographs bundled with scikit-image.

    python data/make_samples.py [--count 100] [--out data]

writes 1.jpg ... N.jpg, the same bytes on every run: varied sizes (256 to 2048 px on the
long side), crops, several faces per image by composition, blur, noise, JPEG artefacts and
grayscale. scikit-image is a development dependency (requirements-dev.txt), not a runtime one.
"""

from __future__ import annotations

import argparse
from functools import cache
from pathlib import Path

import cv2
import numpy as np
from skimage import data as skdata

# photographs with people first: they are drawn more often
PEOPLE = ("astronaut", "camera")
SCENES = ("coffee", "chelsea", "rocket", "cat")


@cache
def _load(name: str) -> np.ndarray:
    image = getattr(skdata, name)()
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=2)
    return np.ascontiguousarray(image[..., :3][..., ::-1])  # RGB -> BGR


def _crop(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    height, width = image.shape[:2]
    keep = rng.uniform(0.6, 1.0)
    crop_h, crop_w = int(height * keep), int(width * rng.uniform(0.6, 1.0))
    top, left = rng.integers(0, height - crop_h + 1), rng.integers(0, width - crop_w + 1)
    return image[top : top + crop_h, left : left + crop_w]


def _compose(tiles: list[np.ndarray]) -> np.ndarray:
    """Side by side at a common height: one photo with several people in it."""
    height = min(tile.shape[0] for tile in tiles)
    scaled = [cv2.resize(t, (max(1, t.shape[1] * height // t.shape[0]), height)) for t in tiles]
    return np.concatenate(scaled, axis=1)


def make_sample(index: int) -> tuple[np.ndarray, int]:
    """(BGR image, JPEG quality) of sample ``index``; depends on the index alone."""
    rng = np.random.default_rng(1000 + index)
    pool = list(PEOPLE) * 3 + list(SCENES)
    tiles = [_crop(_load(pool[rng.integers(len(pool))]), rng) for _ in range(rng.choice([1, 1, 2, 3]))]
    image = _compose(tiles)
    long_side = int(rng.integers(256, 2049))
    factor = long_side / max(image.shape[:2])
    size = (max(1, round(image.shape[1] * factor)), max(1, round(image.shape[0] * factor)))
    image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_CUBIC)
    if rng.random() < 0.3:
        kernel = int(rng.choice([3, 5, 7]))
        image = cv2.GaussianBlur(image, (kernel, kernel), 0)
    if rng.random() < 0.3:
        noise = rng.normal(0.0, rng.uniform(3, 12), image.shape)
        image = np.clip(image + noise, 0, 255).astype(np.uint8)
    if rng.random() < 0.2:
        gray = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
        image = cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)
    quality = int(rng.integers(30, 96))
    return image, quality


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for index in range(1, args.count + 1):
        image, quality = make_sample(index)
        cv2.imwrite(str(args.out / f"{index}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        print(f"{index}.jpg {image.shape[1]}x{image.shape[0]} q{quality}")


if __name__ == "__main__":
    main()
