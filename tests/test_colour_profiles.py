"""Colour profiles: which ICC profile each kind of input's output JPG carries, and its pixels.

The rule (README, "Colour profiles and metadata"): RGB pixels keep their values and their
RGB profile, byte for byte; gray pixels keep their values and get an RGB profile that shows
them as their gray profile does; CMYK with a CMYK profile is converted by it to sRGB; no
output carries a profile of another colour space than its RGB pixels, nor any other metadata.
Profiles of kinds Pillow cannot make are generated (``codeformer.tools.inputs``).
"""

from __future__ import annotations

import io
import threading

import cv2
import numpy as np
import pytest
from helpers import cmyk_to_srgb, colour_tagged_inputs, encode, srgb_profile
from PIL import Image, ImageCms

from codeformer import icc
from codeformer.config import RequestOptions
from codeformer.errors import InputError
from codeformer.imageio import DecodedImage, decode_image, decode_with_profile, encode_jpeg
from codeformer.serving.client import data_uri
from codeformer.tools.inputs import cmyk_icc_profile, gray_icc_profile

LIMIT = 40_000_000
SRGB = srgb_profile()
GRAY_LINEAR = gray_icc_profile(1.0)  # linear: read as sRGB instead, its mid-tones would look far darker
CMYK = cmyk_icc_profile()


def _gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """(H, W, 3) uint8 RGB with distinct values per channel."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], axis=-1).astype(np.uint8)


def _decode(data: bytes, name: str = "in.img") -> DecodedImage:
    return decode_with_profile(data, name, LIMIT)


def _jpeg_profile(data: bytes) -> bytes | None:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return image.info.get("icc_profile")


def _to_lab(image: Image.Image, profile: bytes) -> np.ndarray:
    """L*a*b* (Pillow's 8-bit encoding) of ``image`` read through ``profile``: what a viewer shows."""
    transform = ImageCms.buildTransform(
        ImageCms.ImageCmsProfile(io.BytesIO(profile)),
        ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")),
        image.mode,
        "LAB",
        renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
    )
    return np.asarray(ImageCms.applyTransform(image, transform))


# -- RGB: the same profile bytes, the same pixels ---------------------------------------------
@pytest.mark.parametrize(
    ("fmt", "params"),
    [
        ("JPEG", {"quality": 95}),
        ("PNG", {}),
        ("WEBP", {"lossless": True}),
        ("TIFF", {}),
        ("HEIF", {"quality": 95}),
        ("AVIF", {"quality": 95}),
    ],
    ids=["jpeg", "png-iCCP", "webp", "tiff", "heic", "avif"],
)
def test_an_rgb_profile_reaches_the_output_byte_for_byte_and_pixels_stay(fmt: str, params: dict) -> None:
    picture = Image.fromarray(_gradient())
    tagged = _decode(encode(picture, fmt, icc_profile=SRGB, **params), f"x.{fmt.lower()}")
    untagged = _decode(encode(picture, fmt, **params), f"x.{fmt.lower()}")
    assert tagged.icc_profile == SRGB
    assert untagged.icc_profile is None
    np.testing.assert_array_equal(tagged.pixels, untagged.pixels)

    output = encode_jpeg(tagged.pixels, icc_profile=tagged.icc_profile)
    plain = encode_jpeg(untagged.pixels)
    assert _jpeg_profile(output) == SRGB
    assert _jpeg_profile(plain) is None
    # the profile rides in one APP2 segment (marker, length, name, counters); the image data is the same
    assert len(output) - len(plain) == len(SRGB) + 2 + 2 + len(icc.JPEG_ICC_NAME) + 2
    np.testing.assert_array_equal(
        cv2.imdecode(np.frombuffer(output, np.uint8), cv2.IMREAD_COLOR),
        cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR),
    )


def test_an_rgba_png_keeps_its_profile_with_alpha_over_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: white in the profile's own terms
    decoded = _decode(encode(Image.fromarray(rgba, "RGBA"), "PNG", icc_profile=SRGB), "a.png")
    assert decoded.icc_profile == SRGB
    np.testing.assert_array_equal(decoded.pixels, np.full((8, 8, 3), 255, np.uint8))


