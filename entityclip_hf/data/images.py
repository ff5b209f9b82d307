"""Is an image usable? `image_error` opens a file (or its bytes) and says why not, cheaply or thoroughly."""

from __future__ import annotations

import io
import os

from PIL import Image

# How far from its end a JPEG's end-of-image marker may sit (some writers append a few bytes after it).
_JPEG_TAIL_BYTES = 4096
# Markers that stand alone, without a length field: TEM and the restart markers RST0-RST7.
_JPEG_STANDALONE_MARKERS = frozenset([0x01, *range(0xD0, 0xD8)])


def _jpeg_main_scan_offset(handle) -> int | None:
    """Where the main image's first start-of-scan (SOS) marker ends, or None when the marker segments do not lead
    to one (a file cut short before its scan, or a damaged header).

    The segments before the scan are skipped by their length fields: an EXIF (APP1) or Photoshop (APP13) thumbnail
    is a whole JPEG inside such a segment, and its own markers, end-of-image included, must not be taken for the
    main image's.
    """
    handle.seek(0)
    if handle.read(2) != b"\xff\xd8":
        return None
    while True:
        if handle.read(1) != b"\xff":
            return None  # every segment starts with 0xFF: the header is damaged
        marker = handle.read(1)
        while marker == b"\xff":  # fill bytes before a marker are allowed
            marker = handle.read(1)
        if not marker:
            return None
        code = marker[0]
        if code == 0xDA:
            return handle.tell()
        if code in _JPEG_STANDALONE_MARKERS:
            continue
        if code == 0xD9:
            return None  # an end of image before any scan: no main image
        length = handle.read(2)
        if len(length) < 2 or int.from_bytes(length, "big") < 2:
            return None
        handle.seek(int.from_bytes(length, "big") - 2, os.SEEK_CUR)


def _open_binary(image: str | bytes):
    """A binary file handle on an image file (a path) or on an image's encoded bytes."""
    return io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else open(image, "rb")


def _jpeg_has_end_marker(path: str | bytes) -> bool:
    """True when an end-of-image marker follows the main image's start of scan, near the end of the file.

    In the entropy-coded data after the scan a 0xFF byte is always followed by 0x00 or a restart marker, so a
    0xFF 0xD9 found there is an end of image: the main image's, not an embedded thumbnail's.
    """
    with _open_binary(path) as handle:
        scan_offset = _jpeg_main_scan_offset(handle)
        if scan_offset is None:
            return False
        size = handle.seek(0, os.SEEK_END)
        handle.seek(max(scan_offset, size - _JPEG_TAIL_BYTES))
        return b"\xff\xd9" in handle.read()


def image_error(path: str | bytes, mode: str) -> str | None:
    """Why the image file at `path` (or the encoded image `path` holds, as bytes) cannot be used, or None. `mode`:
    "header" (open + verify) or "decode".

    "header" also catches the most common damage, a JPEG cut short (an interrupted download or copy): PIL's verify
    reads only a JPEG's headers, so a JPEG without an end-of-image marker near its end, after the main image's start
    of scan, is decoded to decide.
    """
    try:
        with Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path) as image:
            if mode == "decode":
                image.load()
                return None
            image_format = image.format
            image.verify()
        if image_format == "JPEG" and not _jpeg_has_end_marker(path):
            with Image.open(io.BytesIO(path) if isinstance(path, (bytes, bytearray)) else path) as image:
                image.load()
    # PIL raises many exception types on damaged files (OSError, SyntaxError, struct.error, IndexError, ...): one
    # bad file must be reported, never stop the check of the others.
    except Exception as error:  # noqa: BLE001
        return f"{type(error).__name__}: {error}"
    return None


__all__ = ["image_error"]
