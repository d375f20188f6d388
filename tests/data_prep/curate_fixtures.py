"""Small curation inputs built in tmp_path: every source format, every kind of bad sample, real photos.

Real photographs come from the files bundled inside the scikit-image package (no downloads).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage
from PIL import Image

SKIMAGE_DATA = Path(skimage.__file__).parent / "data"
CAPTION = "a clear photograph of something"


def photo_path(name: str) -> Path:
    return SKIMAGE_DATA / name


def photo(name: str) -> Image.Image:
    return Image.open(photo_path(name)).convert("RGB")


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pattern(seed: int, size: tuple[int, int] = (256, 256)) -> Image.Image:
    """A distinct, structured picture per seed (smooth blobs, so pHashes differ between seeds)."""
    rng = np.random.default_rng(seed)
    w, h = size
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC)


def truncated_png(seed: int = 99) -> bytes:
    data = encode(pattern(seed))
    return data[: len(data) // 2]


def corrupt_png(seed: int = 98) -> bytes:
    data = bytearray(encode(pattern(seed)))
    for i in range(200, len(data) - 100, 7):  # break the compressed stream, keep header and size intact
        data[i] ^= 0x5A
    return bytes(data)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_webdataset(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """Samples {"__key__": k, ext: bytes} into a .tar or .tgz (gzip when the name says so)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = "w:gz" if path.name.endswith((".tgz", ".tar.gz")) else "w"
    with tarfile.open(path, mode) as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_hf_disk(folder: Path, rows: list[dict], class_names: list[str]) -> Path:
    """What ``datasets.Dataset.save_to_disk`` writes: arrow stream files + dataset_info.json + state.json."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    with (
        pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink,
        pa.ipc.new_stream(sink, table.schema) as writer,
    ):
        writer.write_table(table)
    info = {"features": {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": class_names}}}
    (folder / "dataset_info.json").write_text(json.dumps(info))
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}
    (folder / "state.json").write_text(json.dumps(state))
    return folder


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray instance (2 CPUs) for a module's Ray tests, or the one already running. Module-scoped, so
    modules that start their own Ray (unconditionally) find none running after ours."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def build_world(root: Path) -> dict[str, dict]:
    """Six sources covering every reader and every reject reason; returns source specs for the config.

    Cross-source duplicates: the astronaut photo is in ``photos`` (parquet, inline bytes) and again,
    resized to 60% and re-encoded as JPEG, in ``captions`` (jsonl) and byte-identical in ``folder``.
    """
    astro = photo("astronaut.png")
    coffee = photo("coffee.png")

    # --- jsonl with image paths (relative, absolute, missing) and bad rows
    jdir = root / "captions"
    (jdir / "images").mkdir(parents=True)
    for i in range(6):
        pattern(i, (320, 240)).save(jdir / "images" / f"{i}.png")
    astro.resize((307, 307)).save(jdir / "images" / "astro_small.jpg", quality=85)
    (jdir / "images" / "empty.png").write_bytes(b"")
    (jdir / "images" / "trunc.png").write_bytes(truncated_png())
    (jdir / "images" / "corrupt.png").write_bytes(corrupt_png())
    (jdir / "images" / "notimage.png").write_bytes(b"this is not an image at all")
    Image.new("RGB", (1200, 1000), (9, 9, 9)).save(jdir / "images" / "bomb.png")
    Image.new("RGB", (100, 100), (1, 2, 3)).save(jdir / "images" / "tiny.png")
    Image.new("RGB", (900, 220), (4, 5, 6)).save(jdir / "images" / "wide.png")
    rows = [{"id": f"c{i}", "image": f"images/{i}.png", "caption": f"{CAPTION} {i}"} for i in range(5)]
    rows += [
        {"id": "abs", "image": str(jdir / "images" / "5.png"), "caption": CAPTION, "similarity": 0.35},
        {"id": "astro_copy", "image": "images/astro_small.jpg", "caption": "an astronaut, resized copy"},
        {"id": "missing", "image": "images/nope.png", "caption": CAPTION},
        {"id": "zero", "image": "images/empty.png", "caption": CAPTION},
        {"id": "trunc", "image": "images/trunc.png", "caption": CAPTION},
        {"id": "corrupt", "image": "images/corrupt.png", "caption": CAPTION},
        {"id": "notimage", "image": "images/notimage.png", "caption": CAPTION},
        {"id": "bomb", "image": "images/bomb.png", "caption": CAPTION},
        {"id": "tiny", "image": "images/tiny.png", "caption": CAPTION},
        {"id": "wide", "image": "images/wide.png", "caption": CAPTION},
        {"id": "nocap", "image": "images/0.png", "caption": "   "},
        {"id": "shortcap", "image": "images/1.png", "caption": "hi"},
        {"id": "intcap", "image": "images/2.png", "caption": 12345},
        {"id": "lowclip", "image": "images/3.png", "caption": CAPTION, "similarity": 0.1},
        {"id": "nsfw", "image": "images/4.png", "caption": CAPTION, "punsafe": 0.9},
        {"id": "badscore", "image": "images/4.png", "caption": CAPTION, "similarity": "high"},
        {"id": "noimage", "caption": CAPTION},
    ]
    manifest = write_jsonl(jdir / "manifest.jsonl", rows)
    with open(manifest, "ab") as f:
        f.write(b"{not json\n")
        f.write(b'{"id": "latin1", "image": "images/0.png", "caption": "caf\xe9"}\n')
        f.write(b'{"id": "c0", "image": "images/0.png", "caption": "same key again"}\n')

    # --- parquet with inline bytes: the original astronaut, mode conversions, EXIF rotation
    rot = Image.new("RGB", (300, 220), (200, 10, 10))
    exif = rot.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    pal = pattern(20).convert("P", palette=Image.Palette.ADAPTIVE)
    sixteen = Image.fromarray((np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16))
    prow = [
        ("astro", encode(astro), "an astronaut in a space suit"),
        ("coffee", encode(coffee, "JPEG", quality=92), "a cup of coffee on a table"),
        ("cmyk", encode(pattern(21).convert("CMYK"), "JPEG"), "a cmyk image of blobs"),
        ("palette", encode(pal), "a palette image of blobs"),
        ("alpha", encode(pattern(22).convert("RGBA")), "an image with an alpha channel"),
        ("sixteen", encode(sixteen), "a sixteen bit grey gradient"),
        ("rotated", encode(rot, "JPEG", exif=exif), "a rotated red picture"),
    ]
    (root / "photos").mkdir()
    pq.write_table(
        pa.table({"key": [r[0] for r in prow], "image": [r[1] for r in prow], "caption": [r[2] for r in prow]}),
        root / "photos" / "photos.parquet",
    )

    # --- image folder with sidecars; astronaut byte-identical to the parquet one (exact duplicate)
    fdir = root / "folder"
    fdir.mkdir()
    for i in range(3):
        pattern(30 + i).save(fdir / f"{i:06d}.png")
        (fdir / f"{i:06d}.txt").write_text(f"a drawn shape number {i}")
        (fdir / f"{i:06d}.json").write_text(json.dumps({"shape": "circle", "index": i}))
    (fdir / "astro.png").write_bytes(encode(astro))
    (fdir / "astro.txt").write_text("the astronaut again")
    (fdir / "badtext.png").write_bytes(encode(pattern(40)))
    (fdir / "badtext.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    (fdir / "orphan.txt").write_text("a caption without an image")
    (fdir / "badjson.png").write_bytes(encode(pattern(41)))
    (fdir / "badjson.txt").write_text("a caption with bad json")
    (fdir / "badjson.json").write_text("{oops")

    # --- webdataset (.tgz) with conversations and an unknown (pickle) member that must never be unpickled
    conv = [{"role": "user", "content": "Which bar is highest?"}, {"role": "assistant", "content": "B"}]
    wds = [
        {"__key__": f"chart{i}", "png": encode(pattern(50 + i)), "json": json.dumps({"conversation": conv}).encode()}
        for i in range(3)
    ]
    wds[0]["pyd"] = b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."  # a pickle payload: counted, never loaded
    wds.append({"__key__": "noconv", "png": encode(pattern(55)), "json": b"{}"})
    wds.append({"__key__": "onlyjson", "json": json.dumps({"conversation": conv}).encode()})
    write_webdataset(root / "charts" / "charts-000000.tgz", wds)

    # --- HF datasets save_to_disk: class labels
    hf_rows = [{"image": {"bytes": encode(pattern(60 + i)), "path": None}, "label": i % 2} for i in range(3)]
    hf_rows.append({"image": {"bytes": encode(pattern(63)), "path": None}, "label": None})
    write_hf_disk(root / "hf", hf_rows, ["cat", "dog"])

    # --- text only, with an exact duplicate text
    write_jsonl(
        root / "text" / "text.jsonl",
        [{"id": f"t{i}", "text": f"document number {i} has several words"} for i in range(3)]
        + [{"id": "tdup", "text": "  document number 0 has several words "}, {"id": "tempty", "text": ""}],
    )
    return {
        "photos": {"name": "photos", "kind": "caption", "format": "parquet", "path": str(root / "photos")},
        "captions": {"name": "captions", "kind": "caption", "format": "jsonl", "path": str(manifest), "unit_size": 8},
        "folder": {"name": "folder", "kind": "synthetic_aesthetic", "format": "image_folder", "path": str(fdir)},
        "charts": {"name": "charts", "kind": "chart_doc", "format": "webdataset", "path": str(root / "charts")},
        "hf": {"name": "hf", "kind": "class_label", "format": "hf_disk", "path": str(root / "hf")},
        "text": {"name": "text", "kind": "text", "format": "jsonl", "path": str(root / "text" / "text.jsonl")},
    }
