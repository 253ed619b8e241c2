"""Paste-back on torch tensors (docs/reference.md §6.3–§6.5): ``paste_faces``'s recipe on the device.

The same per-face regions, steps and dtypes as ``codeformer.stages.paste`` (the host stage),
written with torch operations so that on a GPU a request's pixel work stays there; the code
runs on any torch device (the tests run it on CPU tensors). Not bit-identical to the host
stage, within ``benchmarks.stage_checks.STAGE_BOUND`` of it:

- warps: ``codeformer.stages.device_warp``'s, each region's pixels with the full-canvas
  warp's coordinates (its ``origin``), as the host does; within rare levels of OpenCV;
- erosions: exact (a minimum does not round);
- the soft-mask blur: OpenCV's float32 kernel and summation order (row taps in order, column
  taps centre first then symmetric pairs, fused multiply-adds), so that a mask's plateaus keep
  OpenCV's value (1 + 1 ulp for some kernels, which decides the truncation of a whole face);
  elsewhere within an ulp or two of float32;
- w_edge: each face's eroded-mask area is summed in float64 on the device and all faces'
  areas come to the host in one download per image (w_edge sets kernel sizes, so the host
  must know it): paste-back runs in two halves, ``plan_paste`` and ``blend_and_resize``, and
  the host reads the areas in between, on the request's thread (``edge_widths``). The host
  stage sums in float32 in canvas order; the two agree unless an area lies within float32
  rounding of a step (400·k² pixels).

Memory, per pixel of a face's region (footprint box plus margin), from the dtypes: about
80 bytes at the peak of a blend with parse masks (float64 blend, canvas patch and soft mask,
float32 face × mask), 90 with float64 (gray) faces, 50 without parse masks; the warps'
temporaries come on top, capped by warping in bands of ``WARP_BAND_PIXELS``. A face's
2x2-eroded mask (4 bytes a pixel) is made twice, for its area and for its blend, and lives
only while each is computed (nothing pixel-sized waits between the two calls); its float
patch (12 or 24 bytes a pixel) lives until no later face overlaps it.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import torch

from codeformer.config import FACE_SIZE
from codeformer.runtime import Download, arrived, downloads, upload
from codeformer.stages.device_warp import fma32, resize_tensor, warp_affine_tensor
from codeformer.stages.regions import Region, blend_edge_width, face_region

MASK_EROSION_SIZE = 2  # the 2x2 erosion of the warped mask (2·upscale, upscale 1)
EMPTY_KERNEL_EROSION_SIZE = 3  # OpenCV erodes with 3x3 when the kernel has no elements (w_edge 0)
SMALL_ROW_KERNEL_TAPS = 5  # OpenCV's float32 row filter sums kernels this short as symmetric pairs
# Pixels per warp_affine_tensor call: its temporaries (float coordinates, int64 indices, four
# taps) take a few hundred bytes a pixel, more than the rest of a face's paste; a huge face
# is warped in bands of rows.
WARP_BAND_PIXELS = 1 << 20


def erode_tensor(mask: torch.Tensor, size: int) -> torch.Tensor:
    """``cv2.erode(mask, np.ones((size, size)))`` of an (h, w) float tensor.

    OpenCV anchors the square at (size // 2, size // 2): output (y, x) is the minimum over rows
    y - size // 2 .. y + size - 1 - size // 2 (columns alike); outside the image counts as
    +inf (the border never erodes). ``size`` 0 (an empty kernel) erodes with 3x3, as OpenCV does.
    """
    size = size or EMPTY_KERNEL_EROSION_SIZE
    before = size // 2
    after = size - 1 - before
    padded = torch.nn.functional.pad(mask, (before, after, before, after), value=float("inf"))
    return _sliding_min(_sliding_min(padded, size, 0), size, 1)


def _sliding_min(values: torch.Tensor, window: int, dim: int) -> torch.Tensor:
    """out[i] = min(values[i : i + window]) along ``dim`` (length n - window + 1).

    Minima over windows of 1, 2, 4, ... by doubling, then two overlapping windows cover
    ``window``: log2(window) passes, whatever the window (w_edge grows with the face).
    """
    mins, span = values, 1
    while 2 * span <= window:
        length = mins.shape[dim] - span
        mins = torch.minimum(mins.narrow(dim, 0, length), mins.narrow(dim, span, length))
        span *= 2
    length = values.shape[dim] - window + 1
    return torch.minimum(mins.narrow(dim, 0, length), mins.narrow(dim, window - span, length))


def _reflect_101_indices(size: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of positions -radius .. size + radius - 1 under BORDER_REFLECT_101 (cb|abcd|cb).

    The reflection is periodic with period 2·(size - 1), so any radius folds in one step
    (OpenCV's borderInterpolate reflects repeatedly; same result).
    """
    positions = torch.arange(-radius, size + radius, device=device)
    if size == 1:
        return torch.zeros_like(positions)
    period = 2 * (size - 1)
    folded = torch.remainder(positions, period)
    return torch.where(folded >= size, period - folded, folded)


def _filter_axis(values: torch.Tensor, kernel: np.ndarray, dim: int, symmetric: bool) -> torch.Tensor:
    """One 1-D pass of OpenCV's float32 separable filter along ``dim``, border REFLECT_101.

    ``symmetric``: centre tap first, then each pair of taps (their float32 sum) outward, as
    OpenCV's symmetric column filter; otherwise taps in order, as its row filter.
    """
    radius = len(kernel) // 2
    size = values.shape[dim]
    padded = values.index_select(dim, _reflect_101_indices(size, radius, values.device))

    def tap(offset: int) -> torch.Tensor:  # values shifted by offset - radius
        return padded.narrow(dim, offset, size)

    # 0-dim CPU tensors act as scalars on any device: no upload, no sync
    weights = torch.from_numpy(kernel)
    if symmetric:
        total = tap(radius) * weights[radius]  # float32 product, rounded once
        for step in range(1, radius + 1):
            total = fma32(weights[radius + step], tap(radius + step) + tap(radius - step), total)
        return total
    total = tap(0) * weights[0]
    for offset in range(1, len(kernel)):
        total = fma32(weights[offset], tap(offset), total)
    return total


def gaussian_blur_tensor(mask: torch.Tensor, ksize: int) -> torch.Tensor:
    """``cv2.GaussianBlur(mask, (ksize, ksize), 0)`` of an (h, w) float32 tensor, ``ksize`` odd.

    cv2.getGaussianKernel's float32 kernel (OpenCV's own for float32 images: fixed tables up
    to 7 taps, σ = 0.3·((ksize − 1)/2 − 1) + 0.8 beyond), rows then columns, REFLECT_101.
    """
    if ksize == 1:
        return mask.clone()  # the kernel is [1]
    kernel = cv2.getGaussianKernel(ksize, 0, cv2.CV_32F)[:, 0]
    rows = _filter_axis(mask, kernel, 1, symmetric=ksize <= SMALL_ROW_KERNEL_TAPS)
    return _filter_axis(rows, kernel, 0, symmetric=True)


def _warp_into_region(face_space: torch.Tensor, inverse_affine: torch.Tensor, region: Region) -> torch.Tensor:
    """A (512, 512) or (512, 512, C) face-space tensor warped into ``region``: (h, w[, C]).

    The region of the full-canvas ``cv2.warpAffine`` (bilinear, border 0), computed for the
    region's pixels only, in bands of rows (``WARP_BAND_PIXELS``): the bands' pixels are the
    canvas warp's too. ``inverse_affine``: (1, 2, 3) float64 on the tensor's device.
    """
    channels_last = face_space if face_space.dim() == 3 else face_space[..., None]
    source = channels_last.permute(2, 0, 1)[None]  # (1, C, 512, 512) view
    width = region.x1 - region.x0
    warped = torch.empty(
        (region.y1 - region.y0, width, source.shape[1]), dtype=face_space.dtype, device=face_space.device
    )
    band_rows = max(1, WARP_BAND_PIXELS // width)
    for top in range(0, warped.shape[0], band_rows):
        rows = min(band_rows, warped.shape[0] - top)
        band = warp_affine_tensor(source, inverse_affine, (rows, width), origin=(region.x0, region.y0 + top))
        warped[top : top + rows] = band[0].permute(1, 2, 0)  # (1, C, rows, w) -> (rows, w, C)
    return warped if face_space.dim() == 3 else warped[..., 0]


@dataclass(frozen=True)
class _Patch:
    """The floating-point canvas values one face's blend left in its region."""

    region: Region
    values: torch.Tensor  # (h, w, 3) float32 or float64


def _overlap(first: Region, second: Region) -> Region:
    return Region(
        max(first.x0, second.x0), max(first.y0, second.y0), min(first.x1, second.x1), min(first.y1, second.y1)
    )


def _read_canvas(
    output: torch.Tensor, patches: list[_Patch], region: Region, dtype: torch.dtype
) -> torch.Tensor:
    """The region of the official floating-point img: ``output``'s levels, under the kept patches in order.

    Every earlier face whose region meets ``region`` still has its patch kept, so the
    truncated levels in ``output`` are covered wherever a float value exists.
    """
    values = output[region.slices].to(dtype)  # exact: uint8 levels are exact in any float
    for patch in patches:
        overlap = _overlap(region, patch.region)
        if not overlap.empty:
            values[overlap.shifted(region).slices] = patch.values[overlap.shifted(patch.region).slices]
    return values


def face_areas(areas: torch.Tensor) -> list[float]:
    """The faces' (F,) float64 eroded-mask areas, arrived on the host (``plan_paste``), as numbers."""
    return areas.tolist()


@dataclass(frozen=True)
class PastePlan:
    """Paste-back's first half, on the device: what its second half (``blend_and_resize``) needs.

    Made by ``plan_paste``; between the two halves the host turns the faces' areas into
    their w_edges (``edge_widths``), which set kernel sizes. Only the regions and the
    transforms are kept across the two calls, no mask: other requests' calls run between
    them, and the memory a face's mask takes is paste-back's own, face by face.
    """

    regions: list[Region]  # each face's region of the canvas (empty: off the canvas)
    affines: torch.Tensor  # (F, 2, 3) float64 face -> image matrices, on the device


def _eroded_mask(affines: torch.Tensor, index: int, region: Region) -> torch.Tensor:
    """Face ``index``'s warped mask, eroded 2x2: (h, w) float32 over its region, on the affines' device."""
    face_mask = torch.ones((FACE_SIZE, FACE_SIZE), dtype=torch.float32, device=affines.device)
    return erode_tensor(_warp_into_region(face_mask, affines[index : index + 1], region), MASK_EROSION_SIZE)


def plan_paste(image: torch.Tensor, inverse_affines: np.ndarray) -> tuple[PastePlan, Download | None]:
    """The faces' regions, and their eroded masks' areas on their way to the host.

    image: (H, W, 3) working image (its size and device); inverse_affines: (F, 2, 3) float64
    on the host (the regions, tensor shapes, come from them). Each area is summed in float64
    on the device and all are copied without blocking (``runtime.downloads``): (F',) for the
    F' faces on the canvas, None when there is none. Nothing here waits for the device.
    """
    inverse_affines = np.asarray(inverse_affines, dtype=np.float64)
    canvas_hw = (int(image.shape[0]), int(image.shape[1]))
    regions = [face_region(inverse_affine, canvas_hw) for inverse_affine in inverse_affines]
    # one upload for all the faces' warps (F, 2, 3), queued without blocking the host
    affines = upload(torch.from_numpy(inverse_affines), image.device)
    areas = [
        _eroded_mask(affines, index, region).sum(dtype=torch.float64)
        for index, region in enumerate(regions)
        if not region.empty
    ]
    return PastePlan(regions, affines), (downloads(torch.stack(areas))[0] if areas else None)


def edge_widths(plan: PastePlan, areas: torch.Tensor | None) -> list[int]:
    """Each face's w_edge from ``plan_paste``'s areas, arrived on the host (0 off the canvas)."""
    arrived_areas = iter(face_areas(areas) if areas is not None else [])
    return [
        0 if region.empty else blend_edge_width(np.float32(next(arrived_areas))) for region in plan.regions
    ]


def _blend_faces(
    image: torch.Tensor,
    restored: torch.Tensor,
    plan: PastePlan,
    w_edges: list[int],
    masks: torch.Tensor | None,
) -> torch.Tensor:
    """``paste_faces`` (docs/reference.md §6.3–§6.6) on tensors of one device, once planned.

    image: (H, W, 3) uint8 BGR working image (not modified).
    restored: (F, 512, 512, 3) uint8 BGR faces, float64 for gray inputs, on the image's device.
    plan, w_edges: ``plan_paste``'s and ``edge_widths``' for these faces on this image.
    masks: (F, 512, 512) float64 parse masks in [0, 1] on the device, or None (§6.4).
    Returns a new (H, W, 3) uint8 tensor on the device.
    """
    regions = plan.regions
    output = image.clone()
    kept: list[_Patch] = []
    for index, region in enumerate(regions):
        if region.empty:
            continue  # nothing on the canvas: the blend leaves img as it is
        inv_mask_erosion = _eroded_mask(plan.affines, index, region)  # the mask plan_paste summed
        inverse_affine = plan.affines[index : index + 1]
        inv_restored = _warp_into_region(restored[index], inverse_affine, region)  # (h, w, 3)
        pasted_face = inv_restored * inv_mask_erosion[..., None]  # float32 (float64 for gray)
        w_edge = w_edges[index]
        inv_mask_center = erode_tensor(inv_mask_erosion, 2 * w_edge)
        inv_soft_mask = gaussian_blur_tensor(inv_mask_center, 2 * w_edge + 1)  # float32
        del inv_restored, inv_mask_erosion, inv_mask_center
        if masks is not None:
            inv_parse_mask = _warp_into_region(masks[index], inverse_affine, region)  # float64
            inv_soft_mask = torch.minimum(inv_parse_mask, inv_soft_mask)  # float64
            del inv_parse_mask
        soft_mask = inv_soft_mask[..., None]
        # the official soft·pasted + (1 − soft)·img, in NumPy's result dtype (img is already
        # that dtype after the first face, or uint8, which promotes to it); the second product
        # and the sum in place, the same roundings with less memory
        dtype = torch.promote_types(soft_mask.dtype, pasted_face.dtype)
        blended = pasted_face * soft_mask
        del pasted_face
        blended += _read_canvas(output, kept, region, dtype).mul_(1 - soft_mask)
        # truncation toward zero, as the official astype; gray faces clipped, not wrapped (paste.py)
        output[region.slices] = blended.clamp(0, 255).to(torch.uint8)
        if any(not _overlap(region, later).empty for later in regions[index + 1 :]):
            kept.append(_Patch(region, blended))
    return output


def blend_and_resize(
    image: torch.Tensor,
    restored: torch.Tensor,
    plan: PastePlan,
    w_edges: list[int],
    masks: torch.Tensor | None,
    output_hw: tuple[int, int],
) -> torch.Tensor:
    """Paste-back's second half: the blend (``_blend_faces``' arguments), then back to the input's (H, W).

    When the working image was enlarged (docs/reference.md §4.1) the pasted image is shrunk
    to ``output_hw`` with INTER_AREA, as the host path's ``cv2.resize``. Returns (H, W, 3)
    uint8 on the device.
    """
    pasted = _blend_faces(image, restored, plan, w_edges, masks)
    if tuple(pasted.shape[:2]) == tuple(output_hw):
        return pasted
    return resize_tensor(pasted, output_hw, cv2.INTER_AREA, channels_last=True)


def paste_and_resize_tensor(
    image: torch.Tensor,
    restored: torch.Tensor,
    inverse_affines: np.ndarray,
    masks: torch.Tensor | None,
    output_hw: tuple[int, int],
) -> torch.Tensor:
    """``Restorer._paste``'s pixel work once the masks exist, both halves on the calling thread.

    ``plan_paste``'s arguments (``inverse_affines``: (F, 2, 3) float64 on the host), then
    ``blend_and_resize``'s: ``restored`` faces, parse ``masks`` or None, the input's
    ``output_hw``. Waits for the areas in between. Returns (H, W, 3) uint8 on the device.
    """
    plan, areas = plan_paste(image, inverse_affines)
    return blend_and_resize(image, restored, plan, edge_widths(plan, arrived(areas)), masks, output_hw)
