"""Decoding: every kind of file a user may send, generated here with Pillow and NumPy."""

from __future__ import annotations

import re

import cv2
import numpy as np
import pillow_heif
import pytest
from helpers import deep_heif, encode, exif_turned, run_python
from PIL import Image

from codeformer.errors import InputError
from codeformer.imageio import decode_header, decode_image, encode_jpeg, read_header, to_rgb8
from codeformer.tools.inputs import ispe_claiming, png_header_claiming

LIMIT = 40_000_000


def _gradient(width: int = 64, height: int = 48) -> np.ndarray:
    """(H, W, 3) uint8 RGB with distinct values per channel, so channel swaps show."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 255 // width, ys * 255 // height, (xs + ys) % 256], axis=-1).astype(np.uint8)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "WEBP"])
def test_lossless_formats_decode_to_the_same_bgr_pixels(fmt: str) -> None:
    rgb = _gradient()
    params = {"lossless": True} if fmt == "WEBP" else {}
    decoded = decode_image(encode(Image.fromarray(rgb), fmt, **params), f"x.{fmt.lower()}", LIMIT)
    assert decoded.dtype == np.uint8 and decoded.shape == (48, 64, 3)
    np.testing.assert_array_equal(decoded, rgb[..., ::-1])


def test_jpeg_decodes_like_opencv() -> None:
    data = encode(Image.fromarray(_gradient(200, 120)), "JPEG", quality=80)
    expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    np.testing.assert_array_equal(decode_image(data, "a.jpg", LIMIT), expected)


def test_grayscale_becomes_three_equal_channels() -> None:
    gray = _gradient()[..., 0]
    decoded = decode_image(encode(Image.fromarray(gray), "JPEG", quality=95), "g.jpg", LIMIT)
    assert decoded.shape == (48, 64, 3)
    assert np.array_equal(decoded[..., 0], decoded[..., 1]) and np.array_equal(
        decoded[..., 1], decoded[..., 2]
    )


def test_sixteen_bit_png_keeps_the_high_byte() -> None:
    samples = (np.arange(48 * 64, dtype=np.uint32).reshape(48, 64) * 21).astype(np.uint16)
    decoded = decode_image(encode(Image.fromarray(samples), "PNG"), "deep.png", LIMIT)
    np.testing.assert_array_equal(decoded[..., 0], (samples >> 8).astype(np.uint8))


def test_alpha_is_composited_over_white() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200  # red
    rgba[:4, ..., 3] = 0  # top half fully transparent
    rgba[4:, ..., 3] = 255
    decoded = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), "a.png", LIMIT)
    np.testing.assert_array_equal(decoded[:4], np.full((4, 8, 3), 255, np.uint8))
    np.testing.assert_array_equal(decoded[4:], np.broadcast_to(np.array([0, 0, 200], np.uint8), (4, 8, 3)))


def test_palette_png() -> None:
    rgb = _gradient()
    palette_image = Image.fromarray(rgb).quantize(colors=16)
    decoded = decode_image(encode(palette_image, "PNG"), "p.png", LIMIT)
    np.testing.assert_array_equal(decoded, np.asarray(palette_image.convert("RGB"))[..., ::-1])


def test_cmyk_jpeg_becomes_bgr() -> None:
    cmyk = Image.fromarray(_gradient()).convert("CMYK")
    decoded = decode_image(encode(cmyk, "JPEG", quality=95), "c.jpg", LIMIT)
    assert decoded.shape == (48, 64, 3)
    assert np.abs(decoded.astype(int) - _gradient()[..., ::-1]).mean() < 12


def test_exif_orientation_6_is_applied() -> None:
    rgb = _gradient(60, 30)  # landscape as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(rgb), "JPEG", quality=95, exif=exif)
    decoded = decode_image(data, "rot.jpg", LIMIT)
    assert decoded.shape == (60, 30, 3)  # upright: portrait
    stored = decode_image(encode(Image.fromarray(rgb), "JPEG", quality=95), "plain.jpg", LIMIT)
    np.testing.assert_array_equal(decoded, np.rot90(stored, k=-1))


def test_animated_gif_uses_the_first_frame() -> None:
    frames = [Image.fromarray(np.full((16, 16, 3), value, np.uint8)) for value in (10, 250)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    decoded = decode_image(data, "anim.gif", LIMIT)
    assert decoded.shape == (16, 16, 3) and int(decoded.mean()) < 50


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"", "empty"),
        (b"not an image at all, just text\n", "not a readable image"),
        (np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "not a readable image"),
        (b"<!doctype html><html><body>404</body></html>", "not a readable image"),
    ],
    ids=["zero-bytes", "text", "random-bytes", "html"],
)
def test_unreadable_data_is_refused_naming_the_input(data: bytes, expected: str) -> None:
    with pytest.raises(InputError, match=rf"upload\.jpg: .*{expected}"):
        decode_image(data, "upload.jpg", LIMIT)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "HEIF", "AVIF"])
def test_truncated_files_are_refused(fmt: str) -> None:
    rng = np.random.default_rng(1)
    data = encode(Image.fromarray(rng.integers(0, 256, (128, 128, 3), dtype=np.uint8)), fmt)
    with pytest.raises(InputError, match=r"cut\.img: cannot decode"):
        decode_image(data[: len(data) // 2], "cut.img", LIMIT)


@pytest.mark.parametrize(
    ("fmt", "stored", "claimed"),
    [
        ("PNG", None, (100_000, 100_000)),
        ("HEIF", (128, 128), (100_000, 100_000)),
        # x265 codes 64x48 as 64x64, cropped by a clap box: the header shows 64x48 whatever ispe says
        ("HEIF", (64, 48), (20_000, 20_000)),
        # libavif itself refuses AVIF headers over 16384x16384 pixels (its imageSizeLimit)
        ("AVIF", (64, 48), (10_000, 10_000)),
    ],
    ids=["png", "heic", "heic-cropped", "avif"],
)
def test_huge_header_is_refused_before_decoding(
    fmt: str, stored: tuple[int, int] | None, claimed: tuple[int, int]
) -> None:
    width, height = claimed
    if stored is None:
        data = png_header_claiming(width, height)
    else:
        data = ispe_claiming(encode(Image.fromarray(_gradient(*stored)), fmt), width, height)
    with pytest.raises(InputError, match=rf"bomb\.img: {width}x{height} .*over the limit"):
        decode_image(data, "bomb.img", LIMIT)


def test_an_avif_header_over_libavifs_own_limit_is_refused_by_libavif_naming_the_input() -> None:
    data = ispe_claiming(encode(Image.fromarray(_gradient()), "AVIF"), 20_000, 20_000)
    with pytest.raises(InputError, match=r"^cannot decode the image \(truncated or corrupt\?\): AVIF: "):
        read_header(data)
    with pytest.raises(InputError, match=r"^bomb\.avif: cannot decode the image"):
        decode_image(data, "bomb.avif", LIMIT)


def test_pixel_limit_is_configurable() -> None:
    # short side over 640: the pipeline's copies are no larger than the image
    data = encode(Image.fromarray(_gradient(800, 700)), "PNG")
    assert decode_image(data, "ok.png", 800 * 700).shape == (700, 800, 3)
    with pytest.raises(InputError, match="over the limit"):
        decode_image(data, "ok.png", 800 * 700 - 1)


def test_a_header_read_once_gives_the_size_and_then_the_pixels() -> None:
    """Admission counts the header's pixels; decoding goes on from the same parsed header."""
    data = encode(Image.fromarray(_gradient(80, 60)), "PNG")
    header = read_header(data)
    assert (header.width, header.height, header.pixel_count) == (80, 60, 80 * 60)
    np.testing.assert_array_equal(decode_header(header, LIMIT).pixels, decode_image(data, "h.png", LIMIT))
    with pytest.raises(InputError, match=r"^100000x100000 .*over the limit"):
        decode_header(read_header(png_header_claiming(100_000, 100_000)), LIMIT)


