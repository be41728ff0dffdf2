"""Untrusted request bodies to checked images: size and pixel limits, formats, multipart.

Every way an upload can be wrong ends in an `InputError` with an HTTP status in the 4xx range and a
one-line reason, before any model sees it. Decoding happens here, in the gateway, so a hostile file
costs the gateway one request and never reaches (or stalls) a model replica.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from anomalyfleet.data.transforms import to_rgb

# Formats the CLI reads (png, jpg, bmp, tif); anything else is refused as the wrong type.
# MPO is what many cameras write as .jpg (a JPEG with extra frames): its first frame is a JPEG.
ALLOWED_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg", "BMP": "bmp", "TIFF": "tiff"}
# Leading bytes of the allowed formats: a file that starts like one but does not decode is
# corrupt (400), a file that starts like none of them is the wrong type (415).
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00", b"MM\x00*")
# Declared content types accepted for a raw body; the bytes are sniffed regardless.
RAW_TYPES = ("image/", "application/octet-stream")


class InputError(Exception):
    def __init__(self, status: int, kind: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.kind = kind
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int
    max_files: int = 32


@dataclass
class Upload:
    name: str  # file name from multipart, or "body"
    data: bytes


@dataclass
class CheckedImage:
    name: str
    data: bytes  # the original bytes (overlays are drawn from them, exactly as the CLI does)
    width: int
    height: int
    format: str


def too_large(limit: int) -> InputError:
    return InputError(413, "too_large", f"request body exceeds the limit of {limit} bytes")


def decode_image(upload: Upload, limits: Limits) -> tuple[CheckedImage, Image.Image]:
    """Checks, then decodes fully (so truncation shows now), returning the RGB image."""
    data = upload.data
    label = upload.name
    if not data:
        raise InputError(400, "empty", f"{label}: empty image")
    if len(data) > limits.max_bytes:
        raise InputError(413, "too_large", f"{label}: {len(data)} bytes exceeds the limit of {limits.max_bytes}")
    looks_like_image = data.startswith(_MAGIC)
    try:
        with warnings.catch_warnings():
            # The pixel limit below is ours; PIL's own bomb warning would only add noise.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise InputError(413, "too_many_pixels", f"{label}: image exceeds the pixel limit of {limits.max_pixels}") from None
    except Exception:  # PIL raises many types for undecodable input; all mean the same here
        if looks_like_image:
            raise InputError(400, "corrupt", f"{label}: corrupt image (cannot be decoded)") from None
        raise InputError(415, "wrong_type", f"{label}: not an image (send PNG, JPEG, BMP or TIFF)") from None
    fmt = image.format or ""
    if fmt not in ALLOWED_FORMATS:
        raise InputError(415, "wrong_type", f"{label}: {fmt or 'unknown'} images are not accepted (send PNG, JPEG, BMP or TIFF)")
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError(400, "corrupt", f"{label}: image has no pixels")
    if width * height > limits.max_pixels:
        raise InputError(413, "too_many_pixels",
                         f"{label}: {width}x{height} = {width * height} pixels exceeds the limit of {limits.max_pixels}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            rgb = to_rgb(image)  # as the CLI reads files: 16-bit and float images rescaled, not clipped
    except Exception:
        raise InputError(400, "corrupt", f"{label}: corrupt or truncated {ALLOWED_FORMATS[fmt]} image") from None
    return CheckedImage(label, data, width, height, ALLOWED_FORMATS[fmt]), rgb


def model_pixels(image: Image.Image, size: int) -> np.ndarray:
    """The (size, size, 3) uint8 input, resized as `preprocess_image` resizes (bicubic, both sides).

    The replica finishes preprocessing with `preprocess_image`, whose resize is then the identity,
    so the tensor is bit-identical to the CLI's while only size*size*3 bytes travel to the replica.
    """
    return np.asarray(image.resize((size, size), Image.BICUBIC), dtype=np.uint8)


# --- multipart/form-data ---------------------------------------------------------------------------


# `; key=value` or `; key="quoted value"` (a quoted value may hold ';' and escaped quotes).
_PARAM = re.compile(r';\s*([^=;\s]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def _header_params(value: str) -> tuple[str, dict[str, str]]:
    main = value.split(";", 1)[0]
    params = {}
    for key, val in _PARAM.findall(value[len(main):]):
        val = val.strip()
        if len(val) >= 2 and val[0] == val[-1] == '"':
            val = re.sub(r'\\(["\\])', r"\1", val[1:-1])  # only \" and \\: a Windows path keeps its \
        params[key.lower()] = val
    return main.strip().lower(), params


def is_multipart(content_type: str | None) -> bool:
    return bool(content_type) and _header_params(content_type)[0] == "multipart/form-data"


def parse_multipart(body: bytes, content_type: str) -> list[Upload]:
    """The file parts of a multipart/form-data body (parts with a filename, or named file/image)."""
    _, params = _header_params(content_type)
    boundary = params.get("boundary")
    if not boundary:
        raise InputError(400, "bad_multipart", "multipart body without a boundary")
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    chunks = (b"\r\n" + body).split(delimiter)
    if len(chunks) < 2:
        raise InputError(400, "bad_multipart", "malformed multipart body (boundary not found)")
    uploads = []
    for chunk in chunks[1:]:
        if chunk.startswith(b"--"):
            break  # closing delimiter
        head, sep, content = chunk.partition(b"\r\n\r\n")
        if not sep:
            raise InputError(400, "bad_multipart", "malformed multipart part (no header end)")
        headers = {}
        for line in head.split(b"\r\n"):
            key, colon, value = line.decode("latin-1").partition(":")
            if colon:
                headers[key.strip().lower()] = value.strip()
        _, disposition = _header_params(headers.get("content-disposition", ""))
        name = disposition.get("name", "")
        filename = disposition.get("filename")
        if filename is not None or name in ("file", "files", "image", "images"):
            uploads.append(Upload(name=filename or name or f"part{len(uploads)}", data=content))
    return uploads


__all__ = [
    "CheckedImage",
    "InputError",
    "Limits",
    "Upload",
    "decode_image",
    "is_multipart",
    "model_pixels",
    "parse_multipart",
    "too_large",
]
