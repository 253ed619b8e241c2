"""Decode uploaded image files to 8-bit BGR arrays, and encode results as JPG.

Decoding goes through Pillow, which lets us read the header (and refuse a huge image)
before any pixel is decoded, and handle every mode explicitly. For ordinary 8-bit RGB
files Pillow and ``cv2.imread`` (what the official pipeline uses) give identical pixels.

What each kind of file becomes (``PIXEL_RULES`` below; the README has the same table):
- EXIF orientation is applied, so the array is upright (and of the upright size). HEIC and
  AVIF are turned by the rotation and mirroring their container declares (``irot``/``imir``,
  where encoders put a photo's EXIF orientation), once: libheif turns HEIC pixels itself and
  pillow-heif resets the EXIF tag to 1; Pillow's AVIF plugin reports them as the EXIF tag.
- Every Pillow mode has one written rule: converted to 8-bit RGB, or refused with a
  message naming the input and the mode. Nothing is guessed from the pixel values except
  the range checks that refuse data the rule does not cover.
- Transparency (an alpha band, premultiplied or not, or a PNG tRNS entry) is composited
  over white.
- Animated files (GIF, WebP, APNG, AVIF) and multi-page TIFFs: the first frame is used; a
  HEIC holding several images: its primary image (the one pillow-heif opens at).
- 10- and 12-bit HEIC and AVIF samples reach us as 8 bits, reduced by their decoder: libheif
  keeps the top 8 bits (gray HEIC comes as 16-bit and takes the 16-bit rule, the same
  bits), libavif scales and rounds (v * 255 / (2**bits - 1)), within one level of them.
- An embedded ICC colour profile decides which profile the output JPG carries (``DecodedImage``,
  ``output_colour``): an RGB image's own profile, an RGB twin of a gray image's profile, or
  none; a CMYK image with a CMYK profile is converted by it to sRGB. No other metadata is
  carried (``encode_jpeg`` writes none).
"""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import cv2
import numpy as np
import pillow_heif
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from codeformer import icc
from codeformer.errors import InputError, labelled
from codeformer.image_sizes import check_image_size

SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF", "MPO", "HEIF", "AVIF")
# Formats whose plugin parses the whole file when it opens it: a truncated or corrupt one
# fails there, and Pillow puts "cannot identify image file" in place of the decoder's reason
CONTAINER_FORMATS = ("AVIF", "HEIF")
JPEG_QUALITY = 95

# We check the pixel count ourselves from the header; Pillow's own bomb check would only
# warn (or raise at twice its default limit) and says nothing about which input it was.
Image.MAX_IMAGE_PIXELS = None

# HEIC through pillow-heif (libheif, built with an HEVC decoder and no AV1 one). Pillow's own
# plugins are registered first (``Image.init``), so that its AVIF plugin is asked before
# pillow-heif about the brands both claim (mif1, msf1): registered first, pillow-heif would
# open such an AVIF and fail to decode it. Embedded thumbnails, depth maps and auxiliary
# images are not read: the picture is the primary image, and with thumbnails on, ``draft``
# (``Image.thumbnail`` calls it) would decode a thumbnail in its place.
Image.init()
pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)

SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# sRGB (IEC 61966-2-1) from CIE XYZ, and the D65 white point, for L*a*b* input
SRGB_FROM_XYZ = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])
D65_WHITE_XYZ = np.array([0.95047, 1.0, 1.08883])