def test_a_profile_over_one_jpeg_segment_is_split_and_read_back_whole() -> None:
    # three segments; Pillow reassembles them by their sequence numbers
    big = SRGB + bytes(2 * icc.JPEG_ICC_CHUNK)
    output = encode_jpeg(np.full((8, 8, 3), 90, np.uint8), icc_profile=big)
    assert output.count(icc.JPEG_ICC_NAME) == 3
    assert _jpeg_profile(output) == big


def test_embedding_refuses_profiles_over_what_a_jpeg_carries() -> None:
    with pytest.raises(ValueError, match=f"1 to {icc.JPEG_ICC_MAX_BYTES} bytes"):
        icc.embed_in_jpeg(encode_jpeg(np.zeros((8, 8, 3), np.uint8)), bytes(icc.JPEG_ICC_MAX_BYTES + 1))


# -- gray: pixels stay, an RGB profile that shows them as the gray one did -----------------------
@pytest.mark.parametrize(
    ("fmt", "mode"), [("PNG", "L"), ("JPEG", "L"), ("PNG", "LA"), ("HEIF", "L"), ("AVIF", "L")]
)
def test_a_gray_profile_becomes_an_rgb_profile_that_looks_the_same(fmt: str, mode: str) -> None:
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :], 32, axis=0)  # (32, 256): within 16:1
    picture = Image.fromarray(ramp).convert(mode)
    data = encode(picture, fmt, icc_profile=GRAY_LINEAR, **({"quality": 100} if fmt == "JPEG" else {}))
    tagged = _decode(data, f"g.{fmt.lower()}")
    untagged = _decode(encode(picture, fmt, **({"quality": 100} if fmt == "JPEG" else {})), "g")
    np.testing.assert_array_equal(tagged.pixels, untagged.pixels)  # pixel values unchanged
    assert tagged.icc_profile is not None and tagged.icc_profile != GRAY_LINEAR
    assert icc.colour_space(tagged.icc_profile) == "RGB"
    # a colour-managed viewer shows every level (v, v, v) exactly as the gray profile shows v
    gray_levels = Image.fromarray(np.arange(256, dtype=np.uint8)[None, :])
    np.testing.assert_array_equal(
        _to_lab(gray_levels.convert("RGB"), tagged.icc_profile), _to_lab(gray_levels, GRAY_LINEAR)
    )
    # where dropping the profile (reading the levels as sRGB) would not
    srgb_lab = _to_lab(gray_levels.convert("RGB"), SRGB).astype(int)
    assert np.abs(srgb_lab - _to_lab(gray_levels, GRAY_LINEAR).astype(int)).max() > 40


def test_a_gray_profile_without_an_xyz_tone_curve_is_not_carried() -> None:
    lab_connected = bytearray(GRAY_LINEAR)
    lab_connected[icc.PCS_AT : icc.PCS_AT + 4] = b"Lab "  # the curve would give L*, not Y
    assert icc.rgb_profile_for_gray(bytes(lab_connected)) is None
    decoded = _decode(encode(Image.new("L", (8, 8), 60), "PNG", icc_profile=bytes(lab_connected)))
    assert decoded.icc_profile is None


def test_a_broken_gray_profile_is_refused_naming_the_input() -> None:
    broken = GRAY_LINEAR[:140]  # the header and a tag count, tags cut off
    with pytest.raises(InputError, match=r"scan\.png: the embedded gray ICC profile cannot be read"):
        decode_with_profile(encode(Image.new("L", (8, 8), 60), "PNG", icc_profile=broken), "scan.png", LIMIT)


# -- CMYK: converted through its profile, no profile carried ----------------------------------
@pytest.mark.parametrize(("fmt", "params"), [("JPEG", {"quality": 100}), ("TIFF", {})], ids=["jpeg", "tiff"])
def test_cmyk_with_a_profile_is_converted_by_it_to_srgb(fmt: str, params: dict) -> None:
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    data = encode(cmyk, fmt, icc_profile=CMYK, **params)
    decoded = _decode(data, f"c.{fmt.lower()}")
    assert decoded.icc_profile is None
    with Image.open(io.BytesIO(data)) as stored:
        expected = cmyk_to_srgb(stored.copy(), CMYK)
        naive = np.asarray(stored.convert("RGB"))
    np.testing.assert_array_equal(decoded.pixels, expected[..., ::-1])
    assert np.abs(naive.astype(int) - expected).mean() > 20  # the profile made them, not the naive rule
    assert _jpeg_profile(encode_jpeg(decoded.pixels, icc_profile=decoded.icc_profile)) is None