def test_tiny_images_decode() -> None:
    one = decode_image(encode(Image.fromarray(np.array([[[1, 2, 3]]], np.uint8)), "PNG"), "1x1.png", LIMIT)
    np.testing.assert_array_equal(one, np.array([[[3, 2, 1]]], np.uint8))


def test_encode_jpeg_round_trips_size_and_colour() -> None:
    bgr = np.ascontiguousarray(_gradient(80, 50)[..., ::-1])
    data = encode_jpeg(bgr)
    assert data[:2] == b"\xff\xd8"
    decoded = decode_image(data, "out.jpg", LIMIT)
    assert decoded.shape == bgr.shape
    assert np.abs(decoded.astype(int) - bgr).mean() < 3


# -- one rule per Pillow mode (to_rgb8), on pictures whose conversion is known ------------------
def _pixels(mode: str, values: list, size: tuple[int, int] = (2, 1)) -> Image.Image:
    image = Image.new(mode, size)
    image.putdata(values)
    return image


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (_pixels("1", [0, 255]), [[0, 0, 0], [255, 255, 255]]),
        (_pixels("L", [0, 200]), [[0, 0, 0], [200, 200, 200]]),
        # straight alpha over white: c * a / 255 + 255 - a, rounded
        (_pixels("LA", [(0, 128), (200, 255)]), [[127, 127, 127], [200, 200, 200]]),
        (_pixels("RGBA", [(255, 0, 0, 0), (10, 20, 30, 255)]), [[255, 255, 255], [10, 20, 30]]),
        # premultiplied alpha over white: c + 255 - a
        (_pixels("La", [(0, 128), (100, 100)]), [[127, 127, 127], [255, 255, 255]]),
        (_pixels("RGBa", [(50, 60, 70, 128), (0, 0, 0, 0)]), [[177, 187, 197], [255, 255, 255]]),
        (_pixels("RGBX", [(10, 20, 30, 99), (40, 50, 60, 0)]), [[10, 20, 30], [40, 50, 60]]),
        # CMYK: (255 - C)(255 - K) / 255
        (_pixels("CMYK", [(0, 0, 0, 128), (255, 0, 0, 0)]), [[127, 127, 127], [0, 255, 255]]),
        (_pixels("YCbCr", [(128, 128, 128), (200, 128, 128)]), [[128, 128, 128], [200, 200, 200]]),
        (_pixels("HSV", [(0, 255, 255), (0, 0, 128)]), [[255, 0, 0], [128, 128, 128]]),
        (_pixels("I;16", [0x1234, 0xFFFF]), [[0x12] * 3, [0xFF] * 3]),
        (_pixels("I;16B", [0x8001, 0x00FF]), [[0x80] * 3, [0] * 3]),
        (_pixels("I", [0x4000, 65535]), [[0x40] * 3, [255] * 3]),
        (_pixels("F", [0.0, 1.0]), [[0] * 3, [255] * 3]),
        # L* 100 and 0 with a* = b* = 0 are sRGB white and black (Pillow's API offsets a*, b* by 128)
        (_pixels("LAB", [(255, 128, 128), (0, 128, 128)]), [[255, 255, 255], [0, 0, 0]]),
    ],
    ids=lambda value: value.mode if isinstance(value, Image.Image) else "",
)
def test_every_mode_converts_by_its_rule(image: Image.Image, expected: list) -> None:
    np.testing.assert_array_equal(to_rgb8(image), np.array([expected], np.uint8))


