"""OpenCV's pixel operations of the host stages, in plain torch, for the device path (issue 29).

On a GPU a request's pixel work runs on the device, on one upload of the image. These
functions reproduce the ``cv2`` calls of ``prepare.to_working_image``,
``detect.resize_for_detector`` and ``align.warp_crops`` on tensors of any device, each
within a level of OpenCV on all but rare values (``benchmarks.stage_checks.STAGE_BOUND``);
the host stages stay the CPU path. The stages themselves (``working_image_tensor``,
``detector_input_tensor``, ``warp_crops_tensor``) take and return (H, W, 3) uint8 BGR
tensors, as their host versions take arrays; landmark fitting stays on the host.

Sampling follows the OpenCV code path each dtype takes (see ``codeformer/stages/warp.py``):

- ``warpAffine`` of uint8 and float32 images (OpenCV >= 4.11 kernels): float32 source
  coordinates ``fma(M0, x, f32(f32(y·M1) + M2))``, unquantised fractions, and the bilinear
  blend as three float32 fused multiply-adds, rounded half to even for uint8;
- ``warpAffine`` of float64 images: the fixed-point path, coordinates quantised to 1/32 px
  (INTER_TAB_SIZE 32) and bilinear weights from the quantised fractions.

Either way a tap outside the source takes the border value. float32 fused multiply-adds
are computed in float64 and rounded once to float32 (exact but for rare double roundings).
OpenCV computes the last (width mod SIMD lanes) columns of each row with scalar code whose
coordinates can differ in the last float32 bit; the body's recipe is used for them too, so
there a float32 output can differ by a small fraction of a level and a uint8 one, rarely, by 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch

from codeformer.config import FACE_SIZE
from codeformer.image_sizes import WORKING_MIN_SIDE, detector_input_size, working_size
from codeformer.runtime import upload
from codeformer.stages.align import CROP_BORDER_BGR
from codeformer.stages.prepare import CHANNEL_PAIRS

WARP_DTYPES = (torch.uint8, torch.float32, torch.float64)
FIXED_POINT_BITS = 10  # OpenCV's AB_BITS: the fixed-point warp's accumulators are in 1/1024 px
TABLE_BITS = 5  # INTER_BITS: the fixed-point warp samples at 1/32 px


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """float32 ``a·b + c`` with one rounding, as a fused multiply-add: float32 operands, float32 result."""
    return (a.double() * b.double() + c.double()).float()


def invert_affines(matrices: torch.Tensor) -> torch.Tensor:
    """(N, 2, 3) float64 -> (N, 2, 3) float64 inverses, with ``cv2.invertAffineTransform``'s arithmetic.

    A singular matrix gives zeros, as OpenCV's does.
    """
    m = matrices.to(torch.float64)
    determinant = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    inverse_determinant = torch.where(determinant != 0, 1.0 / determinant, torch.zeros_like(determinant))
    a11, a22 = m[:, 1, 1] * inverse_determinant, m[:, 0, 0] * inverse_determinant
    a12, a21 = -m[:, 0, 1] * inverse_determinant, -m[:, 1, 0] * inverse_determinant
    b1 = -a11 * m[:, 0, 2] - a12 * m[:, 1, 2]
    b2 = -a21 * m[:, 0, 2] - a22 * m[:, 1, 2]
    return torch.stack([torch.stack([a11, a12, b1], 1), torch.stack([a21, a22, b2], 1)], 1)


def _output_grid(
    out_hw: tuple[int, int], origin: tuple[int, int], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(h,) and (w,) output pixel indices on the canvas: the rows and columns cv2 computes coordinates for."""
    (height, width), (x0, y0) = out_hw, origin
    ys = torch.arange(y0, y0 + height, dtype=dtype, device=device)
    xs = torch.arange(x0, x0 + width, dtype=dtype, device=device)
    return ys, xs


