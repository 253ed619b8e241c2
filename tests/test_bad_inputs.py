"""The input-boundary matrix: every case through the in-process ``Predictor`` and the real HTTP server.

Each case builds one request (files generated here with Pillow/NumPy, served by a local
``FileServer`` that can misbehave on cue) and states its outcome:
- ``Picture``: the request succeeds and its JPG shows a known answer (pixel values worked
  out from the decoding rule, within JPEG's re-encoding error);
- ``Fails``: the prediction fails as a whole, and its message starts with
  ``images[i] (name): `` and says what went wrong, with no server folder in it;
- ``Invalid``: a bad option: 422 naming the field over HTTP, an error naming it in-process;
- ``Dropped``: an unknown key: over HTTP Cog drops it, names it in its log and runs the
  prediction with the rest; in-process Python refuses the keyword.
After every case that does not succeed, a good request succeeds on the same predictor.

Both transports run on weights whose detector never fires (``faceless_weights_dir``), so
that a ``Picture``'s output is the decoded input itself, compared with a known answer worked
out by hand. What the pipeline does with faces is tested elsewhere.
Set ``BAD_INPUT_MATRIX_OUT=<file>`` to write every outcome as JSON lines.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import (
    FACELESS_FETCH_TIMEOUT_S,
    deep_heif,
    encode,
    exif_turned,
    flat_canvas,
    noise,
    png_bytes,
    project_folder,
    project_sentence,
)
from PIL import Image
from weights_server import FileServer

from codeformer.errors import CodeFormerError
from codeformer.serving.client import data_uri
from codeformer.tools.inputs import ispe_claiming, png_header_claiming
from codeformer.tools.local_server import (
    LocalServer,
    closed_port_url,
    find_worker_pid,
    reset_peak_rss,
    status_kib,
)
from predict import PROJECT_ROOT, Predictor

pytestmark = pytest.mark.server

DEFAULTS = {
    "codeformer_fidelity": 0.5,
    "runtime_profile": "max_speed",  # no ParseNet pass: the profile does not matter to these cases
    "stability_mode": "safe",
    "compile_backend": "eager",
}
# CODEFORMER_FETCH_TIMEOUT_S for both transports (the session's ``faceless_predictor`` has it):
# the drip case waits this long
FETCH_TIMEOUT_S = FACELESS_FETCH_TIMEOUT_S
TRANSPORT_ENV = {"CODEFORMER_FETCH_TIMEOUT_S": str(FETCH_TIMEOUT_S)}
PIXEL_BOMB_MAX_GROWTH_KIB = 64 * 1024  # decoding 100000x100000 RGB would need 30 GB
MATRIX_OUT_ENV = "BAD_INPUT_MATRIX_OUT"
JPEG_TOLERANCE = 3.0  # mean absolute level difference that JPEG re-encoding of these pictures stays under
BAD_BASE64 = "the data URI's base64 payload is invalid"


# -- pictures with known answers -------------------------------------------------------------
def stepped(width: int = 64, height: int = 48, step: int = 30) -> np.ndarray:
    """(H, W, 3) uint8 RGB: mid grey with a darker left quarter (asymmetric, so a rotation shows)."""
    image = np.full((height, width, 3), 127, np.uint8)
    image[:, : width // 4] = 127 - step
    return image


def gray3(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=2)


Made = tuple[bytes, np.ndarray]  # file bytes, the RGB picture they must decode to


def bilevel() -> Made:
    bits = np.zeros((48, 64), bool)
    bits[:, 16:] = True  # black left quarter, white rest
    return encode(Image.fromarray(bits), "PNG"), gray3(np.where(bits, 255, 0).astype(np.uint8))


def gray_alpha() -> Made:
    # gray 0 at alpha 128 over white: 255 * (1 - 128/255) = 127
    pixels = np.zeros((48, 64, 2), np.uint8)
    pixels[..., 1] = 128
    return encode(Image.fromarray(pixels, "LA"), "PNG"), np.full((48, 64, 3), 127, np.uint8)


def palette() -> Made:
    image = Image.fromarray(stepped(step=15)).quantize(colors=8)
    return encode(image, "PNG"), np.asarray(image.convert("RGB"))


def palette_trns() -> Made:
    # index 0 (black) is transparent: it must come out white, not black
    image = Image.new("P", (64, 48), 1)
    image.putpalette([0, 0, 0, 127, 127, 127] + [0] * 762)
    image.paste(0, (0, 0, 16, 48))
    expected = np.full((48, 64, 3), 127, np.uint8)
    expected[:, :16] = 255
    return encode(image, "PNG", transparency=0), expected


def palette_alpha_tiff() -> Made:
    image = Image.new("P", (64, 48), 1)
    image.putpalette([0, 0, 0, 127, 127, 127] + [0] * 762)
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[:, :16] = 0
    with_alpha = image.convert("PA")
    with_alpha.putalpha(Image.fromarray(alpha))
    expected = np.full((48, 64, 3), 127, np.uint8)
    expected[:, :16] = 255
    return encode(with_alpha, "TIFF"), expected


def rgba() -> Made:
    pixels = np.zeros((48, 64, 4), np.uint8)
    pixels[..., 3] = 128
    return encode(Image.fromarray(pixels, "RGBA"), "PNG"), np.full((48, 64, 3), 127, np.uint8)


def rgb_trns() -> Made:
    picture = stepped()
    expected = picture.copy()
    expected[:, :16] = 255  # the darker quarter is the transparent colour
    return encode(Image.fromarray(picture), "PNG", transparency=(97, 97, 97)), expected


def gray_trns() -> Made:
    gray = stepped()[..., 0]
    expected = gray3(np.where(gray == 97, 255, gray).astype(np.uint8))
    return encode(Image.fromarray(gray), "PNG", transparency=97), expected


def cmyk_tiff() -> Made:
    # R = (255 - C)(255 - K) / 255: C = M = Y = 0, K = 128 gives 127; K = 158 gives 97
    cmyk = np.zeros((48, 64, 4), np.uint8)
    cmyk[..., 3] = 128
    cmyk[:, :16, 3] = 158
    expected = np.full((48, 64, 3), 127, np.uint8)
    expected[:, :16] = 97
    return encode(Image.fromarray(cmyk, "CMYK"), "TIFF"), expected


def cmyk_jpeg() -> Made:
    return encode(Image.fromarray(stepped()).convert("CMYK"), "JPEG", quality=95), stepped()


def ycbcr_tiff() -> Made:
    # neutral chroma (Cb = Cr = 128): R = G = B = Y
    ycc = np.full((48, 64, 3), 128, np.uint8)
    ycc[..., 0] = 127
    ycc[:, :16, 0] = 97
    return encode(Image.fromarray(ycc, "YCbCr"), "TIFF"), stepped()


def lab_tiff() -> Made:
    from skimage.color import lab2rgb

    # L* 53.3 (sRGB ~127) with a muted purple left quarter; TIFF stores a*, b* as signed bytes
    cie = np.zeros((48, 64, 3))
    cie[..., 0] = 136 * 100 / 255
    cie[:, :16] = (110 * 100 / 255, 22.0, -28.0)
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[..., 0] = np.rint(cie[..., 0] * 255 / 100)
    stored[..., 1:] = cie[..., 1:].astype(np.int8).view(np.uint8)
    expected = np.rint(lab2rgb(cie, illuminant="D65") * 255).astype(np.uint8)
    return encode(Image.fromarray(stored, "LAB"), "TIFF"), expected


def sixteen_bit_png() -> Made:
    # high byte a ramp 112..143, low byte 0x55: keeping the low byte would give a flat 85
    high = np.repeat((112 + np.arange(64) // 2).astype(np.uint16)[None, :], 48, axis=0)
    return encode(Image.fromarray((high << 8) | 0x55), "PNG"), gray3(high.astype(np.uint8))


def sixteen_bit_big_endian_tiff() -> Made:
    high = np.repeat((112 + np.arange(64) // 2).astype(np.uint16)[None, :], 48, axis=0)
    samples = ((high << 8) | 0xAA).astype(">u2")
    image = Image.frombytes("I;16B", (64, 48), samples.tobytes())
    return encode(image, "TIFF"), gray3(high.astype(np.uint8))


def int32_tiff() -> Made:
    high = np.repeat((112 + np.arange(64) // 2).astype(np.int32)[None, :], 48, axis=0)
    return encode(Image.fromarray((high << 8) | 0x7F, "I"), "TIFF"), gray3(high.astype(np.uint8))


def float_tiff() -> Made:
    values = stepped()[..., 0].astype(np.float32) / 255.0
    return encode(Image.fromarray(values, "F"), "TIFF"), stepped()


def float_tiff_of(values: np.ndarray) -> bytes:
    return encode(Image.fromarray(values.astype(np.float32), "F"), "TIFF")


def exif_rotated(orientation: int, turns: int) -> Callable[[], Made]:
    def make() -> Made:
        stored = stepped(96, 64)
        exif = Image.Exif()
        exif[0x0112] = orientation
        return encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif), np.rot90(stored, k=turns)

    return make


def animated_gif() -> Made:
    frames = [np.full((40, 56, 3), value, np.uint8) for value in (127, 40)]
    images = [Image.fromarray(frame) for frame in frames]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=100), frames[0]


def multipage_tiff() -> Made:
    pages = [stepped(), np.full((48, 64, 3), 90, np.uint8)]
    images = [Image.fromarray(page) for page in pages]
    return encode(images[0], "TIFF", save_all=True, append_images=images[1:]), pages[0]


def webp_alpha() -> Made:
    pixels = np.zeros((48, 64, 4), np.uint8)
    pixels[..., 3] = 128
    return encode(Image.fromarray(pixels, "RGBA"), "WEBP", lossless=True), np.full((48, 64, 3), 127, np.uint8)


def phone_turned(fmt: str) -> Made:
    # stored landscape with EXIF orientation 6, which the encoders put in the container (irot)
    stored = stepped(96, 64)
    return exif_turned(Image.fromarray(stored), fmt, 6, quality=95), np.rot90(stored, k=-1)


def heic_primary_of_two() -> Made:
    # the second image is the primary one: it must be the one restored, at its size
    first, primary = stepped(), stepped(56, 40, step=60)
    images = [Image.fromarray(first), Image.fromarray(primary)]
    return encode(
        images[0], "HEIF", save_all=True, append_images=images[1:], primary_index=1, quality=95
    ), primary


def animated_avif() -> Made:
    frames = [stepped(), np.full((48, 64, 3), 40, np.uint8)]
    images = [Image.fromarray(frame) for frame in frames]
    return encode(
        images[0], "AVIF", save_all=True, append_images=images[1:], duration=100, quality=95
    ), frames[0]


def ten_bit(fmt: str) -> Callable[[], Made]:
    def make() -> Made:
        # gray levels 4 * stepped: the top 8 bits are stepped's (AVIF's rounding: within one level)
        levels = stepped()[..., 0].astype(np.uint16) * 4 + 2
        return deep_heif(fmt, levels, 10), stepped()

    return make


def bomb(fmt: str, width: int, height: int) -> bytes:
    """A small ``fmt`` file whose header claims width x height pixels."""
    return ispe_claiming(encode(Image.fromarray(stepped()), fmt), width, height)


def plain(fmt: str, **params: Any) -> Callable[[], Made]:
    return lambda: (encode(Image.fromarray(stepped(step=15)), fmt, **params), stepped(step=15))


def sized(width: int, height: int) -> Callable[[], Made]:
    return lambda: (
        png_bytes(flat_canvas(width, height)),
        np.full((height, width, 3), 127, np.uint8),
    )


def truncated(fmt: str) -> bytes:
    whole = encode(Image.fromarray(noise(128, 128, seed=1)), fmt)
    return whole[: len(whole) // 2]


# -- the request side ------------------------------------------------------------------------
@dataclass
class Context:
    """What a case may use to build its request: a misbehaving file server, a project folder."""

    files: FileServer
    folder: Path  # served by ``files``
    project_folder: Path  # inside the project: local paths there are allowed

    def url(self, name: str, data: bytes, *, fail: str | None = None, content_type: str | None = None) -> str:
        (self.folder / name).write_bytes(data)
        self.files.clear_failure(name)
        if fail is not None:
            self.files.fail(name, fail, delay=1.0)  # type: ignore[arg-type]
        if content_type is not None:
            self.files.content_type(name, content_type)
        return self.files.url_for(name)

    def redirect(self, name: str, location: str) -> str:
        self.files.redirect(name, location)
        return self.files.url_for(name)

    def project_path(self, name: str, data: bytes) -> str:
        (self.project_folder / name).write_bytes(data)
        return str((self.project_folder / name).relative_to(PROJECT_ROOT))


@dataclass(frozen=True)
class Picture:
    """Success: one JPG per image; image ``index`` shows ``expected`` (RGB)."""

    expected: np.ndarray
    index: int = 0


@dataclass(frozen=True)
class Fails:
    """The prediction fails; the message starts ``images[index] (name): `` and contains ``reason``."""

    index: int
    name: str
    reason: str


@dataclass(frozen=True)
class Invalid:
    """An option or key is refused: 422 naming ``field`` over HTTP; an error naming it in-process."""

    field: str


@dataclass(frozen=True)
class Dropped:
    """An unknown key: dropped and named in Cog's log over HTTP (the request runs); refused in-process."""

    field: str


