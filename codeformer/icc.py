"""ICC colour profiles: which profile an output JPG carries, and how it is written into the file.

A profile says how a viewer must read the pixel values: the same RGB triple is a duller
colour in sRGB than in Display P3. The pipeline keeps RGB pixel values as they are, so an
output must carry the profile that describes them. ``decode_with_profile``
(``codeformer.imageio``) decides which one, by the input's pixel mode; this module holds
the byte-level pieces: reading a profile's header and tag table, building the RGB profile
that shows a gray image's tones as its gray profile does, and splicing a profile into a JPG
without touching its image data.

Layout (ICC.1, the same in versions 2 and 4): a 128-byte header, a tag count, one
(signature, offset, size) entry of 12 bytes per tag, then the tags' data, each at a
4-byte-aligned offset. All numbers are big-endian.
"""

from __future__ import annotations

import struct

HEADER_SIZE = 128
TAG_ENTRY = struct.Struct(">4sII")  # signature, offset from the profile's start, size in bytes

# header fields: (offset, 4-byte signature)
DEVICE_CLASS_AT = 12
COLOUR_SPACE_AT = 16
PCS_AT = 20
PROFILE_ID_AT = 84  # 16 bytes: the MD5 of a version-4 profile, zeros for "not computed"
ACSP_AT = 36

# sRGB's red, green and blue colorants adapted to the D50 connection space (Bradford), as
# in sRGB profiles (IEC 61966-2-1): their sum is D50, so (v, v, v) maps to the PCS neutral
SRGB_D50_COLORANTS = {
    b"rXYZ": (0.4360747, 0.2225045, 0.0139322),
    b"gXYZ": (0.3850649, 0.7168786, 0.0971045),
    b"bXYZ": (0.1430804, 0.0606169, 0.7141733),
}
# tags of a gray profile that keep their meaning in an RGB profile made from it
GRAY_TAGS_KEPT = (b"desc", b"cprt", b"wtpt", b"bkpt", b"chad")

# JPEG carries a profile in APP2 segments named "ICC_PROFILE\0", each with its 1-based
# sequence number and the segment count (ICC.1 annex B.4): at most 255 segments of 65519
# bytes (65535, less 2 for the length field, 12 for the name, 2 for the two counters)
JPEG_ICC_NAME = b"ICC_PROFILE\0"
JPEG_ICC_CHUNK = 65535 - 2 - len(JPEG_ICC_NAME) - 2
JPEG_ICC_MAX_BYTES = 255 * JPEG_ICC_CHUNK
JPEG_SOI = b"\xff\xd8"
JPEG_APP0 = b"\xff\xe0"
JPEG_APP2 = b"\xff\xe2"


def colour_space(profile: bytes) -> str:
    """The header's data colour space, unpadded: ``RGB``, ``GRAY``, ``CMYK``, ``Lab``...; '' if too short."""
    if len(profile) < HEADER_SIZE:
        return ""
    return profile[COLOUR_SPACE_AT : COLOUR_SPACE_AT + 4].decode("latin-1").rstrip()


def read_tags(profile: bytes) -> dict[bytes, bytes]:
    """Tag signature -> the tag's data. ``ValueError`` for a profile whose layout is broken."""
    if len(profile) < HEADER_SIZE + 4 or profile[ACSP_AT : ACSP_AT + 4] != b"acsp":
        raise ValueError("not an ICC profile (no 'acsp' signature in a 128-byte header)")
    (count,) = struct.unpack_from(">I", profile, HEADER_SIZE)
    table_end = HEADER_SIZE + 4 + count * TAG_ENTRY.size
    if table_end > len(profile):
        raise ValueError(f"the tag table ({count} tags) runs past the profile's {len(profile)} bytes")
    tags = {}
    for index in range(count):
        signature, offset, size = TAG_ENTRY.unpack_from(profile, HEADER_SIZE + 4 + index * TAG_ENTRY.size)
        if offset < table_end or offset + size > len(profile):
            raise ValueError(f"tag {signature!r} lies outside the profile's data")
        tags[signature] = profile[offset : offset + size]
    return tags


