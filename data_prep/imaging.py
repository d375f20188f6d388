"""Image decoding with named failure reasons, RGB conversion, hashing and normalisation.

Everything here works on one image and knows nothing of Ray; the curation transforms call it per sample.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
"""Stored extension -> PIL format name."""
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
_KEEP_MODES = ("RGB", "L")
_ORIENTATION_TAG = 0x0112


@dataclass(kw_only=True)
class ImageConfig:
    short_side: int = 384
    """Images whose short side exceeds this are resized down to it (never upscaled)."""
    quality: int = 90
    """JPEG / WebP quality of re-encoded images."""
    format: str = "jpg"
    """Format of re-encoded images: jpg, png or webp. Images within bounds keep their bytes and format."""
    max_pixels: int = 89_478_485
    """Decompression-bomb cap: an image with more pixels is rejected before decoding (PIL's default)."""

    def __post_init__(self) -> None:
        if self.short_side < 1:
            raise ValueError(f"image.short_side must be >= 1, got {self.short_side}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"image.quality must be in 1..100, got {self.quality}")
        if self.format not in ENCODE_FORMATS:
            raise ValueError(f"image.format must be one of {sorted(ENCODE_FORMATS)}, got {self.format!r}")
        if self.max_pixels < 1:
            raise ValueError(f"image.max_pixels must be >= 1, got {self.max_pixels}")


class Rejected(Exception):
    """A sample that fails validation or a filter; ``reason`` is a stable name counted in the ledger."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass
class Decoded:
    """A decoded, oriented RGB image and what normalisation needs to know about its source bytes."""

    rgb: Image.Image
    keep_bytes_ok: bool
    """The original bytes already show this RGB image (8-bit L/RGB JPEG/PNG/WebP, no EXIF rotation)."""
    ext: str | None
    """Stored extension of the original format when it is one we store."""


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully load ``data``; raises :class:`Rejected` with the reason it cannot be used."""
    if len(data) == 0:
        raise Rejected("empty_file", "zero bytes")
    Image.MAX_IMAGE_PIXELS = max_pixels  # PIL warns above it, raises above twice it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise Rejected("decompression_bomb", f"{width}x{height} pixels > max_pixels {max_pixels}")
            img.load()
    except Rejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected("decompression_bomb", str(exc)) from None
    except UnidentifiedImageError as exc:
        raise Rejected("unreadable_image", str(exc)) from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, struct.error... for bad data
        reason = "truncated_image" if "truncated" in str(exc).lower() else "corrupt_image"
        raise Rejected(reason, f"{type(exc).__name__}: {exc}") from None
    if width < 1 or height < 1:
        raise Rejected("corrupt_image", f"size {width}x{height}")
    return img


def _sixteen_bit_to_rgb(img: Image.Image) -> Image.Image:
    arr = np.asarray(img)
    if arr.dtype.kind == "f":
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
    else:
        arr8 = (np.clip(arr.astype(np.int64), 0, 65535) // 257).astype(np.uint8)
    return Image.fromarray(arr8, mode="L").convert("RGB")


def _alpha_to_rgb(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> tuple[Image.Image, bool]:
    """Apply EXIF orientation and convert any mode to 8-bit RGB; returns (image, pixels_changed_from_bytes)."""
    orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    rotated = orientation not in (1, None)
    if rotated:
        img = ImageOps.exif_transpose(img)
    mode = img.mode
    if mode == "RGB":
        return img, rotated
    if mode == "L":
        return img.convert("RGB"), rotated
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_rgb(img), True
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB"), True
    if mode in ("RGBA", "LA", "PA", "RGBa", "La", "P"):
        return _alpha_to_rgb(img), True
    return img.convert("RGB"), True  # CMYK, YCbCr, LAB, HSV, 1


def decode_image(data: bytes, max_pixels: int) -> Decoded:
    img = open_image(data, max_pixels)
    fmt = img.format
    source_mode = img.mode
    rgb, changed = to_rgb(img)
    ext = _KEEP_FORMATS.get(fmt or "")
    keep = ext is not None and source_mode in _KEEP_MODES and not changed
    return Decoded(rgb=rgb, keep_bytes_ok=keep, ext=ext)


def content_hash(rgb: Image.Image) -> str:
    """Exact-duplicate hash: SHA-256 of the size and the decoded, oriented RGB pixels (not the file bytes),
    so the same picture stored as PNG and as lossless WebP, or with different metadata, is one image."""
    h = hashlib.sha256(f"{rgb.width}x{rgb.height}\0".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def text_hash(text: str) -> str:
    """Exact text dedup: SHA-256 of the text with surrounding whitespace stripped."""
    return hashlib.sha256(text.strip().encode("utf-8")).hexdigest()


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    x = np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * x + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    m[0] /= np.sqrt(2.0)
    return m


_DCT32 = _dct_matrix(32)
_BIT_WEIGHTS = (1 << np.arange(63, -1, -1, dtype=np.uint64)).astype(np.uint64)


def phash64(rgb: Image.Image) -> int:
    """64-bit perceptual hash (pHash): 32x32 grey, 2-D DCT, 8x8 lowest frequencies above their median."""
    grey = np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].ravel()
    bits = (low > np.median(low)).astype(np.uint64)
    return int((bits * _BIT_WEIGHTS).sum(dtype=np.uint64))


def phash_hex(value: int) -> str:
    return f"{value:016x}"


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def encode_pixels(img: Image.Image, ext: str, quality: int = 90, *, subsampling: int = -1) -> bytes:
    """The one image encoder of the project: ``ext`` is a stored extension (jpg, png, webp); no metadata
    chunks, no progressive or optimised JPEG, so the same pixels always give the same bytes. ``subsampling``
    is JPEG's chroma subsampling (-1: PIL's default 4:2:0; 0: none, for small drawn images)."""
    if ext not in ENCODE_FORMATS:
        raise ValueError(f"unsupported image format {ext!r}; valid: {sorted(ENCODE_FORMATS)}")
    fmt = ENCODE_FORMATS[ext]
    buf = io.BytesIO()
    if fmt == "PNG":
        img.save(buf, format=fmt, compress_level=6)
    elif fmt == "WEBP":
        img.save(buf, format=fmt, quality=quality, method=4)
    else:
        img.save(buf, format=fmt, quality=quality, optimize=False, progressive=False, subsampling=subsampling)
    return buf.getvalue()


def encode_image(rgb: Image.Image, cfg: ImageConfig) -> bytes:
    """A curated image in the job's output format."""
    return encode_pixels(rgb, cfg.format, cfg.quality)


def normalise_image(decoded: Decoded, data: bytes, cfg: ImageConfig) -> tuple[Image.Image, bytes, str]:
    """Resize the short side down to ``cfg.short_side`` and re-encode; images within bounds that need no
    conversion keep their bytes. Returns (stored RGB image, stored bytes, stored extension)."""
    rgb = decoded.rgb
    short = min(rgb.size)
    if short > cfg.short_side:
        if rgb.width <= rgb.height:
            size = (cfg.short_side, max(1, round(rgb.height * cfg.short_side / rgb.width)))
        else:
            size = (max(1, round(rgb.width * cfg.short_side / rgb.height)), cfg.short_side)
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        return rgb, encode_image(rgb, cfg), cfg.format
    if decoded.keep_bytes_ok and decoded.ext is not None:
        return rgb, data, decoded.ext
    return rgb, encode_image(rgb, cfg), cfg.format