Outcome = Picture | Fails | Invalid | Dropped


@dataclass(frozen=True)
class Case:
    id: str
    build: Callable[[Context], tuple[list[str], dict[str, Any], Outcome]]


def decodes(case_id: str, name: str, make: Callable[[], Made], as_url: bool = False) -> Case:
    def build(context: Context) -> tuple[list[str], dict[str, Any], Outcome]:
        data, expected = make()
        item = context.url(name, data) if as_url else data_uri(data, name=name)
        return [item], {}, Picture(expected)

    return Case(case_id, build)


def refused(case_id: str, name: str, make: Callable[[], bytes], reason: str, as_url: bool = False) -> Case:
    def build(context: Context) -> tuple[list[str], dict[str, Any], Outcome]:
        data = make()
        item = context.url(name, data) if as_url else data_uri(data, name=name)
        return [item], {}, Fails(0, name, reason)

    return Case(case_id, build)


def served(case_id: str, name: str, reason: str | None, **behaviour: Any) -> Case:
    """A good picture behind a URL that misbehaves (``fail=``, ``content_type=``)."""

    def build(context: Context) -> tuple[list[str], dict[str, Any], Outcome]:
        picture = stepped()
        url = context.url(name, png_bytes(picture), **behaviour)
        return [url], {}, Picture(picture) if reason is None else Fails(0, name, reason)

    return Case(case_id, build)