def test_palette_transparency_entry_is_white_not_the_palette_colour() -> None:
    image = _pixels("P", [0, 1])
    image.putpalette([0, 0, 0, 90, 90, 90] + [0] * 762)
    image.info["transparency"] = 0
    np.testing.assert_array_equal(to_rgb8(image), np.array([[[255] * 3, [90] * 3]], np.uint8))


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (_pixels("F", [0.0, 255.0]), "range 0..255; only 0..1"),
        (_pixels("F", [-0.5, 0.5]), "range -0.5..0.5"),
        (_pixels("F", [float("nan"), 0.5]), "NaN or infinity"),
        (_pixels("I", [-1, 10]), "range -1..10"),
        (_pixels("I", [0, 1 << 20]), "range 0..1048576"),
    ],
    ids=["float-255", "float-negative", "float-nan", "int-negative", "int-over-16-bit"],
)
def test_samples_outside_the_rule_are_refused(image: Image.Image, reason: str) -> None:
    with pytest.raises(InputError, match=re.escape(reason)):
        to_rgb8(image)


def test_a_mode_without_a_rule_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from codeformer import imageio

    monkeypatch.delitem(imageio.PIXEL_RULES, "HSV")
    with pytest.raises(InputError, match="pixel mode HSV is not supported"):
        to_rgb8(_pixels("HSV", [(0, 0, 0), (0, 0, 0)]))


# -- HEIC and AVIF: the same rules as every format -----------------------------------------------
def _plain(fmt: str, picture: np.ndarray, **params) -> np.ndarray:
    return decode_image(encode(Image.fromarray(picture), fmt, **params), f"plain.{fmt.lower()}", LIMIT)


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_are_turned_by_their_orientation_once(fmt: str) -> None:
    stored = _gradient(60, 30)  # landscape as stored
    data = exif_turned(Image.fromarray(stored), fmt, 6, quality=95)
    assert read_header(data).image.format == fmt
    decoded = decode_image(data, "phone.img", LIMIT)
    # turned twice (libheif, then the EXIF tag again) it would be landscape, upside down
    assert decoded.shape == (60, 30, 3)
    turned = np.rot90(_plain(fmt, stored, quality=95), k=-1).astype(int)
    assert np.abs(decoded.astype(int) - turned).mean() < 2.0  # the same coded pixels, turned
    assert np.abs(decoded.astype(int) - np.rot90(turned, k=2)).mean() > 30


