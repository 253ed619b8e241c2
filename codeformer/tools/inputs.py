"""Generated request inputs: small PNGs with and without faces, and the bad inputs of the soak
(``BAD_KINDS``, in the order ``soak_plan`` sends them).

Each bad input comes with how the server must answer it: 422 from the schema, or a failed
prediction whose error names the image and says what is wrong. ``png_header_claiming``
and ``ispe_claiming`` (pixel-bomb headers) are also sent by the tests of the input boundary.
``gray_icc_profile`` and ``cmyk_icc_profile`` make the ICC profiles of those kinds that Pillow cannot (its
``ImageCms.createProfile`` makes RGB, L*a*b* and XYZ ones only), for tests and ``bench_stages.py --host``.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from codeformer.icc import write_profile, xyz_tag
from codeformer.serving.client import data_uri

D50 = (0.9642, 1.0, 0.8249)  # the ICC connection space's white


def _encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def flat_canvas_png(width: int = 64, height: int = 64, compress_level: int = 6) -> bytes:
    """A flat grey canvas: the random detector finds no face on it (level 1 for huge ones: faster)."""
    canvas = Image.fromarray(np.full((height, width, 3), 127, np.uint8))
    return _encode(canvas, "PNG", compress_level=compress_level)


def textured_png(width: int = 160, height: int = 120, seed: int = 0) -> bytes:
    """Uniform noise: the random (seed-0) detector finds faces on it, so CodeFormer runs."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return _encode(Image.fromarray(pixels), "PNG")


def png_header_claiming(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (wrong) IDAT: a pixel-bomb header."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + payload))
        return struct.pack(">I", len(payload)) + kind + payload + crc

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


def ispe_claiming(heif: bytes, width: int, height: int) -> bytes:
    """A HEIC or AVIF file whose ``ispe`` boxes claim width x height: a pixel-bomb header.

    ``ispe`` (ISO/IEC 23008-12, image spatial extents) is where both formats state an image's
    size: 4 bytes of size, ``ispe``, 4 of version and flags, then width and height as
    big-endian 32-bit numbers. Every one is rewritten (a file may hold several images);
    the coded data stays that of the small original.
    """
    claimed = bytearray(heif)
    at = claimed.find(b"ispe")
    if at < 4:
        raise ValueError("no ispe box: not a HEIC or AVIF file")
    while at != -1:
        struct.pack_into(">II", claimed, at + 8, width, height)
        at = claimed.find(b"ispe", at + 4)
    return bytes(claimed)


def _icc_header(device_class: bytes, colour_space: bytes, connection_space: bytes) -> bytes:
    """A version 2.4 ICC header (128 bytes); ``write_profile`` fills in the size."""
    return (
        bytes(4)  # size
        + bytes(4)  # preferred CMM: any
        + bytes((2, 0x40, 0, 0))  # version 2.4
        + device_class
        + colour_space
        + connection_space
        + struct.pack(">6H", 2024, 1, 1, 0, 0, 0)  # created: a fixed date, so the bytes are too
        + b"acsp"
        + bytes(4 + 4 + 4 + 4 + 8)  # platform, flags, manufacturer, model, attributes
        + struct.pack(">I", 0)  # rendering intent: perceptual
        + xyz_tag(D50)[8:]  # the connection space's illuminant, three s15Fixed16
        + bytes(4 + 16 + 28)  # creator, profile ID, reserved
    )


def _text_tags(description: str) -> dict[bytes, bytes]:
    """Version 2 ``desc`` (textDescriptionType, ASCII only) and ``cprt`` (textType) tags."""
    ascii_text = description.encode("ascii") + b"\0"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(ascii_text)) + ascii_text + bytes(4 + 4 + 2 + 1 + 67)
    return {b"desc": desc, b"cprt": b"text" + bytes(4) + b"No copyright, generated for tests\0"}


def gray_icc_profile(gamma: float = 1.0) -> bytes:
    """A display gray profile whose tone curve is a power ``gamma`` (1.0: linear, far from sRGB)."""
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256))  # u8Fixed8 exponent
    tags = {**_text_tags(f"Gray gamma {gamma:g}"), b"wtpt": xyz_tag(D50), b"kTRC": curve}
    return write_profile(_icc_header(b"mntr", b"GRAY", b"XYZ "), tags)


# (C, M, Y, K) ink at 100% -> what it takes from L*, a*, b* of white paper (L* 100): cyan
# (L* 55, a* -30, b* -45), magenta, yellow, black roughly as press inks look
INK_LAB_SHIFTS = np.array(
    [[-45.0, -30.0, -45.0], [-40.0, 60.0, -5.0], [-10.0, -5.0, 80.0], [-90.0, 0.0, 0.0]]
)