def request(case_id: str, images: Callable[[Context], list[str]], outcome: Outcome, **options: Any) -> Case:
    return Case(case_id, lambda context: (images(context), options, outcome))


def fixed(case_id: str, item: str, outcome: Outcome) -> Case:
    """A request of one fixed string (a URL, data URI or path)."""
    return request(case_id, lambda context: [item], outcome)


def option(case_id: str, field: str, **options: Any) -> Case:
    """A good image with an option or key that must be refused, naming ``field``."""
    return request(case_id, lambda context: [good_image()], Invalid(field), **options)


def good_image() -> str:
    return data_uri(png_bytes(flat_canvas(64, 48)), name="ok.png")


def redirect_chain(context: Context) -> list[str]:
    target = context.url("target.png", png_bytes(stepped()))
    middle = context.redirect("middle.png", target)
    return [context.redirect("start.png", middle.removeprefix(context.files.url.rstrip("/")))]


def redirect_loop(context: Context) -> list[str]:
    context.redirect("ping.png", context.files.url_for("pong.png"))
    return [context.redirect("pong.png", "/ping.png")]


def third_of_three_is_bad(context: Context) -> list[str]:
    return [good_image(), good_image(), data_uri(b"GIF89a but not really", name="fake.gif")]


CASES = [
    # formats and pixel modes: the right picture, by the README's rules
    decodes("mode-1-png", "bits.png", bilevel),
    decodes("mode-L-png", "gray.png", lambda: (png_bytes(stepped()[..., 0]), stepped())),
    decodes("mode-LA-png", "gray-alpha.png", gray_alpha),
    decodes("mode-P-png", "palette.png", palette),
    decodes("mode-P-tRNS-png", "palette-trns.png", palette_trns),
    decodes("mode-PA-tiff", "palette-alpha.tiff", palette_alpha_tiff),
    decodes("mode-RGB-png", "rgb.png", plain("PNG")),
    decodes("mode-RGBA-png", "alpha.png", rgba),
    decodes("mode-RGB-tRNS-png", "rgb-trns.png", rgb_trns),
    decodes("mode-L-tRNS-png", "gray-trns.png", gray_trns),
    decodes("mode-CMYK-tiff", "cmyk.tiff", cmyk_tiff),
    decodes("mode-CMYK-jpeg", "cmyk.jpg", cmyk_jpeg),
    decodes("mode-YCbCr-tiff", "ycbcr.tiff", ycbcr_tiff),
    decodes("mode-LAB-tiff", "lab.tiff", lab_tiff),
    decodes("mode-I16-png", "deep.png", sixteen_bit_png),
    decodes("mode-I16B-tiff", "deep-be.tiff", sixteen_bit_big_endian_tiff),
    decodes("mode-I-tiff-16-bit-range", "int32.tiff", int32_tiff),
    decodes("mode-F-tiff-0-to-1", "float.tiff", float_tiff),
    refused(
        "mode-I-tiff-over-16-bit",
        "int32-big.tiff",
        lambda: encode(Image.fromarray(np.full((8, 8), 1 << 20, np.int32), "I"), "TIFF"),
        "32-bit integer samples range 1048576..1048576",
    ),
    refused(
        "mode-F-tiff-0-to-255",
        "float255.tiff",
        lambda: float_tiff_of(stepped()[..., 0].astype(np.float32)),
        "32-bit float samples range 97..127; only 0..1 is supported",
    ),
    refused(
        "mode-F-tiff-nan",
        "float-nan.tiff",
        lambda: float_tiff_of(np.full((8, 8), np.nan)),
        "NaN or infinity",
    ),
    decodes("jpeg-gray", "gray.jpg", lambda: (encode(Image.fromarray(stepped()[..., 0]), "JPEG"), stepped())),
    decodes("exif-orientation-6", "rotated6.jpg", exif_rotated(6, -1)),
    decodes("exif-orientation-8", "rotated8.jpg", exif_rotated(8, 1)),
    decodes("exif-orientation-3", "rotated3.jpg", exif_rotated(3, 2)),
    decodes("animated-gif-first-frame", "anim.gif", animated_gif),
    decodes("multipage-tiff-first-page", "pages.tiff", multipage_tiff),
    decodes("webp-lossless", "photo.webp", plain("WEBP", lossless=True)),
    decodes("webp-alpha", "alpha.webp", webp_alpha),
    decodes("bmp", "photo.bmp", plain("BMP")),
    decodes("heic", "photo.heic", plain("HEIF", quality=95)),
    decodes("avif", "photo.avif", plain("AVIF", quality=95)),
    decodes("heic-exif-orientation-6", "turned.heic", lambda: phone_turned("HEIF")),
    decodes("avif-exif-orientation-6", "turned.avif", lambda: phone_turned("AVIF")),
    decodes("heic-primary-of-two", "burst.heic", heic_primary_of_two),
    decodes("avif-animated-first-frame", "anim.avif", animated_avif),
    decodes("heic-10-bit", "deep.heic", ten_bit("HEIF")),
    decodes("avif-10-bit", "deep.avif", ten_bit("AVIF")),
    # sizes and aspect ratios
    decodes("1x1", "dot.png", sized(1, 1)),
    decodes("aspect-16-to-1", "wide.png", sized(1024, 64)),
    decodes("aspect-1-to-16", "tall.png", sized(64, 1024)),
    refused("aspect-17-to-1", "wider.png", lambda: png_bytes(flat_canvas(1088, 64)), "too elongated"),
    refused("30000x1", "strip.png", lambda: png_bytes(flat_canvas(30000, 1)), "30000x1 is too elongated"),
    refused(
        "1x30000",
        "column.png",
        lambda: png_bytes(flat_canvas(1, 30000)),
        "1x30000 is too elongated",
    ),
    refused(
        "pixel-bomb-header",
        "bomb.png",
        lambda: png_header_claiming(100_000, 100_000),
        "100000x100000 is 10000.0 megapixels, over the limit",
    ),
    refused(
        "pixel-bomb-header-heic",
        "bomb.heic",
        lambda: bomb("HEIF", 20_000, 20_000),
        "20000x20000 is 400.0 megapixels, over the limit",
    ),
    refused(
        # libavif refuses headers over 16384x16384 itself: this one is under its limit, over ours
        "pixel-bomb-header-avif",
        "bomb.avif",
        lambda: bomb("AVIF", 10_000, 10_000),
        "10000x10000 is 100.0 megapixels, over the limit",
    ),
    # unreadable files
    refused("zero-bytes", "empty.jpg", lambda: b"", "the file is empty (0 bytes)"),
    refused("truncated-png", "cut.png", lambda: truncated("PNG"), "cannot decode the image"),
    refused("truncated-jpeg", "cut.jpg", lambda: truncated("JPEG"), "cannot decode the image"),
    refused("truncated-heic", "cut.heic", lambda: truncated("HEIF"), "cannot decode the image"),
    refused("truncated-avif", "cut.avif", lambda: truncated("AVIF"), "cannot decode the image"),
    refused("random-bytes", "noise.jpg", lambda: noise(64, 64, seed=1).tobytes(), "not a readable image"),
    refused("text-file", "notes.txt", lambda: b"shopping list:\n- milk\n", "not a readable image"),
    refused(
        "unsupported-format-ico",
        "icon.ico",
        lambda: encode(Image.fromarray(stepped(32, 32)), "ICO"),
        "unsupported image format ICO",
    ),
    request("bad-third-of-three", third_of_three_is_bad, Fails(2, "fake.gif", "not a readable image")),
    # URLs
    decodes("url-png", "photo.png", plain("PNG"), as_url=True),
    served("url-wrong-content-type", "typed.png", None, content_type="text/plain"),
    request("url-two-redirects", redirect_chain, Picture(stepped())),
    served("url-404", "gone.png", "the server answered 404", fail="not_found"),
    served("url-500", "broken.png", "the server answered 500", fail="server_error"),
    refused(
        "url-html-page",
        "page.jpg",
        lambda: b"<!doctype html><html><head><title>Not Found</title></head><body>404</body></html>",
        "not a readable image",
        as_url=True,
    ),
    refused("url-empty-body", "nothing.jpg", lambda: b"", "the file is empty (0 bytes)", as_url=True),
    served("url-cut-mid-body", "reset.png", "the connection broke before the whole file arrived", fail="cut"),
    served(
        "url-closed-mid-body",
        "short.png",
        "the connection broke before the whole file arrived",
        fail="truncated",
    ),
    served("url-one-byte-a-second", "drip.png", f"did not finish within {FETCH_TIMEOUT_S} s", fail="drip"),
    served("url-endless-body", "endless.png", "the file is over 256 MB", fail="endless"),
    served("url-declares-1-tb", "huge.png", "the file is over 256 MB", fail="huge_length"),
    request(
        "url-redirect-to-file",
        lambda context: [context.redirect("escape.png", "file:///etc/passwd")],
        Fails(0, "escape.png", "redirects to file://; only http(s) redirects are followed"),
    ),
    request(
        "url-redirect-loop",
        redirect_loop,
        Fails(0, "pong.png", "redirects more than 5 times"),
    ),
    request(
        "url-connection-refused",
        lambda context: [closed_port_url("gone.jpg")],
        Fails(0, "gone.jpg", "could not connect: Connection refused"),
    ),
    fixed("url-ftp-scheme", "ftp://127.0.0.1/photo.jpg", Fails(0, "photo.jpg", "ftp:// is not accepted")),
    fixed("url-file-scheme", "file:///etc/passwd", Fails(0, "passwd", "file:// is not accepted")),
    # data URIs
    *[
        fixed(f"data-uri-{what}", f"data:image/png;name={name};base64,{payload}", Fails(0, name, BAD_BASE64))
        for what, name, payload in [
            ("bad-base64", "pad.png", "AAA"),
            ("not-base64-alphabet", "junk.png", "@@@@"),
        ]
    ],
    request(
        "data-uri-percent-encoded",
        lambda context: [
            "data:image/png;name=plain.png," + "".join(f"%{b:02x}" for b in png_bytes(stepped()))
        ],
        Picture(stepped()),
    ),
    fixed(
        "data-uri-empty",
        "data:image/jpeg;name=none.jpg;base64,",
        Fails(0, "none.jpg", "the file is empty (0 bytes)"),
    ),
    request(
        "data-uri-unnamed",
        lambda context: [data_uri(b"not an image", media_type="image/png")],
        Fails(0, "data URI, image/png", "not a readable image"),
    ),
    # local paths
    request(
        "path-inside-project",
        lambda context: [context.project_path("canvas.png", png_bytes(stepped()))],
        Picture(stepped()),
    ),
    *[
        fixed(f"path-{what}", path, Fails(0, "hostname", "local paths must point inside the project folder"))
        for what, path in [("outside-project", "/etc/hostname"), ("dotdot", "data/../../../etc/hostname")]
    ],
    fixed(
        "path-missing",
        "data/no-such-photo.jpg",
        Fails(0, "no-such-photo.jpg", "no such file in the project folder"),
    ),
    # options and keys
    option("fidelity-below-0", "codeformer_fidelity", codeformer_fidelity=-0.1),
    option("fidelity-above-1", "codeformer_fidelity", codeformer_fidelity=1.1),
    option("fidelity-text", "codeformer_fidelity", codeformer_fidelity="high"),
    request(
        "profile-unknown", lambda context: [good_image()], Invalid("runtime_profile"), runtime_profile="turbo"
    ),
    request(
        "mode-unknown", lambda context: [good_image()], Invalid("stability_mode"), stability_mode="reckless"
    ),
    request(
        "backend-unknown", lambda context: [good_image()], Invalid("compile_backend"), compile_backend="trt"
    ),
    request(
        "misspelled-key",
        lambda context: [good_image()],
        Dropped("codeformer_fidelty"),
        codeformer_fidelty=0.9,
    ),
    request("unknown-key", lambda context: [good_image()], Dropped("upscale"), upscale=2),
    request("no-images", lambda context: [], Invalid("images")),
    request("five-images", lambda context: [good_image()] * 5, Invalid("images")),
]