def test_a_heic_of_several_images_gives_its_primary_one() -> None:
    first = Image.fromarray(np.full((48, 64, 3), 40, np.uint8))
    primary = Image.fromarray(np.full((40, 56, 3), 200, np.uint8))
    data = encode(first, "HEIF", save_all=True, append_images=[primary], primary_index=1, quality=95)
    header = read_header(data)
    assert header.image.size == (56, 40)  # the header checked is the primary image's
    assert header.pixel_count == 64 * 64  # coded as 64x64 (x265 pads), cropped: decoding makes 64x64
    decoded = decode_header(header, LIMIT).pixels
    assert decoded.shape == (40, 56, 3) and abs(decoded.mean() - 200) < 2


def test_an_animated_avif_gives_its_first_frame() -> None:
    frames = [Image.fromarray(np.full((48, 64, 3), value, np.uint8)) for value in (40, 200)]
    data = encode(frames[0], "AVIF", save_all=True, append_images=frames[1:], duration=100, quality=95)
    decoded = decode_image(data, "anim.avif", LIMIT)
    assert decoded.shape == (48, 64, 3) and abs(decoded.mean() - 40) < 2


@pytest.mark.parametrize("gray", [False, True], ids=["rgb", "gray"])
@pytest.mark.parametrize(("fmt", "bits"), [("HEIF", 10), ("HEIF", 12), ("AVIF", 10), ("AVIF", 12)])
def test_deep_heic_and_avif_samples_become_8_bits_by_the_stated_rule(fmt: str, bits: int, gray: bool) -> None:
    """HEIC: the top 8 bits, as 16-bit PNG/TIFF; AVIF: libavif's rounding, within one level of them."""
    side = 2 ** (bits // 2)  # every level of the depth once, in a square
    levels = np.arange(2**bits).reshape(side, side)
    data = deep_heif(fmt, levels if gray else np.repeat(levels[..., None], 3, axis=2), bits)
    if fmt == "HEIF":
        stored = pillow_heif.open_heif(data, convert_hdr_to_8bit=False)
        assert stored.info["bit_depth"] == bits
        kept = np.asarray(stored.to_pillow()) if gray else np.frombuffer(stored.data, "<u2")
        stored_levels = kept.reshape(side, side, -1)[..., 0].astype(int) >> (16 - bits)
    else:
        stored_levels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED).astype(int)
        stored_levels = stored_levels if gray else stored_levels[..., 0]
    np.testing.assert_array_equal(stored_levels, levels)  # lossless: the file holds every level
    decoded = decode_image(data, f"deep.{fmt.lower()}", LIMIT).astype(int)
    assert (decoded == decoded[..., :1]).all()  # gray stays gray
    top_bits = levels >> (bits - 8)
    if fmt == "HEIF":
        np.testing.assert_array_equal(decoded[..., 0], top_bits)
    else:
        np.testing.assert_array_equal(decoded[..., 0], np.rint(levels * 255 / (2**bits - 1)))
        assert np.abs(decoded[..., 0] - top_bits).max() == 1


def test_a_heic_whose_codec_libheif_lacks_is_refused_naming_the_input() -> None:
    # an AVIF (AV1) relabelled with the HEIC brand: pillow-heif opens it, libheif has no AV1 decoder
    avif = encode(Image.fromarray(_gradient()), "AVIF")
    relabelled = avif[:8] + b"heic" + avif[12:]
    with pytest.raises(InputError, match=r"odd\.heic: cannot decode the image .*AV1"):
        decode_image(relabelled, "odd.heic", LIMIT)


def test_an_avif_of_a_brand_heic_shares_is_read_by_pillow_not_pillow_heif() -> None:
    """In a fresh process, whose first use of Pillow is ours: pillow-heif goes after Pillow's AVIF plugin."""
    avif = encode(Image.fromarray(_gradient()), "AVIF")
    mif1 = avif[:8] + b"mif1" + avif[12:]  # the generic brand both plugins claim
    script = (
        "import sys; from codeformer.imageio import read_header, decode_image; "
        "data = sys.stdin.buffer.read(); "
        "print(read_header(data).image.format, decode_image(data, 'x', 10**6).shape)"
    )
    shown = run_python(script, stdin=mif1)
    assert shown.stdout.decode().split() == ["AVIF", "(48,", "64,", "3)"]