def _over_white(color: np.ndarray, alpha: np.ndarray, premultiplied: bool) -> np.ndarray:
    """Composite (H, W, C) uint8 colour with (H, W) uint8 alpha over white, rounded to uint8.

    Straight alpha: c * a / 255 + 255 * (1 - a / 255); premultiplied: c + 255 - a.
    """
    color = color.astype(np.int32)
    alpha = alpha.astype(np.int32)[..., None]
    if premultiplied:
        return np.clip(color + 255 - alpha, 0, 255).astype(np.uint8)
    return ((color * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


def _straight_alpha(image: Image.Image) -> np.ndarray:
    # Pillow's RGBA conversion also turns a PNG tRNS entry (a gray value, an RGB triple or a
    # palette alpha table) into alpha
    pixels = np.asarray(image.convert("RGBA"))
    return _over_white(pixels[..., :3], pixels[..., 3], premultiplied=False)


def _premultiplied_alpha(image: Image.Image) -> np.ndarray:
    pixels = np.asarray(image)  # La: (H, W, 2), RGBa: (H, W, 4)
    color = pixels[..., :-1]
    if color.shape[-1] == 1:
        color = _gray_to_rgb(color[..., 0])
    return _over_white(color, pixels[..., -1], premultiplied=True)


def _sixteen_bit(image: Image.Image) -> np.ndarray:
    # keep the high byte, as cv2.imread(IMREAD_COLOR) reduces 16-bit files
    samples = np.asarray(image).astype(np.uint16)
    gray = _gray_to_rgb((samples >> 8).astype(np.uint8))
    transparent = image.info.get("transparency")
    if isinstance(transparent, int):
        gray[samples == transparent] = 255
    return gray


def _thirty_two_bit_integer(image: Image.Image) -> np.ndarray:
    samples = np.asarray(image)
    low, high = int(samples.min()), int(samples.max())
    if low < 0 or high > 65535:
        raise InputError(
            f"32-bit integer samples range {low}..{high}; only 0..65535 (16-bit values) is supported: "
            "save the image with 8 or 16 bits per sample"
        )
    return _gray_to_rgb((samples.astype(np.uint32) >> 8).astype(np.uint8))


def _float(image: Image.Image) -> np.ndarray:
    samples = np.asarray(image, dtype=np.float64)
    if not np.isfinite(samples).all():
        raise InputError("32-bit float samples include NaN or infinity; save the image with 8 or 16 bits")
    low, high = float(samples.min()), float(samples.max())
    if low < 0.0 or high > 1.0:
        raise InputError(
            f"32-bit float samples range {low:g}..{high:g}; only 0..1 is supported: "
            "save the image with 8 or 16 bits per sample"
        )
    return _gray_to_rgb(np.rint(samples * 255.0).astype(np.uint8))


def _cie_lab(image: Image.Image) -> np.ndarray:
    """CIE L*a*b* to sRGB through XYZ under D65.

    Pillow holds LAB as TIFF stores it: L* x 255/100, then a* and b* as signed bytes.
    """
    pixels = np.ascontiguousarray(np.asarray(image))
    lightness = pixels[..., 0].astype(np.float64) * (100.0 / 255.0)
    a_star, b_star = (pixels[..., channel].view(np.int8).astype(np.float64) for channel in (1, 2))
    fy = (lightness + 16.0) / 116.0
    f = np.stack([fy + a_star / 500.0, fy, fy - b_star / 200.0], axis=-1)
    delta = 6.0 / 29.0
    xyz = np.where(f > delta, f**3, 3.0 * delta**2 * (f - 4.0 / 29.0)) * D65_WHITE_XYZ
    linear = np.clip(xyz @ SRGB_FROM_XYZ.T, 0.0, 1.0)
    encoded = np.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear ** (1.0 / 2.4) - 0.055)
    return np.rint(encoded * 255.0).astype(np.uint8)


def _pillow_rgb(image: Image.Image) -> np.ndarray:
    # convert() copies even an RGB image, so an RGB one is taken as it is
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


# mode -> (H, W, 3) uint8 RGB. Pillow's own conversions where its rule is the standard one:
# 1 (0/255), L, P (palette lookup), RGBX (padding dropped), CMYK (R = (255-C)(255-K)/255,
# used when the file has no CMYK profile), YCbCr (JPEG's full-range BT.601), HSV.
PIXEL_RULES: dict[str, Callable[[Image.Image], np.ndarray]] = {
    **dict.fromkeys(("1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "HSV"), _pillow_rgb),
    **dict.fromkeys(("LA", "PA", "RGBA"), _straight_alpha),
    **dict.fromkeys(("La", "RGBa"), _premultiplied_alpha),
    **dict.fromkeys(SIXTEEN_BIT_MODES, _sixteen_bit),
    "I": _thirty_two_bit_integer,
    "F": _float,
    "LAB": _cie_lab,
}
# modes whose "transparency" info (PNG tRNS) marks a colour, or palette entries, as transparent
TRNS_MODES = frozenset({"1", "L", "P", "RGB"})


def to_rgb8(image: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 RGB from a Pillow image by ``PIXEL_RULES``; ``InputError`` for other modes."""
    rule = PIXEL_RULES.get(image.mode)
    if rule is None:
        raise InputError(
            f"pixel mode {image.mode} is not supported; save the image as 8-bit RGB, gray or palette"
        )
    if image.mode in TRNS_MODES and "transparency" in image.info:
        rule = _straight_alpha
    return rule(image)


# Modes by the colour space their samples are in, to match an embedded ICC profile against.
# The RGB rules keep RGB values (alpha over white keeps white, the profile's own white);
# the gray rules repeat one sample three times. HSV and LAB never carry a profile here
# (no file stores HSV; L*a*b* is converted to sRGB by formula).
RGB_SOURCE_MODES = frozenset({"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "YCbCr"})
GRAY_SOURCE_MODES = frozenset({"1", "L", "LA", "La", "I", "F", *SIXTEEN_BIT_MODES})


@dataclass(frozen=True)
class DecodedImage:
    """An input's pixels and the colour profile that its output JPG must carry."""

    pixels: np.ndarray  # (H, W, 3) uint8 BGR, upright
    icc_profile: bytes | None  # an RGB ICC profile describing ``pixels``; None: untagged, i.e. sRGB


@functools.cache
def _srgb() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _cmyk_by_profile(image: Image.Image, profile: bytes) -> np.ndarray:
    """(H, W, 3) uint8 sRGB from CMYK through its ICC profile (LittleCMS).

    Relative colorimetric with black point compensation, the usual default for showing
    print colours on a display: paper white becomes sRGB white, the inks' darkest black
    becomes sRGB black (so the shadows keep their steps), and colours in between keep
    their measured values where sRGB can show them.
    """
    try:
        transform = ImageCms.buildTransform(
            ImageCms.ImageCmsProfile(io.BytesIO(profile)),
            _srgb(),
            "CMYK",
            "RGB",
            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION,
        )
    except ImageCms.PyCMSError as exc:
        raise InputError(
            f"the embedded CMYK ICC profile cannot be used ({exc}); "
            "save the image as RGB or without the profile"
        ) from None
    return np.asarray(ImageCms.applyTransform(image, transform))


def output_colour(image: Image.Image, profile: bytes | None) -> tuple[np.ndarray, bytes | None]:
    """(H, W, 3) uint8 RGB of ``image`` and the RGB ICC profile its output carries (None: sRGB).

    ``profile`` is the file's embedded profile. By the colour space of the pixels and of
    the profile (the README's table has the same rules):
    - RGB pixels, RGB profile: pixels by ``PIXEL_RULES``, the same profile bytes;
    - gray pixels, gray profile: pixels by ``PIXEL_RULES`` (R = G = B), an RGB profile that
      shows (v, v, v) as the gray profile shows v (``icc.rgb_profile_for_gray``), or none
      when the gray profile is a lookup table;
    - CMYK pixels, CMYK profile: converted through the profile to sRGB, no profile;
    - no profile, or one of another colour space than the pixels' (a broken file), and
      L*a*b*: pixels by ``PIXEL_RULES``, no profile.
    ``InputError`` for a gray or CMYK profile that cannot be read, and for a profile over
    what a JPG can carry.
    """
    if profile is None:
        return to_rgb8(image), None
    space = icc.colour_space(profile)
    if image.mode == "CMYK" and space == "CMYK":
        return _cmyk_by_profile(image, profile), None
    rgb = to_rgb8(image)
    carried: bytes | None = None
    if image.mode in RGB_SOURCE_MODES and space == "RGB":
        carried = profile
    elif image.mode in GRAY_SOURCE_MODES and space == "GRAY":
        try:
            carried = icc.rgb_profile_for_gray(profile)
        except ValueError as exc:
            raise InputError(
                f"the embedded gray ICC profile cannot be read ({exc}); save the image without it"
            ) from None
    if carried is not None and len(carried) > icc.JPEG_ICC_MAX_BYTES:
        raise InputError(
            f"the embedded ICC profile is {len(carried) / 2**20:.1f} MB, over the "
            f"{icc.JPEG_ICC_MAX_BYTES / 2**20:.1f} MB a JPG can carry; convert the image to sRGB"
        )
    return rgb, carried


@dataclass(frozen=True)
class ImageHeader:
    """A file opened header-only (``read_header``): its size is known, no pixel is decoded yet.

    The request counts ``pixel_count`` for admission and then decodes the same opened file
    (``decode_header``), so that each header is parsed once. Decoding loads ``image`` and
    turns it upright in place: a header is decoded once.
    """

    image: Image.Image  # opened lazily by Pillow
    # what decoding makes: before EXIF orientation (a HEIC's is applied already), and for a
    # HEIC its coded image, before its crop (``_decoded_size``); the pixel count is what counts
    width: int
    height: int

    @property
    def pixel_count(self) -> int:
        return self.width * self.height


def read_header(data: bytes) -> ImageHeader:
    """Open the file lazily (header only); ``InputError`` saying why when it is no image we read."""
    if not data:
        raise InputError("the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns about odd but readable headers
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        reason = _container_failure(data)
        if reason is not None:
            raise InputError(f"cannot decode the image (truncated or corrupt?): {reason}") from None
        raise InputError(
            "not a readable image (supported: JPEG, PNG, WebP, BMP, TIFF, HEIC, AVIF; first frame of GIF)"
        ) from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(f"cannot read the image header: {exc}") from None
    if image.format not in SUPPORTED_FORMATS:
        raise InputError(
            f"unsupported image format {image.format}; send JPEG, PNG, WebP, BMP, TIFF, HEIC or AVIF"
        )
    width, height = _decoded_size(image)
    return ImageHeader(image, width, height)


def _decoded_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of the pixels decoding makes: the size Pillow reports, or a HEIC's coded size.

    A HEIC's reported size is its clean aperture (``clap``), a crop of the coded image that
    libheif decodes whole before cropping it (encoders pad to the codec's block size and crop
    the padding away; a crafted file can crop a huge coded image to a small one).
    pillow-heif lists the crop as ``("clap", left, top, right, bottom, coded width, coded
    height)``, not as public API (pinned: pillow-heif 1.8.1; a test of a cropped pixel bomb
    fails if it moves).
    """
    if image.format == "HEIF":
        stored = image._heif_file[image.tell()]  # type: ignore[attr-defined]
        for kind, *values in stored._c_image.transformations:
            if kind == "clap":
                return values[4], values[5]
    return image.size


def _container_failure(data: bytes) -> str | None:
    """Why each of ``CONTAINER_FORMATS`` that claims ``data`` (by its ``ftyp`` brand) cannot open it.

    None when none claims it. Only called once ``Image.open`` has failed, so the plugins fail
    again, this time keeping their reasons (libavif's and libheif's messages).
    """
    reasons = []
    for fmt in CONTAINER_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is None or accept(data[:16]) is not True:
            continue
        try:
            factory(io.BytesIO(data)).close()
        except (OSError, ValueError, SyntaxError) as exc:
            reasons.append(f"{fmt}: {str(exc).strip()}")
    return "; ".join(reasons) or None


def decode_with_profile(data: bytes, name: str, max_pixels: int) -> DecodedImage:
    """Decode file bytes to upright (H, W, 3) uint8 BGR pixels and the profile their output carries.

    Raises ``InputError`` naming ``name`` for empty, unreadable, truncated or oversized
    files, for pixel modes without a rule and for profiles ``output_colour`` refuses. Sizes
    (the image's and those of the copies the pipeline will make of it) are checked from the
    header, before pixels are decoded.
    """
    with labelled(name):
        return decode_header(read_header(data), max_pixels)


def decode_header(header: ImageHeader, max_pixels: int) -> DecodedImage:
    """``decode_with_profile`` of a file whose header ``read_header`` has parsed already.

    Pillow's decoded pixels are released on return (``Image.close``), so that a request
    holding its headers holds no decoded copy besides the returned array.
    """
    image = header.image
    check_image_size(header.height, header.width, max_pixels)
    try:
        rgb, carried = _upright_rgb(image)
        # OpenCV's channel swap: the same bytes as a reversed-view copy, and faster
        return DecodedImage(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), carried)
    finally:
        image.close()


def _upright_rgb(image: Image.Image) -> tuple[np.ndarray, bytes | None]:
    """``output_colour`` of the loaded, upright ``image``; ``InputError`` saying why it cannot be read."""
    try:
        # no seek: Image.open presents the first frame, or a HEIC's primary image, whose size
        # the header check counted
        _load(image)
        # JPEG, PNG (iCCP), WebP, TIFF, HEIC and AVIF (colr) put an embedded profile here;
        # an empty one is none
        profile = image.info.get("icc_profile") or None
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when upright already
        return output_colour(image, profile)
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        reason = str(exc).strip()  # libheif's messages end in line breaks
        raise InputError(f"cannot decode the image (truncated or corrupt?): {reason}") from None


def _load(image: Image.Image) -> None:
    """``image.load()``, with pillow-heif's decode failures (libheif's ``RuntimeError``) as ``ValueError``."""
    try:
        image.load()
    except RuntimeError as exc:
        if image.format != "HEIF":
            raise
        raise ValueError(str(exc)) from None


def decode_image(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """The pixels of ``decode_with_profile``: upright (H, W, 3) uint8 BGR, for callers that write no file."""
    return decode_with_profile(data, name, max_pixels).pixels


def encode_jpeg(image: np.ndarray, quality: int = JPEG_QUALITY, icc_profile: bytes | None = None) -> bytes:
    """JPG bytes of an (H, W, 3) uint8 BGR array, carrying ``icc_profile`` when given.

    OpenCV writes the image data (as the official pipeline does) and no metadata; the profile
    goes in as APP2 segments, so the image data is the same with or without it.
    """
    ok, buffer = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {image.shape} {image.dtype} array as JPG")
    if icc_profile is None:
        return buffer.tobytes()
    return icc.embed_in_jpeg(buffer.tobytes(), icc_profile)