# -- the two transports ------------------------------------------------------------------------
@dataclass
class Answer:
    """What a transport made of a request, in one shape for the assertions."""

    outputs: list[bytes] = field(default_factory=list)
    error: str | None = None  # a failed prediction's message, without Cog's prefix
    invalid: str | None = None  # the refused field's name and message (422 / error before running)
    log: str = ""  # over HTTP: what the server logged while it answered


class Transport:
    name: str

    def send(self, images: list[str], options: dict[str, Any]) -> Answer:
        raise NotImplementedError


class InProcess(Transport):
    name = "in-process"

    def __init__(self, predictor: Predictor) -> None:
        self.predictor = predictor

    def send(self, images: list[str], options: dict[str, Any]) -> Answer:
        try:
            paths = asyncio.run(self.predictor.run(images=images, **{**DEFAULTS, **options}))
        except TypeError as exc:  # an unknown keyword: Python names it
            return Answer(invalid=str(exc))
        except CodeFormerError as exc:
            message = str(exc)
            return Answer(error=message) if message.startswith("images[") else Answer(invalid=message)
        return Answer(outputs=[path.read_bytes() for path in paths])


class OverHttp(Transport):
    name = "http"

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.client = server.client

    def send(self, images: list[str], options: dict[str, Any]) -> Answer:
        log_start = len(self.server.log_text())
        result = self.client.predict({"images": images, **{**DEFAULTS, **options}})
        if result.http_status == 422:
            return Answer(invalid=json.dumps(result.body["detail"]))
        assert result.http_status == 200, result.body
        log = self.server.log_text()[log_start:]
        if result.status == "succeeded":
            return Answer(outputs=result.output_bytes(), log=log)
        assert result.status == "failed" and result.output == [], result.body
        return Answer(error=project_sentence(result.error), log=log)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Context]:
    folder = tmp_path_factory.mktemp("served-inputs")
    with project_folder() as inside_project, FileServer(folder) as files:
        yield Context(files, folder, inside_project)