def _float_coordinates(
    inverse: torch.Tensor, out_hw: tuple[int, int], origin: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, h, w) float32 source x and y of every output pixel, as the float32 warp kernels compute them."""
    matrix = inverse.to(torch.float32)  # (N, 2, 3): the kernels round the inverse to float32
    ys, xs = _output_grid(out_hw, origin, torch.float32, inverse.device)
    coordinates = []
    for row in range(2):
        row_const = ys[None, :] * matrix[:, row, 1, None] + matrix[:, row, 2, None]  # (N, h) float32
        coordinates.append(fma32(matrix[:, row, 0, None, None], xs[None, None, :], row_const[:, :, None]))
    return coordinates[0], coordinates[1]


def _fixed_coordinates(
    inverse: torch.Tensor, out_hw: tuple[int, int], origin: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, h, w) int64 source x and y of every output pixel in 1/32 px, as the fixed-point warp computes them.

    Per column round(M0·x·1024), per row round((M1·y + M2)·1024) + 16 (half a 1/32 step),
    summed and shifted down to 1/32 px.
    """
    scale = float(1 << FIXED_POINT_BITS)
    round_delta = 1 << (FIXED_POINT_BITS - TABLE_BITS - 1)
    ys, xs = _output_grid(out_hw, origin, torch.float64, inverse.device)
    coordinates = []
    for row in range(2):
        column_part = torch.round(inverse[:, row, 0, None] * xs[None, :] * scale).long()  # (N, w)
        row_part = torch.round(
            (inverse[:, row, 1, None] * ys[None, :] + inverse[:, row, 2, None]) * scale
        ).long()
        total = row_part[:, :, None] + round_delta + column_part[:, None, :]  # (N, h, w) in 1/1024 px
        coordinates.append(torch.div(total, 1 << (FIXED_POINT_BITS - TABLE_BITS), rounding_mode="floor"))
    return coordinates[0], coordinates[1]


def _border_tensor(border_value: float | Sequence[float], channels: int, like: torch.Tensor) -> torch.Tensor:
    """(C,) border in ``like``'s dtype and device (saturated for uint8, as cv2 saturates its Scalar).

    Filled on the device, one channel at a time: nothing to upload.
    """
    values = (
        [float(border_value)] * channels if np.isscalar(border_value) else [float(v) for v in border_value]
    )
    if len(values) != channels:
        raise ValueError(f"border_value has {len(values)} values for {channels} channels")
    if like.dtype == torch.uint8:
        values = [min(max(round(value), 0), 255) for value in values]
    border = torch.empty(channels, dtype=like.dtype, device=like.device)
    for channel, value in enumerate(values):
        border[channel].fill_(value)
    return border


def _taps(
    images: torch.Tensor, matrices_count: int, ix: torch.Tensor, iy: torch.Tensor, border: torch.Tensor
) -> list[torch.Tensor]:
    """The four bilinear taps (x, y), (x+1, y), (x, y+1), (x+1, y+1) of each output pixel.

    ``images`` (B, C, H, W), B == N or 1; ``ix``, ``iy`` (N, h, w) int64 top-left taps.
    Returns four (N, h, w, C) tensors in ``images``' dtype; a tap outside the image is ``border``.
    """
    batch, channels, height, width = images.shape
    flat = images.permute(0, 2, 3, 1).reshape(batch * height * width, channels)  # a view for NHWC memory
    image_offset = (
        torch.arange(matrices_count, device=images.device)[:, None, None] * (height * width)
        if batch > 1
        else 0
    )
    taps = []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        x, y = ix + dx, iy + dy
        inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
        index = y.clamp(0, height - 1) * width + x.clamp(0, width - 1) + image_offset
        taps.append(torch.where(inside[..., None], flat[index], border))
    return taps