def cmyk_icc_profile() -> bytes:
    """A printer CMYK profile (L*a*b* connection space) with an AToB0 table of 2 points an ink.

    Each corner of the table adds the Lab shifts of its inks to paper white, clipped; between
    corners LittleCMS interpolates. Far enough from the (255 - C)(255 - K) / 255 rule that a
    test can tell which of the two made a picture.
    """
    corners = []
    for inks in np.ndindex(2, 2, 2, 2):  # C varies slowest, as the table's order wants
        lab = np.array([100.0, 0.0, 0.0]) + np.asarray(inks) @ INK_LAB_SHIFTS
        lab = np.clip(lab, [0.0, -128.0, -128.0], [100.0, 127.0, 127.0])
        corners.append([round(lab[0] * 255 / 100), round(lab[1]) + 128, round(lab[2]) + 128])
    identity = bytes(range(256))
    table = (
        b"mft1"
        + bytes(4)
        + bytes((4, 3, 2, 0))  # 4 inputs, 3 outputs, 2 grid points, padding
        + struct.pack(">9i", 65536, 0, 0, 0, 65536, 0, 0, 0, 65536)  # identity: used with XYZ only
        + identity * 4
        + np.asarray(corners, np.uint8).tobytes()
        + identity * 3
    )
    tags = {**_text_tags("Generated CMYK"), b"wtpt": xyz_tag(D50), b"A2B0": table}
    return write_profile(_icc_header(b"prtr", b"CMYK", b"Lab "), tags)


def truncated_jpeg() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    whole = _encode(Image.fromarray(pixels), "JPEG", quality=90)
    return whole[: len(whole) // 2]


@dataclass(frozen=True)
class BadKind:
    """A bad request and how it must be answered: 422 from the schema, a failed prediction,
    or (``dropped``) Cog's rule for an unknown key: the key is dropped and the request runs."""

    name: str
    make_inputs: Callable[[str], dict[str, Any]]  # profile -> request inputs
    http_status: int  # 200 (a failed prediction, or a run with the key dropped) or 422 (the schema)
    error_contains: str  # in the failed prediction's error (ignored for 422 and dropped)
    dropped: bool = False  # an unknown key: Cog drops it, so the prediction must succeed


def _one_file(payload: bytes, file_name: str) -> Callable[[str], dict[str, Any]]:
    return lambda profile: {"images": [data_uri(payload, name=file_name)], "runtime_profile": profile}


BAD_KINDS: tuple[BadKind, ...] = (
    BadKind("zero_bytes", _one_file(b"", "empty.jpg"), 200, "the file is empty"),
    BadKind(
        "random_bytes",
        _one_file(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes(), "noise.jpg"),
        200,
        "not a readable image",
    ),
    BadKind("truncated_jpeg", _one_file(truncated_jpeg(), "cut.jpg"), 200, "cannot decode"),
    BadKind("text", _one_file(b"just some text\n", "notes.txt"), 200, "not a readable image"),
    BadKind(
        "pixel_bomb", _one_file(png_header_claiming(100_000, 100_000), "bomb.png"), 200, "over the limit"
    ),
    BadKind(
        "fidelity_out_of_range",
        lambda profile: {
            "images": [data_uri(flat_canvas_png(), name="ok.png")],
            "runtime_profile": profile,
            "codeformer_fidelity": 1.1,
        },
        422,
        "",
    ),
    BadKind(
        "unknown_profile",
        lambda profile: {"images": [data_uri(flat_canvas_png(), name="ok.png")], "runtime_profile": "turbo"},
        422,
        "",
    ),
    # extreme sizes: refused from the header, before any of the pipeline's copies exists
    BadKind("strip_30000x1", _one_file(png_header_claiming(30_000, 1), "strip.png"), 200, "too elongated"),
    BadKind("column_1x30000", _one_file(png_header_claiming(1, 30_000), "column.png"), 200, "too elongated"),
    BadKind(
        "misspelled_key",
        lambda profile: {
            "images": [data_uri(flat_canvas_png(), name="ok.png")],
            "runtime_profile": profile,
            "codeformer_fidelty": 0.9,
        },
        200,
        "",
        dropped=True,
    ),
    BadKind(
        "bad_base64",
        lambda profile: {"images": ["data:image/png;name=pad.png;base64,AAA"], "runtime_profile": profile},
        200,
        "base64 payload is invalid",
    ),
)


def soak_plan(requests_total: int, face_every: int, bad_every: int) -> list[str]:
    """The kind of every request of ``benchmarks/soak.py``, in order: "flat", "faces" (every
    ``face_every``-th) or a bad kind (every ``bad_every``-th, which wins; they rotate through BAD_KINDS)."""
    kinds: list[str] = []
    bad_turn = 0
    for index in range(requests_total):
        number = index + 1
        if bad_every and number % bad_every == 0:
            kinds.append(BAD_KINDS[bad_turn % len(BAD_KINDS)].name)
            bad_turn += 1
        elif face_every and number % face_every == 0:
            kinds.append("faces")
        else:
            kinds.append("flat")
    return kinds