@pytest.fixture(scope="module")
def in_process(faceless_predictor: Predictor) -> InProcess:
    return InProcess(faceless_predictor)


@pytest.fixture(scope="module")
def over_http(faceless_weights_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OverHttp]:
    log_path = tmp_path_factory.mktemp("matrix-server") / "cog-server.log"
    env = {"CODEFORMER_WEIGHTS_DIR": str(faceless_weights_dir), **TRANSPORT_ENV}
    with LocalServer(env, log_path=log_path) as server:
        yield OverHttp(server)


@pytest.fixture(params=["in-process", "http"])
def transport(request: pytest.FixtureRequest) -> Transport:
    return request.getfixturevalue("in_process" if request.param == "in-process" else "over_http")


def output_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        return np.asarray(image.convert("RGB"))


def record(transport: str, case: str, outcome: str, message: str) -> None:
    target = os.environ.get(MATRIX_OUT_ENV)
    if target:
        with open(target, "a") as out:
            out.write(
                json.dumps({"transport": transport, "case": case, "outcome": outcome, "message": message})
            )
            out.write("\n")


def check(answer: Answer, outcome: Outcome, image_count: int) -> str:
    """Assert the answer matches the stated outcome; returns a line for the record."""
    if isinstance(outcome, Picture):
        assert answer.error is None and answer.invalid is None, answer
        assert len(answer.outputs) == image_count
        expected = outcome.expected
        shown = output_rgb(answer.outputs[outcome.index])
        assert shown.shape == expected.shape, f"output {shown.shape}, expected {expected.shape}"
        difference = np.abs(shown.astype(np.int16) - expected.astype(np.int16)).mean()
        assert difference <= JPEG_TOLERANCE, f"mean difference {difference:.1f} from the known answer"
        return f"{shown.shape[1]}x{shown.shape[0]} JPG, mean difference {difference:.2f}"
    if isinstance(outcome, Fails):
        assert answer.error is not None, f"expected a failure naming images[{outcome.index}], got {answer}"
        assert answer.error.startswith(f"images[{outcome.index}] ({outcome.name}): "), answer.error
        assert answer.error.count("images[") == 1, f"labelled once: {answer.error}"
        assert outcome.reason in answer.error, answer.error
        assert str(PROJECT_ROOT) not in answer.error and "/tmp/" not in answer.error, answer.error
        return answer.error
    if isinstance(outcome, Dropped):
        if answer.invalid is not None:  # in-process: Python names the unexpected keyword
            assert outcome.field in answer.invalid, answer.invalid
            return answer.invalid
        assert answer.error is None and len(answer.outputs) == image_count, answer
        [dropped] = [line for line in answer.log.splitlines() if "Stripped unknown input fields" in line]
        assert outcome.field in dropped, dropped
        return dropped
    assert answer.invalid is not None, f"expected {outcome.field} to be refused, got {answer}"
    assert outcome.field in answer.invalid, answer.invalid
    return answer.invalid


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_input_case_gives_its_stated_outcome(transport: Transport, context: Context, case: Case) -> None:
    images, options, outcome = case.build(context)
    answer = transport.send(images, options)
    line = check(answer, outcome, len(images))
    record(transport.name, case.id, type(outcome).__name__, line)
    if not isinstance(outcome, Picture):
        good = transport.send([good_image()], {})
        assert good.error is None and good.invalid is None and len(good.outputs) == 1, good