def warp_affine_tensor(
    images: torch.Tensor,
    matrices: torch.Tensor | np.ndarray,
    out_hw: tuple[int, int],
    border_value: float | Sequence[float] = 0.0,
    origin: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """``cv2.warpAffine(image, M, (w, h), INTER_LINEAR, BORDER_CONSTANT, border_value)`` for a batch.

    ``images``: (B, C, H, W) uint8, float32 or float64, B == N (one image per matrix) or
    B == 1 (one image shared by the N matrices); an (H, W, C) image's ``permute(2, 0, 1)[None]``
    is taken without a copy. ``matrices``: (N, 2, 3) forward transforms, source -> output, as
    cv2 takes them (inverted here with cv2's arithmetic, in float64). ``border_value``: one
    number for every channel, or C of them (unlike cv2's scalar, which fills channel 0 only).
    ``origin``: (x, y) of the output's top-left pixel on a larger canvas: the output is that
    window of the canvas warp, with the canvas warp's coordinate rounding (a matrix translated
    to the window rounds differently: up to 1/32 px apart on the fixed-point path).
    Host matrices are uploaded (``runtime.upload``); nothing else crosses to or from the host.
    Returns (N, C, h, w) in ``images``' dtype and device, channels-last in memory.
    """
    if images.dim() != 4 or images.dtype not in WARP_DTYPES:
        raise ValueError(
            f"images must be (B, C, H, W) uint8, float32 or float64, got {images.dtype} {tuple(images.shape)}"
        )
    matrices = upload(torch.as_tensor(matrices, dtype=torch.float64), images.device)
    count = matrices.shape[0]
    if matrices.shape[1:] != (2, 3) or images.shape[0] not in (1, count):
        raise ValueError(
            f"matrices must be (N, 2, 3) for images (N or 1, C, H, W), got {tuple(matrices.shape)} "
            f"for {tuple(images.shape)}"
        )
    height, width = out_hw
    channels = images.shape[1]
    border = _border_tensor(border_value, channels, images)
    inverse = invert_affines(matrices)
    if images.dtype == torch.float64:
        fixed_x, fixed_y = _fixed_coordinates(inverse, out_hw, origin)
        table_size = 1 << TABLE_BITS
        ix, iy = (
            torch.div(fixed_x, table_size, rounding_mode="floor"),
            torch.div(fixed_y, table_size, rounding_mode="floor"),
        )
        alpha = ((fixed_x - ix * table_size).double() / table_size)[..., None]  # (N, h, w, 1)
        beta = ((fixed_y - iy * table_size).double() / table_size)[..., None]
        p00, p01, p10, p11 = _taps(images, count, ix, iy, border)
        # OpenCV's table weights, then the weighted sum in float64 in its order
        warped = (
            p00 * ((1 - alpha) * (1 - beta))
            + p01 * (alpha * (1 - beta))
            + p10 * ((1 - alpha) * beta)
            + p11 * (alpha * beta)
        )
    else:
        source_x, source_y = _float_coordinates(inverse, out_hw, origin)
        floor_x, floor_y = torch.floor(source_x), torch.floor(source_y)
        alpha, beta = (source_x - floor_x)[..., None], (source_y - floor_y)[..., None]  # (N, h, w, 1) float32
        # far outside the image every tap is border: clamp before converting, so that nothing overflows
        ix = floor_x.clamp(-2, images.shape[3] + 1).long()
        iy = floor_y.clamp(-2, images.shape[2] + 1).long()
        p00, p01, p10, p11 = (tap.float() for tap in _taps(images, count, ix, iy, border))
        top = fma32(alpha, p01 - p00, p00)
        bottom = fma32(alpha, p11 - p10, p10)
        warped = fma32(beta, bottom - top, top)
        if images.dtype == torch.uint8:
            warped = warped.round().clamp(0, 255)
    return warped.to(images.dtype).view(count, height, width, channels).permute(0, 3, 1, 2)


# cv2.resize's fixed-point INTER_LINEAR for uint8: weights in 1/2048 (INTER_RESIZE_COEF_BITS 11)
RESIZE_COEF_BITS = 11
AREA_MIN_FRACTION = 1e-3  # computeResizeAreaTab ignores a source pixel covered less than this


def _linear_taps(
    source_size: int, output_size: int, scale: float, columns: bool, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_out, 2) int64 source indices and int32 weights in 1/2048 of cv2's INTER_LINEAR along one axis.

    ``scale`` is source pixels per output pixel. OpenCV's recipe: the source position
    f32((d + 0.5)·scale − 0.5), its floor and fraction, weights (1 − f, f) rounded to
    1/2048. Past the first or last pixel, columns take that pixel with weight (1, 0); rows
    keep their weights and clip both indices to it.
    """
    position = ((torch.arange(output_size, dtype=torch.float64, device=device) + 0.5) * scale - 0.5).float()
    first = torch.floor(position)
    fraction = position - first
    first = first.long()
    if columns:
        clamped = (first < 0) | (first >= source_size - 1)
        fraction = torch.where(clamped, torch.zeros_like(fraction), fraction)
    index = torch.stack([first, first + 1], dim=1).clamp(0, source_size - 1)
    one = float(1 << RESIZE_COEF_BITS)
    weights = torch.stack([torch.round((1 - fraction) * one), torch.round(fraction * one)], dim=1)
    return index, weights.to(torch.int32)


def _area_taps(
    source_size: int, output_size: int, scale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(n_out, K) int64 source indices and float32 weights of cv2's INTER_AREA shrink along one axis.

    Output pixel d covers source [d·scale, (d + 1)·scale); each source pixel weighs its
    covered fraction over the cell's width (``computeResizeAreaTab``), in ascending source
    order (the order OpenCV sums in). Unused taps weigh 0 and point at pixel 0.
    """
    start = torch.arange(output_size, dtype=torch.float64, device=device) * scale  # fsx1
    end = start + scale
    cell_width = torch.clamp(source_size - start, max=scale)
    last = torch.floor(end).clamp(max=source_size - 1)  # sx2
    first = torch.minimum(torch.ceil(start), last)  # sx1
    taps = int(np.ceil(scale)) + 2
    offsets = torch.arange(
        -1, taps - 1, dtype=torch.float64, device=device
    )  # source first - 1 .. first + taps - 2
    source = first[:, None] + offsets[None, :]  # (n_out, K)
    whole = (source >= first[:, None]) & (source < last[:, None])
    weights = torch.where(whole, 1.0 / cell_width[:, None], 0.0)
    head = first - start
    weights[:, 0] = torch.where(head > AREA_MIN_FRACTION, head / cell_width, 0.0)
    tail = end - last
    tail_weight = torch.where(
        tail > AREA_MIN_FRACTION, torch.minimum(tail.clamp(max=1.0), cell_width) / cell_width, 0.0
    )
    weights = torch.where(source == last[:, None], tail_weight[:, None], weights)
    # float32 weights, as OpenCV stores them; taps outside the source weigh nothing
    weights = weights.float()
    inside = (source >= 0) & (source < source_size) & (weights != 0)
    return torch.where(inside, source, 0.0).long(), torch.where(inside, weights, 0.0)


def _weighted_taps(
    values: torch.Tensor, dim: int, index: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Sum over k of ``values`` gathered at ``index[:, k]`` along ``dim`` (-1 or -2) times ``weights[:, k]``.

    One tap at a time, in tap order, so that memory stays at the size of the output.
    """
    total = None
    for tap in range(index.shape[1]):
        tap_weights = weights[:, tap] if dim == -1 else weights[:, tap, None]
        term = values.index_select(dim, index[:, tap]).to(weights.dtype) * tap_weights
        total = term if total is None else total + term
    assert total is not None
    return total


def _resize_linear(image: torch.Tensor, out_hw: tuple[int, int], scales: tuple[float, float]) -> torch.Tensor:
    """cv2's INTER_LINEAR of a uint8 (..., H, W) tensor: fixed-point rows, then its SIMD vertical blend.

    Rows are blended exactly in 1/2048 (int32); the vertical blend is OpenCV's SIMD one,
    ((row >> 4)·b >> 16) per row, summed and rounded off its last 2 bits.
    """
    height, width = image.shape[-2:]
    column_index, column_weights = _linear_taps(width, out_hw[1], scales[1], True, image.device)
    row_index, row_weights = _linear_taps(height, out_hw[0], scales[0], False, image.device)
    rows = _weighted_taps(image, -1, column_index, column_weights)  # (..., H, w) int32, in 1/2048
    blended = None
    for tap in range(2):
        term = ((rows.index_select(-2, row_index[:, tap]) >> 4) * row_weights[:, tap, None]) >> 16
        blended = term if blended is None else blended + term
    assert blended is not None
    return ((blended + 2) >> 2).clamp(0, 255).to(torch.uint8)


def _resize_area(image: torch.Tensor, out_hw: tuple[int, int], scales: tuple[float, float]) -> torch.Tensor:
    """cv2's INTER_AREA shrink of a uint8 (..., H, W) tensor.

    Integer ratios take OpenCV's fast path (block sums: halved sides round half up, larger
    blocks round sum·f32(1/area) half to even); other ratios weigh each source pixel by its
    covered fraction, rows first, in float32, and round half to even.
    """
    height, width = image.shape[-2:]
    integer_scales = [round(scale) for scale in scales]
    if all(
        abs(scale - whole) < np.finfo(np.float64).eps
        for scale, whole in zip(scales, integer_scales, strict=True)
    ):
        block_y, block_x = integer_scales
        out_height, out_width = out_hw
        blocks = image[..., : out_height * block_y, : out_width * block_x].to(torch.int32)
        sums = blocks.unflatten(-1, (out_width, block_x)).sum(-1).unflatten(-2, (out_height, block_y)).sum(-2)
        if (block_y, block_x) == (2, 2):
            return ((sums + 2) >> 2).to(torch.uint8)
        reciprocal = float(np.float32(1.0 / (block_x * block_y)))  # OpenCV's float32 1/area
        return (sums.float() * reciprocal).round().clamp(0, 255).to(torch.uint8)
    column_index, column_weights = _area_taps(width, out_hw[1], scales[1], image.device)
    row_index, row_weights = _area_taps(height, out_hw[0], scales[0], image.device)
    rows = _weighted_taps(image, -1, column_index, column_weights)  # (..., H, w) float32
    return _weighted_taps(rows, -2, row_index, row_weights).round().clamp(0, 255).to(torch.uint8)


def resize_tensor(
    image: torch.Tensor,
    out_hw: tuple[int, int],
    interpolation: int,
    factors: tuple[float, float] | None = None,
    channels_last: bool = False,
) -> torch.Tensor:
    """``cv2.resize`` of a uint8 (..., H, W) tensor to (..., h, w): INTER_LINEAR or INTER_AREA (shrinking).

    ``factors`` (fy, fx): the factors of a cv2 call with dsize (0, 0), which maps pixels by
    them rather than by output / input size; by default (h / H, w / W), as for a dsize call.
    Any leading dimensions (e.g. channels of an HWC image's ``permute(2, 0, 1)``) are kept.
    ``channels_last``: ``image`` is (H, W, C) instead, and so is the result, contiguous like
    an array cv2 returns.
    """
    planes = image.permute(2, 0, 1) if channels_last else image
    if planes.dtype != torch.uint8 or planes.dim() < 2:
        raise ValueError(f"image must be a uint8 (..., H, W) tensor, got {image.dtype} {tuple(image.shape)}")
    height, width = planes.shape[-2:]
    if factors is None:
        factors = (out_hw[0] / height, out_hw[1] / width)
    scales = (1.0 / factors[0], 1.0 / factors[1])  # source pixels per output pixel, as cv2 computes them
    if interpolation == cv2.INTER_LINEAR:
        resized = _resize_linear(planes, out_hw, scales)
    elif interpolation == cv2.INTER_AREA and min(scales) >= 1:
        resized = _resize_area(planes, out_hw, scales)
    else:
        raise ValueError(
            f"interpolation must be cv2.INTER_LINEAR, or cv2.INTER_AREA to shrink; got {interpolation} "
            f"for source pixels per output pixel {scales}"
        )
    return resized.permute(1, 2, 0).contiguous() if channels_last else resized


def working_image_tensor(image: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``prepare.to_working_image`` of an (H, W, 3) uint8 tensor: ((h, w, 3) uint8 working image, factor).

    The image itself and factor 1.0 when its short side is already 512 or more; else the
    factor-based INTER_LINEAR enlargement, which maps pixels by the factor itself.
    """
    height, width = image.shape[:2]
    size = working_size(height, width)
    if size == (height, width):
        return image, 1.0
    factor = WORKING_MIN_SIDE / min(height, width)
    return resize_tensor(image, size, cv2.INTER_LINEAR, (factor, factor), channels_last=True), factor


def gray_sums_tensor(image: torch.Tensor) -> torch.Tensor:
    """(6,) int64 on ``image``'s device: Σd and Σd² of the three channel differences d of (H, W, 3) uint8.

    Integer sums, exact on any device; ``prepare.is_gray_from_sums`` decides from them on the
    host, after one small download (the device pixel path's gray test: no pixel-sized copy).
    Temporaries: one int16 and one int32 plane at a time, 6 bytes a pixel.
    """
    sums = []
    for a, b in CHANNEL_PAIRS:
        difference = image[..., a].to(torch.int16) - image[..., b]  # (H, W) int16, in [-255, 255]
        squares = difference.to(torch.int32).square()  # at most 65025: int32 is exact
        sums += [difference.sum(dtype=torch.int64), squares.sum(dtype=torch.int64)]
    return torch.stack(sums)


def detector_input_tensor(image: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``FaceDetector.input_for`` on ``image``'s device: ((h', w', 3) uint8 detector input, nominal scale).

    ``image``: the (h, w, 3) uint8 BGR working image. As ``detect.resize_for_detector``:
    INTER_AREA when shrinking, INTER_LINEAR when enlarging, to the truncated size. The result
    goes to ``FaceDetector.detect_rows`` as it is: a tensor already on the detector's device
    is not uploaded again (``runtime.upload``).
    """
    height, width = image.shape[:2]
    scale, new_height, new_width = detector_input_size(height, width)
    if (new_height, new_width) == (height, width):
        return image, scale
    interpolation = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    return resize_tensor(image, (new_height, new_width), interpolation, channels_last=True), scale


def warp_crops_tensor(image: torch.Tensor, affines: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``align.warp_crops`` on ``image``'s device: (h, w, 3) uint8 BGR and (F, 2, 3) float64 affines
    (working image -> crop, ``align.estimate_affines``) -> (F, 512, 512, 3) uint8 crops."""
    crops = warp_affine_tensor(image.permute(2, 0, 1)[None], affines, (FACE_SIZE, FACE_SIZE), CROP_BORDER_BGR)
    return crops.permute(0, 2, 3, 1)  # channels-last in memory: contiguous (F, 512, 512, 3)
