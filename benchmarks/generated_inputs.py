"""Generated request inputs: small PNGs with and without faces, and the bad inputs of the soak.

Each bad input comes with how the server must answer it: 422 from the schema, or a failed
prediction whose error names the image and says what is wrong. ``png_header_claiming``
(a pixel-bomb header) is also sent by the tests of the input boundary.
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

from codeformer.client import data_uri


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


def truncated_jpeg() -> bytes:
    pixels = np.random.default_rng(1).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    whole = _encode(Image.fromarray(pixels), "JPEG", quality=90)
    return whole[: len(whole) // 2]


@dataclass(frozen=True)
class BadKind:
    """A bad request and how it must be answered: 422 from the schema, or a failed prediction."""

    name: str
    make_inputs: Callable[[str], dict[str, Any]]  # profile -> request inputs
    http_status: int  # 200 (a failed prediction) or 422 (refused by the schema)
    error_contains: str  # in the failed prediction's error (ignored for 422)


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
        422,
        "",
    ),
    BadKind(
        "bad_base64",
        lambda profile: {"images": ["data:image/png;name=pad.png;base64,AAA"], "runtime_profile": profile},
        200,
        "base64 payload is invalid",
    ),
)