# -- memory: a pixel bomb allocates nothing ----------------------------------------------------
def peak_growth_kib(pid: int, send: Callable[[], Answer]) -> tuple[Answer, int]:
    if not reset_peak_rss(pid):
        pytest.skip(f"/proc/{pid}/clear_refs is not writable here: cannot reset the peak RSS")
    before_kib = status_kib(pid, "VmRSS")
    answer = send()
    return answer, status_kib(pid, "VmHWM") - before_kib


@pytest.mark.parametrize(
    ("claimed", "fmt"),
    # Pillow's AVIF plugin would decode a 10000x10000 frame (300 MB) from the small coded one
    [((100_000, 100_000), "PNG"), ((30_000, 1), "PNG"), ((10_000, 10_000), "AVIF")],
    ids=["bomb", "strip", "bomb-avif"],
)
def test_oversized_images_leave_the_worker_memory_flat(
    transport: Transport, claimed: tuple[int, int], fmt: str
) -> None:
    if isinstance(transport, OverHttp):
        assert transport.server.process is not None
        pid = find_worker_pid(transport.server.process.pid)
        assert pid is not None, "no coglet worker among the server's children"
    else:
        pid = os.getpid()
    data = png_header_claiming(*claimed) if fmt == "PNG" else bomb(fmt, *claimed)
    name = f"big.{fmt.lower()}"
    answer, growth_kib = peak_growth_kib(pid, lambda: transport.send([data_uri(data, name=name)], {}))
    assert answer.error is not None and answer.error.startswith(f"images[0] ({name}): "), answer
    case = f"memory-{claimed[0]}x{claimed[1]}" + ("" if fmt == "PNG" else f"-{fmt.lower()}")
    record(transport.name, case, "flat", f"peak RSS growth {growth_kib} KiB")
    assert growth_kib < PIXEL_BOMB_MAX_GROWTH_KIB
