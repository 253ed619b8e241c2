"""gpu_check's first part: the figures a short lent GPU must give before anything else.

Issue 30's goals, measured in process on max_speed (the profile they name), once as the nets
are (``safe``) and once optimized with the backend meant for production
(``HEADLINE_BACKEND``: ``inductor-cudagraphs`` on CUDA; ``none`` elsewhere, where compiling
the full nets would eat the budget):

- the latency of a one-face 1 MP request (``megapixel_photo``), p50 of the timed requests;
- host-device synchronisations in one such request (``count_syncs``: torch's sync debug
  mode, one warning per synchronising call; None off CUDA);
- CodeFormer's and ParseNet's ms per call at each face batch a request can send (1, 2, 4 on
  CUDA), as their stage runs them (upload, chunks, one download), and the detector's at a 4:3
  photo's input (and on CUDA an 8:1 panorama's), on the device thread, each with its peak
  device memory above its start (``peak_above_mb``), and the nets' weights (``weights_mb``):
  what made optimized peak at 13.9 GB against safe's 3.7 in the first GPU run;
- peak and reserved device memory and set-up ms (``prepare_optimized``) per configuration;
- verdicts against the goals (``goal_verdicts``), written with the figures as each
  configuration ends.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from benchmarks import summary
from benchmarks.plans import Configuration

HEADLINE_PIXELS = 1_000_000
HEADLINE_FIDELITY = 0.5
# issue 30's goals on one H100 or H200
GOAL_LATENCY_MS = 15.0  # one-face 1 MP max_speed request in process
GOAL_SPEEDUP = 1.5  # optimized against safe, same profile
GOAL_SETUP_MS = 60_000.0  # set-up with compiled graphs
SYNC_WARNING = "synchroniz"  # torch's sync debug warning: "called a synchronizing CUDA operation"
# the detector's input widths timed (short side 640): a 4:3 photo's and an 8:1 panorama's
DETECTOR_WIDTHS = (853, 5120)


def headline_configs(device_type: str) -> list[Configuration]:
    """max_speed safe, then optimized with the production backend for ``device_type``."""
    backend = "inductor-cudagraphs" if device_type == "cuda" else "none"
    return [Configuration("max_speed", "safe", "none"), Configuration("max_speed", "optimized", backend)]


def megapixel_photo(photo: np.ndarray, pixels: int = HEADLINE_PIXELS) -> np.ndarray:
    """(H, W, 3) uint8 ``photo`` resized to about ``pixels`` pixels, aspect kept."""
    height, width = photo.shape[:2]
    scale = math.sqrt(pixels / (height * width))
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(photo, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)


def megapixel_copies(paths: list[Path], folder: Path) -> list[Path]:
    """Each photo resized to about 1 MP (``megapixel_photo``), as a JPG in ``folder``: what
    ``gpu_check.py --megapixel`` sends, the headline's photo size."""
    from codeformer.imageio import encode_jpeg

    copies = []
    for path in paths:
        copy = folder / f"{path.stem}-1mp.jpg"
        photo = cv2.imread(str(path), cv2.IMREAD_COLOR)
        copy.write_bytes(encode_jpeg(megapixel_photo(photo)))
        copies.append(copy)
    return copies


def count_syncs(torch: Any, device: Any, run: Callable[[], object]) -> dict[str, Any] | None:
    """Synchronising CUDA calls made by ``run()`` (any thread): count and the distinct messages.

    torch's sync debug mode warns at each call that makes the host wait for the device
    (``.item()``, ``nonzero``, a blocking copy); None off CUDA, where nothing waits.
    """
    if device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    messages = [
        str(warning.message).splitlines()[0] for warning in caught if SYNC_WARNING in str(warning.message)
    ]
    return {"count": len(messages), "messages": sorted(set(messages))}


def timed_ms(run: Callable[[], object], repeats: int) -> dict[str, Any]:
    """``run()`` once untimed, then ``repeats`` times: the ms summary (``run`` ends with a download)."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1000.0)
    return summary.summarize(times)


def weights_mb(nets: Any) -> dict[str, float]:
    """MiB of each net's parameters and buffers (what one more set of weights costs)."""
    return {
        name: sum(tensor.numel() * tensor.element_size() for tensor in (*net.parameters(), *net.buffers()))
        / 2**20
        for name, net in vars(nets).items()
    }


