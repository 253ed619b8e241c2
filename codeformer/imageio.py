"""Decode uploaded image files to 8-bit BGR arrays, and encode results as JPG.

Decoding goes through Pillow, which lets us read the header (and refuse a huge image)
before any pixel is decoded, and handle every mode explicitly. For ordinary 8-bit RGB
files Pillow and ``cv2.imread`` (what the official pipeline uses) give identical pixels.

What each kind of file becomes:
- EXIF orientation is applied, so the array is upright (and of the upright size).
- Grayscale, palette, CMYK and YCbCr become 3-channel BGR.
- 16-bit samples keep their high byte, as ``cv2.imread(IMREAD_COLOR)`` does.
- Alpha (RGBA, LA, palette transparency) is composited over white.
- Animated files (GIF, WebP, APNG) and multi-page TIFFs: the first frame is used.
"""

from __future__ import annotations

import io
import warnings

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from codeformer.errors import InputError

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO")
JPEG_QUALITY = 95

# We check the pixel count ourselves from the header; Pillow's own bomb check would only
# warn (or raise at twice its default limit) and says nothing about which input it was.
Image.MAX_IMAGE_PIXELS = None


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from any Pillow mode, alpha composited over white."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # high-precision single band: scale to 8 bits like OpenCV's 16->8 reduction (>> 8)
        samples = np.asarray(image)
        if mode == "F":
            gray = np.clip(samples, 0.0, 255.0).astype(np.uint8)
        else:
            gray = (np.clip(samples, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))


def read_size(data: bytes, name: str) -> tuple[Image.Image, int, int]:
    """Open the file lazily (header only); returns (image, width, height) before orientation."""
    if not data:
        raise InputError(f"{name}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd but readable headers
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InputError(
            f"{name}: not a readable image (supported: JPEG, PNG, WebP, BMP, TIFF; first frame of GIF)"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"{name}: cannot read the image header: {exc}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise InputError(
            f"{name}: unsupported image format {image.format}; send JPEG, PNG, WebP, BMP or TIFF"
        )
    width, height = image.size
    return image, width, height


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """Decode file bytes to an upright (H, W, 3) uint8 BGR array.

    Raises ``InputError`` naming ``name`` for empty, unreadable, truncated or oversized
    files. The pixel limit is checked from the header, before pixels are decoded.
    """
    image, width, height = read_size(data, name)
    if width < 1 or height < 1:
        raise InputError(f"{name}: the image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise InputError(
            f"{name}: {width}x{height} is {width * height / 1e6:.1f} megapixels, over the limit of "
            f"{max_pixels / 1e6:.1f} (CODEFORMER_MAX_PIXELS); send a smaller image"
        )
    try:
        image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _to_rgb8(image)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InputError(f"{name}: cannot decode the image (truncated or corrupt?): {exc}") from None
    return np.ascontiguousarray(rgb[..., ::-1])


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    """JPG bytes of an (H, W, 3) uint8 BGR array."""
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} {image.dtype} array as JPG")
    return buffer.tobytes()
