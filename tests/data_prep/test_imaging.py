import io

import numpy as np
import pytest
from PIL import Image

from data_prep.imaging import (
    ImageConfig,
    Rejected,
    content_hash,
    decode_image,
    hamming,
    normalise_image,
    phash64,
)
from tests.data_prep.curate_fixtures import corrupt_png, encode, pattern, photo, truncated_png


def _reason(data: bytes, max_pixels: int = 10**8) -> str:
    with pytest.raises(Rejected) as info:
        decode_image(data, max_pixels)
    return info.value.reason


def test_decode_reasons():
    assert _reason(b"") == "empty_file"
    assert _reason(b"plain text, not an image") == "unreadable_image"
    assert _reason(truncated_png()) == "truncated_image"
    assert _reason(corrupt_png()) == "corrupt_image"
    bomb = encode(Image.new("RGB", (2000, 1000)))
    assert _reason(bomb, max_pixels=1_000_000) == "decompression_bomb"
    # far beyond PIL's own cap too: still a named reason, not a crash
    assert _reason(bomb, max_pixels=100_000) == "decompression_bomb"


@pytest.mark.parametrize(
    "img",
    [
        pattern(1).convert("CMYK"),
        pattern(2).convert("P", palette=Image.Palette.ADAPTIVE),
        pattern(3).convert("RGBA"),
        pattern(4).convert("LA"),
        Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16),
    ],
    ids=["cmyk", "palette", "rgba", "la", "16bit"],
)
def test_modes_convert_to_rgb_and_reencode(img):
    fmt = "JPEG" if img.mode == "CMYK" else "PNG"
    data = encode(img, fmt)
    decoded = decode_image(data, 10**8)
    assert decoded.rgb.mode == "RGB"
    assert not decoded.keep_bytes_ok
    _, stored, ext = normalise_image(decoded, data, ImageConfig())
    assert stored != data and ext == "jpg"
    assert Image.open(io.BytesIO(stored)).mode == "RGB"


def test_sixteen_bit_keeps_range():
    arr = np.full((32, 32), 65535, dtype=np.uint16)
    decoded = decode_image(encode(Image.fromarray(arr)), 10**8)
    assert np.asarray(decoded.rgb).min() == 255


def test_alpha_composited_on_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    rgb = decode_image(encode(img), 10**8).rgb
    assert rgb.getpixel((0, 0)) == (255, 255, 255)


def test_exif_orientation_applied():
    img = Image.new("RGB", (300, 200), (10, 200, 10))
    exif = img.getexif()
    exif[0x0112] = 6
    decoded = decode_image(encode(img, "JPEG", exif=exif), 10**8)
    assert decoded.rgb.size == (200, 300)
    assert not decoded.keep_bytes_ok


def test_normalise_resizes_large_and_keeps_small_bytes():
    cfg = ImageConfig(short_side=128, quality=80)
    big = encode(pattern(5, (400, 300)))
    rgb, stored, ext = normalise_image(decode_image(big, 10**8), big, cfg)
    assert rgb.size == (171, 128) and ext == "jpg"
    assert Image.open(io.BytesIO(stored)).size == (171, 128)
    small = encode(pattern(6, (100, 90)))
    rgb, stored, ext = normalise_image(decode_image(small, 10**8), small, cfg)
    assert stored == small and ext == "png" and rgb.size == (100, 90)  # never upscaled, bytes kept


def test_phash_catches_resized_reencoded_real_photo():
    astro = photo("astronaut.png")
    copy = Image.open(io.BytesIO(encode(astro.resize((300, 300)), "JPEG", quality=70))).convert("RGB")
    assert hamming(phash64(astro), phash64(copy)) <= 4
    assert hamming(phash64(astro), phash64(photo("coffee.png"))) > 16
    assert hamming(phash64(astro), phash64(photo("camera.png"))) > 16


def test_content_hash_is_of_pixels_not_bytes():
    img = pattern(7)
    a = decode_image(encode(img, "PNG", compress_level=1), 10**8).rgb
    b = decode_image(encode(img, "PNG", compress_level=9), 10**8).rgb
    assert content_hash(a) == content_hash(b)
    assert content_hash(a) != content_hash(pattern(8))


def test_image_config_validation_names_field():
    with pytest.raises(ValueError, match="image.format"):
        ImageConfig(format="gif")
    with pytest.raises(ValueError, match="image.short_side"):
        ImageConfig(short_side=0)