def peak_above_mb(torch: Any, device: Any, run: Callable[[], object]) -> float | None:
    """MiB of device memory ``run()`` allocated at its peak above what was allocated before it
    (activations, copies, cuDNN workspaces, graph pools); None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def net_timings(restorer: Any, config: Configuration, repeats: int) -> dict[str, Any]:
    """ms per call of CodeFormer (restore) and ParseNet (labels) at each face batch a request
    sends and of the detector at ``DETECTOR_WIDTHS``; each call's peak device memory above its
    start; the MiB of the nets' weights.

    The nets ``config`` runs on (built and warmed by set-up), wrapped as their stages wrap
    them, called on the device thread (CUDA graph trees belong to the thread that recorded them).
    """
    import torch

    from codeformer.config import RequestOptions
    from codeformer.image_sizes import DETECTOR_SHORT_SIDE
    from codeformer.runtime import cuda_numerics
    from codeformer.stages.detect import FaceDetector
    from codeformer.stages.face_batch import face_batch_sizes
    from codeformer.stages.parse import FaceParser
    from codeformer.stages.restore import FaceRestorer

    options = RequestOptions.parse(HEADLINE_FIDELITY, config.profile, config.mode, config.backend)
    mixed_precision = options.profile.mixed_precision and restorer.runtime.mixed_precision
    nets = restorer.scheduler.call(
        restorer.runtime.nets_for, options.stability, config.backend, mixed_precision
    )
    batch, device = restorer.settings.face_batch, restorer.device
    face_restorer = FaceRestorer(nets.codeformer, device, batch, restorer.runtime.safe_nets.codeformer)
    parser = FaceParser(nets.parsenet, device, batch, restorer.runtime.safe_nets.parsenet)
    crops = np.random.default_rng(0).integers(0, 256, (batch, 512, 512, 3), dtype=np.uint8)
    figures: dict[str, Any] = {"weights_mb": weights_mb(nets)}

    def on_device(run: Callable[[], object]) -> tuple[dict[str, Any], float | None]:
        # with the profile's CUDA numerics, as the pipeline runs its device calls
        with cuda_numerics(device, options.profile.mixed_precision):
            return timed_ms(run, repeats), peak_above_mb(torch, device, run)

    calls = {}
    for size in face_batch_sizes(batch):
        faces = crops[:size]
        calls[f"codeformer_batch_{size}"] = partial(
            face_restorer.restore, faces, HEADLINE_FIDELITY, mixed_precision
        )
        calls[f"parsenet_batch_{size}"] = partial(parser.labels, faces, mixed_precision)
    # the detector at a 4:3 photo's input, and on a GPU at an 8:1 panorama's: it grows with the photo
    detector = FaceDetector(nets.retinaface, device)
    for width in DETECTOR_WIDTHS if device.type == "cuda" else DETECTOR_WIDTHS[:1]:
        pixels = torch.full((DETECTOR_SHORT_SIDE, width, 3), 127, dtype=torch.uint8)
        calls[f"retinaface_640x{width}"] = partial(detector.detect_rows, pixels, 1.0)
    for name, call in calls.items():
        timings, peak = restorer.scheduler.call(on_device, call)
        figures[f"{name}_ms"] = timings
        if peak is not None:
            figures[f"{name}_peak_mb"] = peak
    return figures


def goal_verdicts(figures: dict[str, dict[str, Any]], safe: str, optimized: str) -> dict[str, Any]:
    """Each goal with its figure and PASS/FAIL, or None where the figure is missing.

    ``figures``: configuration label -> headline figures; ``safe``/``optimized`` the labels.
    """

    def p50(label: str) -> float | None:
        latency = figures.get(label, {}).get("latency_ms")
        return latency["p50"] if latency and latency.get("count") else None

    safe_ms, optimized_ms = p50(safe), p50(optimized)
    setup_ms = figures.get(optimized, {}).get("setup_ms")
    speedup = safe_ms / optimized_ms if safe_ms and optimized_ms else None

    def verdict(value: float | None, passes: Callable[[float], bool]) -> str | None:
        return None if value is None else ("PASS" if passes(value) else "FAIL")

    return {
        "latency_ms": {
            "value": optimized_ms,
            "goal": f"< {GOAL_LATENCY_MS}",
            "verdict": verdict(optimized_ms, lambda ms: ms < GOAL_LATENCY_MS),
        },
        "speedup": {
            "value": speedup,
            "goal": f">= {GOAL_SPEEDUP}",
            "verdict": verdict(speedup, lambda ratio: ratio >= GOAL_SPEEDUP),
        },
        "setup_ms": {
            "value": setup_ms,
            "goal": f"< {GOAL_SETUP_MS:.0f}",
            "verdict": verdict(setup_ms, lambda ms: ms < GOAL_SETUP_MS),
        },
    }


def headline_line(label: str, figures: dict[str, Any]) -> str:
    """One stdout line for a headline configuration's figures."""
    parts = [f"headline {label}"]
    if "latency_ms" in figures:
        parts.append(f"one-face 1 MP p50={figures['latency_ms']['p50']:.1f} ms faces={figures['faces']}")
    if (syncs := figures.get("syncs_per_request")) is not None:
        parts.append(f"syncs={syncs['count']}")
    if figures.get("setup_ms") is not None:
        parts.append(f"setup={figures['setup_ms']:.0f} ms")
    if figures.get("peak_gpu_mb") is not None:
        parts.append(f"peak {figures['peak_gpu_mb']:.0f} MiB")
    parts += [f"{key}: {figures[key]}" for key in ("error", "not_run") if key in figures]
    return "  ".join(parts)
