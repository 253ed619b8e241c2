"""The working image's gray test (docs/reference.md §4.1): OpenCV sums decide exactly as the
official np.var formula."""

from __future__ import annotations

import numpy as np
import pytest

from codeformer.stages import prepare
from codeformer.stages.prepare import GRAY_THRESHOLD, is_gray


def official_gray_score(image: np.ndarray) -> float:
    """The official formula, written out: mean np.var of the int16 channel differences."""
    b, g, r = (image[..., c].astype(np.int16) for c in range(3))
    return float(np.var(b - g) + np.var(g - r) + np.var(r - b)) / 3.0


def nearly_gray(rng: np.random.Generator, shape: tuple[int, int], spread: int, offset: int = 0) -> np.ndarray:
    """A gray base with per-channel noise of +-``spread`` levels, one channel shifted by ``offset``."""
    base = rng.integers(0, 200, shape)
    channels = [base + rng.integers(-spread, spread + 1, shape) for _ in range(3)]
    channels[1] = channels[1] + offset
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def test_fast_score_matches_the_official_formula() -> None:
    rng = np.random.default_rng(3)
    for trial in range(60):
        shape = (int(rng.integers(2, 400)), int(rng.integers(2, 400)))
        # a large channel offset with little spread is the worst case for E[d²] − E[d]²
        image = nearly_gray(rng, shape, spread=trial % 6, offset=int(rng.choice([0, 55])))
        if trial % 3 == 0:
            image = image[::2, 1::3]  # a strided view, as a caller may pass
        official = official_gray_score(image)
        assert prepare._fast_gray_score(image) == pytest.approx(official, rel=1e-12, abs=1e-9)
        assert is_gray(image) == (official <= GRAY_THRESHOLD)


def test_a_score_on_the_threshold_is_decided_by_the_official_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the margin, the fast score's last bits could disagree with np.var's: NumPy decides."""
    image = np.zeros((2, 2, 3), np.uint8)
    image[0, 0, 0] = 8  # the b-g and r-b differences vary: each variance is 12, their mean 8
    assert official_gray_score(image) == 8.0
    assert is_gray(image, threshold=8.0)
    # a fast score a hair over the threshold must not decide
    monkeypatch.setattr(prepare, "_fast_gray_score", lambda image: 8.0 + 1e-9)
    assert is_gray(image, threshold=8.0)
    monkeypatch.setattr(prepare, "_fast_gray_score", lambda image: 8.0 + 1e-3)
    assert not is_gray(image, threshold=8.0)


def test_single_channel_and_gray_images_are_gray() -> None:
    rng = np.random.default_rng(4)
    plane = rng.integers(0, 256, (50, 60), dtype=np.uint8)
    assert is_gray(plane)
    assert is_gray(plane[..., None])
    assert is_gray(np.repeat(plane[..., None], 3, axis=2))
    assert not is_gray(rng.integers(0, 256, (50, 60, 3), dtype=np.uint8))