def write_profile(header: bytes, tags: dict[bytes, bytes]) -> bytes:
    """A profile from a 128-byte header and tag data; the size field is rewritten.

    Tags with identical data share one copy (ICC allows it; rTRC/gTRC/bTRC usually do).
    """
    if len(header) != HEADER_SIZE:
        raise ValueError(f"an ICC header is {HEADER_SIZE} bytes, got {len(header)}")
    data_start = HEADER_SIZE + 4 + len(tags) * TAG_ENTRY.size
    entries, blobs, offsets = [], [], {}
    end = data_start
    for signature, data in tags.items():
        if data not in offsets:
            offsets[data] = end
            padded = data + b"\0" * (-len(data) % 4)
            blobs.append(padded)
            end += len(padded)
        entries.append(TAG_ENTRY.pack(signature, offsets[data], len(data)))
    body = struct.pack(">I", len(tags)) + b"".join(entries) + b"".join(blobs)
    return struct.pack(">I", end) + header[4:] + body


def xyz_tag(xyz: tuple[float, float, float]) -> bytes:
    """An ``XYZ `` tag (XYZType): three s15Fixed16 numbers."""
    return b"XYZ \0\0\0\0" + struct.pack(">3i", *(round(value * 65536) for value in xyz))


def rgb_profile_for_gray(gray: bytes) -> bytes | None:
    """An RGB profile under which (v, v, v) looks as gray level v does under ``gray``.

    For the gray images the pipeline hands back as R = G = B (their pixel values unchanged):
    the gray profile's tone curve (``kTRC``) becomes each channel's curve, and sRGB's
    colorants, which add up to the connection space's white, give the channels their
    colour, so a neutral triple lands on exactly the XYZ the gray profile gives its level
    (ICC.1: gray profiles map a level to its curve value times the PCS white).
    Version, description, white point and copyright are the gray profile's.

    None for valid gray profiles without a tone curve over XYZ (a lookup table, or an Lab
    connection space, where the curve gives L*, not Y). ``ValueError`` if ``gray`` is broken.
    """
    tags = read_tags(gray)
    if gray[PCS_AT : PCS_AT + 4] != b"XYZ " or b"kTRC" not in tags:
        return None
    header = bytearray(gray[:HEADER_SIZE])
    header[DEVICE_CLASS_AT : DEVICE_CLASS_AT + 4] = b"mntr"  # matrix/curve RGB: a display profile
    header[COLOUR_SPACE_AT : COLOUR_SPACE_AT + 4] = b"RGB "
    header[PROFILE_ID_AT : PROFILE_ID_AT + 16] = bytes(16)  # the gray profile's ID no longer applies
    rgb_tags = {signature: tags[signature] for signature in GRAY_TAGS_KEPT if signature in tags}
    rgb_tags |= {signature: xyz_tag(xyz) for signature, xyz in SRGB_D50_COLORANTS.items()}
    rgb_tags |= dict.fromkeys((b"rTRC", b"gTRC", b"bTRC"), tags[b"kTRC"])
    return write_profile(bytes(header), rgb_tags)


def embed_in_jpeg(jpeg: bytes, profile: bytes) -> bytes:
    """``jpeg`` with ``profile`` in APP2 segments after its JFIF header; the image data is untouched.

    ``ValueError`` for bytes that do not start a JPEG and for profiles over what a JPEG carries.
    """
    if not jpeg.startswith(JPEG_SOI):
        raise ValueError("not JPEG data: it does not start with the SOI marker")
    if not 0 < len(profile) <= JPEG_ICC_MAX_BYTES:
        raise ValueError(f"a JPEG carries a profile of 1 to {JPEG_ICC_MAX_BYTES} bytes, got {len(profile)}")
    insert_at = len(JPEG_SOI)
    # JFIF wants its APP0 segment first; the profile's segments follow it
    if jpeg[insert_at : insert_at + 2] == JPEG_APP0:
        (length,) = struct.unpack_from(">H", jpeg, insert_at + 2)
        insert_at += 2 + length
    chunks = [profile[start : start + JPEG_ICC_CHUNK] for start in range(0, len(profile), JPEG_ICC_CHUNK)]
    segments = b"".join(
        JPEG_APP2
        + struct.pack(">H", 2 + len(JPEG_ICC_NAME) + 2 + len(chunk))
        + JPEG_ICC_NAME
        + bytes((number, len(chunks)))
        + chunk
        for number, chunk in enumerate(chunks, start=1)
    )
    return jpeg[:insert_at] + segments + jpeg[insert_at:]