def test_cmyk_without_a_profile_keeps_the_naive_rule() -> None:
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    decoded = _decode(encode(cmyk, "TIFF"), "c.tiff")
    assert decoded.icc_profile is None
    np.testing.assert_array_equal(decoded.pixels, np.asarray(cmyk.convert("RGB"))[..., ::-1])


def test_a_cmyk_profile_littlecms_cannot_use_is_refused_naming_the_input() -> None:
    broken = CMYK[:128] + bytes(8)  # a CMYK header, no tags
    data = encode(Image.new("CMYK", (8, 8), (0, 0, 0, 50)), "TIFF", icc_profile=broken)
    with pytest.raises(InputError, match=r"print\.tiff: the embedded CMYK ICC profile cannot be used"):
        decode_with_profile(data, "print.tiff", LIMIT)


# -- no profile, another kind's profile, L*a*b*: none carried ------------------------------------
@pytest.mark.parametrize(
    ("picture", "fmt", "profile"),
    [
        (Image.fromarray(_gradient()), "PNG", None),
        (Image.fromarray(_gradient()), "JPEG", None),
        (Image.fromarray(_gradient()), "PNG", GRAY_LINEAR),  # an RGB file with a gray profile
        (Image.new("L", (64, 48), 90), "TIFF", SRGB),  # a gray file with an RGB profile
        (Image.new("CMYK", (64, 48), (0, 0, 0, 90)), "TIFF", SRGB),
        (Image.new("LAB", (64, 48), (128, 128, 128)), "TIFF", None),
        (
            Image.new("LAB", (64, 48), (128, 128, 128)),
            "TIFF",
            ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")).tobytes(),
        ),
    ],
    ids=["png", "jpeg", "rgb-with-gray", "gray-with-rgb", "cmyk-with-rgb", "lab", "lab-with-lab"],
)
def test_no_profile_is_carried_unless_it_describes_the_rgb_output(
    picture: Image.Image, fmt: str, profile: bytes | None
) -> None:
    data = encode(picture, fmt, **({} if profile is None else {"icc_profile": profile}))
    decoded = _decode(data, f"x.{fmt.lower()}")
    assert decoded.icc_profile is None
    # and the pixels are those of the file without its profile
    np.testing.assert_array_equal(decoded.pixels, decode_image(encode(picture, fmt), "x", LIMIT))
    assert _jpeg_profile(encode_jpeg(decoded.pixels, icc_profile=decoded.icc_profile)) is None


def test_exif_and_its_location_are_not_carried_only_the_profile() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: applied to the pixels, so it must not be applied again
    exif[0x010F] = "PhoneMaker"
    exif.get_ifd(0x8825)[2] = (48.0, 51.0, 29.0)  # GPS latitude: personal
    data = encode(Image.fromarray(_gradient(60, 30)), "JPEG", quality=95, exif=exif, icc_profile=SRGB)
    decoded = _decode(data, "phone.jpg")
    assert decoded.pixels.shape == (60, 30, 3)  # upright
    output = encode_jpeg(decoded.pixels, icc_profile=decoded.icc_profile)
    with Image.open(io.BytesIO(output)) as image:
        assert image.info.get("icc_profile") == SRGB
        assert "exif" not in image.info and len(image.getexif()) == 0
        assert not [marker for marker, _ in image.applist if marker != "APP0" and marker != "APP2"]


# -- through predict.py --------------------------------------------------------------------------
@pytest.mark.nets  # sets up a Predictor (the three nets on random weights)
def test_each_output_of_a_request_carries_its_inputs_profile_in_process(faceless_predictor) -> None:
    predictor = faceless_predictor
    inputs = colour_tagged_inputs()
    options = RequestOptions.parse(0.5, "max_speed", "safe", "none")
    paths = predictor.serve_request(
        [data_uri(data, name=name) for name, data, _, _ in inputs], options, threading.Event()
    )
    assert len(paths) == len(inputs)
    for path, (name, _, carried, expected_rgb) in zip(paths, inputs, strict=True):
        output = path.read_bytes()
        profile = _jpeg_profile(output)
        assert profile == carried, name
        assert profile is None or icc.colour_space(profile) == "RGB", name  # never a gray or CMYK one
        shown = np.asarray(Image.open(io.BytesIO(output)).convert("RGB")).astype(int)
        assert np.abs(shown - expected_rgb).mean() <= 3.0, name  # JPEG's re-encoding error
