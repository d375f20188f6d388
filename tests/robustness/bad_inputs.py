"""A corpus of bad inputs in three sources (jsonl manifest + files, parquet tables, webdataset tars), built in
tmp_path, with the outcome each input must have: ``kept`` or the reject reason the ledger must name.

Pickle-bearing inputs carry a payload whose unpickling creates ``marker``: the file must never appear.
"""

from __future__ import annotations

import io
import json
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from tests.data_prep.curate_fixtures import corrupt_png, encode, pattern

CAPTION = "a smooth picture of coloured blobs"
SIZE = (64, 48)


class _Trap:
    """Unpickling this runs ``open(path, "w")``: proof that something unpickled untrusted bytes."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


@dataclass
class Case:
    source: str
    source_key: str
    """The input's key in its source (for rejected rows with an unusable key: file name and line)."""
    outcome: str
    """``kept`` or the reject reason."""
    what: str
    """What is wrong with it (for the README table and failure messages)."""


@dataclass
class BadCorpus:
    sources: list[dict]
    cases: list[Case]
    marker: Path
    """Appears only if something unpickled a payload."""
    pickle_members: dict[str, int] = field(default_factory=dict)
    """Member types of the tars that hold pickles: counted as ignored, never read."""


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 50 kB PNG that declares 2.5 gigapixels (grey, 8 bit): a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(b"\x00" * (width + 1) * 50, 9)  # the first rows; the decoder never gets this far
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def jpeg(seed: int) -> bytes:
    return encode(pattern(seed, SIZE), "JPEG", quality=90)


def png(seed: int) -> bytes:
    return encode(pattern(seed, SIZE))


def _mode_images() -> dict[str, bytes]:
    grad = np.linspace(0, 65535, SIZE[0] * SIZE[1]).reshape(SIZE[1], SIZE[0]).astype(np.uint16)
    trns = pattern(7, SIZE).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    trns.info["transparency"] = 0
    la = pattern(8, SIZE).convert("L")
    la.putalpha(Image.new("L", SIZE, 128))
    return {
        "cmyk.jpg": encode(pattern(3, SIZE).convert("CMYK"), "JPEG"),
        "gray16.png": encode(Image.fromarray(grad)),
        "palette.png": encode(pattern(5, SIZE).convert("P", palette=Image.Palette.ADAPTIVE)),
        "palette_trns.png": encode(trns, transparency=0),
        "rgba.png": encode(pattern(6, SIZE).convert("RGBA")),
        "la.png": encode(la),
    }


def _manifest_source(root: Path, trap: bytes, cases: list[Case]) -> dict:
    """jsonl rows pointing at image files: every broken file, every image mode, every wrong field type."""
    folder = root / "manifest"
    images = folder / "images"
    images.mkdir(parents=True)
    files = {
        "good.jpg": jpeg(1),
        "good.png": png(2),
        **_mode_images(),
        "trunc.jpg": jpeg(10)[: len(jpeg(10)) // 2],
        "trunc.png": png(11)[: len(png(11)) // 2],
        "corrupt.jpg": jpeg(12)[:4] + bytes(range(256)) * 4,
        "corrupt.png": corrupt_png(13),
        "empty.jpg": b"",
        "bomb.png": bomb_png(),
        "pickled.png": trap,
    }
    for name, data in files.items():
        (images / name).write_bytes(data)
    for i in range(4):  # images for rows whose other fields are wrong
        (images / f"ok{i}.png").write_bytes(png(20 + i))
    rows: list[tuple[dict | bytes, str, str, str]] = [
        ({"id": "good_jpg", "image": "images/good.jpg"}, "good_jpg", "kept", "a plain JPEG"),
        ({"id": "good_png", "image": "images/good.png"}, "good_png", "kept", "a plain PNG"),
        ({"id": "cmyk", "image": "images/cmyk.jpg"}, "cmyk", "kept", "CMYK JPEG (converted to RGB)"),
        ({"id": "gray16", "image": "images/gray16.png"}, "gray16", "kept", "16-bit grey PNG (to 8-bit RGB)"),
        ({"id": "palette", "image": "images/palette.png"}, "palette", "kept", "palette PNG (to RGB)"),
        (
            {"id": "palette_trns", "image": "images/palette_trns.png"},
            "palette_trns",
            "kept",
            "palette PNG with a transparent index (composited on white)",
        ),
        ({"id": "rgba", "image": "images/rgba.png"}, "rgba", "kept", "RGBA PNG (composited on white)"),
        ({"id": "la", "image": "images/la.png"}, "la", "kept", "grey + alpha PNG (composited on white)"),
        ({"id": "trunc_jpg", "image": "images/trunc.jpg"}, "trunc_jpg", "truncated_image", "JPEG cut in half"),
        ({"id": "trunc_png", "image": "images/trunc.png"}, "trunc_png", "truncated_image", "PNG cut in half"),
        (
            {"id": "corrupt_jpg", "image": "images/corrupt.jpg"},
            "corrupt_jpg",
            "unreadable_image",
            "JPEG start-of-image marker followed by garbage",
        ),
        (
            {"id": "corrupt_png", "image": "images/corrupt.png"},
            "corrupt_png",
            "corrupt_image",
            "PNG with a scrambled compressed stream",
        ),
        ({"id": "empty", "image": "images/empty.jpg"}, "empty", "empty_file", "zero-byte image file"),
        ({"id": "bomb", "image": "images/bomb.png"}, "bomb", "decompression_bomb", "PNG declaring 50000x50000 pixels"),
        (
            {"id": "pickled", "image": "images/pickled.png"},
            "pickled",
            "unreadable_image",
            "a pickle where an image should be",
        ),
        ({"id": "missing", "image": "images/nope.jpg"}, "missing", "missing_file", "image path that does not exist"),
        ({"id": "a_dir", "image": "images"}, "a_dir", "missing_file", "image path that is a directory"),
        ({"id": "no_image"}, "no_image", "missing_image", "row without an image field"),
        (
            {"id": "huge_caption", "image": "images/ok0.png", "caption": "word " * 200_000},
            "huge_caption",
            "text_too_long",
            "1 MB caption",
        ),
        (
            {"id": "surrogate", "image": "images/ok1.png", "caption": "\ud800 lone surrogate"},
            "surrogate",
            "non_utf8_text",
            "caption with a lone UTF-16 surrogate",
        ),
        (
            b'{"id": "latin1", "image": "images/ok1.png", "caption": "caf\xe9 au lait"}',
            "manifest.jsonl:{line}",
            "non_utf8_text",
            "Latin-1 bytes in a caption",
        ),
        (
            {"id": "int_caption", "image": "images/ok2.png", "caption": 12345},
            "int_caption",
            "bad_column_type",
            "caption is a number",
        ),
        (
            {"id": "list_caption", "image": "images/ok2.png", "caption": ["a", "b"]},
            "list_caption",
            "bad_column_type",
            "caption is a list",
        ),
        ({"id": "int_image", "image": 7}, "int_image", "bad_column_type", "image field is a number"),
        (
            {"id": {"nested": 1}, "image": "images/ok3.png"},
            "manifest.jsonl:{line}",
            "bad_column_type",
            "key is an object",
        ),
        ({"id": 1.5, "image": "images/ok3.png"}, "manifest.jsonl:{line}", "bad_column_type", "key is a float"),
        (
            {"id": "str_score", "image": "images/ok3.png", "similarity": "high"},
            "str_score",
            "bad_column_type",
            "score is a string",
        ),
        (
            {"id": "null_caption", "image": "images/ok3.png", "caption": None},
            "null_caption",
            "empty_text",
            "caption is null",
        ),
        (b"[1, 2, 3]", "manifest.jsonl:{line}", "bad_json", "line is a JSON list"),
        (b"{not json", "manifest.jsonl:{line}", "bad_json", "line is not JSON"),
        (b"[" * 100_000, "manifest.jsonl:{line}", "bad_json", "JSON nested 100000 deep"),
        (
            b'{"id": ' + b"1" * 5000 + b"}",
            "manifest.jsonl:{line}",
            "bad_json",
            "5000-digit key (past Python's int limit)",
        ),
        ({"id": "good_jpg", "image": "images/ok0.png"}, "good_jpg", "duplicate_key", "a key seen before"),
    ]
    lines = []
    for lineno, (row, key, outcome, what) in enumerate(rows, start=1):
        if isinstance(row, dict):
            row = {"caption": CAPTION, **row}
            lines.append(json.dumps(row).encode())
        else:
            lines.append(row)
        cases.append(Case("manifest", key.format(line=lineno), outcome, what))
    (folder / "manifest.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return {
        "name": "manifest",
        "kind": "caption",
        "format": "jsonl",
        "path": str(folder / "manifest.jsonl"),
        "unit_size": 8,
        "filters": {"min_side": 16},
    }


def _table_source(root: Path, cases: list[Case]) -> dict:
    """Parquet files: a good one, one whose columns have the wrong types, a zero-byte one, a garbage one."""
    folder = root / "tables"
    folder.mkdir()
    pq.write_table(pa.table({"key": ["t_good"], "image": [png(30)], "caption": [CAPTION]}), folder / "a_good.parquet")
    pq.write_table(
        pa.table({"key": ["t_int_image", "t_null_image"], "image": [1, None], "caption": [CAPTION, None]}),
        folder / "b_types.parquet",
    )
    pq.write_table(
        pa.table({"key": ["t_list_caption"], "image": [png(31)], "caption": [["x", "y"]]}), folder / "c_list.parquet"
    )
    (folder / "d_empty.parquet").write_bytes(b"")
    (folder / "e_garbage.parquet").write_bytes(b"PAR1 this is not parquet at all " * 10)
    cases += [
        Case("tables", "t_good", "kept", "inline image bytes"),
        Case("tables", "t_int_image", "bad_column_type", "image column of integers"),
        Case("tables", "t_null_image", "missing_image", "null in the image column"),
        Case("tables", "t_list_caption", "bad_column_type", "caption column of lists"),
        Case("tables", "d_empty.parquet#unreadable", "corrupt_file", "zero-byte parquet file"),
        Case("tables", "e_garbage.parquet#unreadable", "corrupt_file", "a file that is not parquet"),
    ]
    return {"name": "tables", "kind": "caption", "format": "parquet", "path": str(folder), "filters": {"min_side": 16}}


def _tar(path: Path, members: list[tuple[str, bytes]], mode: str = "w") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode, format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def _tar_source(root: Path, trap: bytes, trap_npy: bytes, cases: list[Case]) -> dict:
    """Webdataset tars: unsafe member names, pickles, scattered keys, a truncated tar, broken archives."""
    folder = root / "tars"
    folder.mkdir()
    txt = CAPTION.encode()
    _tar(
        folder / "a-000000.tar",
        [
            ("w0.jpg", jpeg(40)),
            ("w0.txt", txt),
            ("w0.pyd", trap),
            ("w1.png", png(41)),
            ("w1.txt", txt),
            ("w1.pickle", trap),
            ("w1.pth", trap),
            ("w1.vq.npy", trap_npy),
            ("../escape.jpg", jpeg(42)),
            ("../escape.txt", txt),
            ("/abs/evil.jpg", jpeg(43)),
            ("/abs/evil.txt", txt),
            ("dir/../../up.jpg", jpeg(44)),
            ("dir/../../up.txt", txt),
            ("badtxt.jpg", jpeg(45)),
            ("badtxt.txt", b"\xff\xfe caf\xe9"),
            ("twice.jpg", jpeg(46)),
            ("twice.jpg", jpeg(47)),
            ("twice.txt", txt),
        ],
    )
    _tar(
        folder / "b-000001.tar",
        [
            ("u0.jpg", jpeg(50)),
            ("u1.jpg", jpeg(51)),
            ("u0.txt", txt),
            ("u1.txt", txt),
            ("w0.jpg", jpeg(52)),
            ("w0.txt", txt),
        ],
    )
    data = _tar(
        folder / "c-000002.tar",
        [
            ("t0.jpg", jpeg(60)),
            ("t0.txt", txt),
            ("t1.jpg", jpeg(61)),
            ("t1.txt", txt),
            ("t2.jpg", jpeg(62)),
            ("t2.txt", txt),
        ],
    )
    cut = data.index(jpeg(62)) + 100  # inside t2.jpg's data
    (folder / "c-000002.tar").write_bytes(data[:cut])
    gz = io.BytesIO()
    with tarfile.open(fileobj=gz, mode="w:gz") as tar:
        info = tarfile.TarInfo("z0.jpg")
        info.size = len(jpeg(70))
        tar.addfile(info, io.BytesIO(jpeg(70)))
    raw = bytearray(gz.getvalue())
    raw[20:] = bytes((b ^ 0xA5) for b in raw[20:])  # gzip header intact, deflate stream scrambled
    (folder / "d-000003.tgz").write_bytes(bytes(raw))
    (folder / "e-000004.tar").write_bytes(b"")
    (folder / "f-000005.tar").write_bytes(b"just some text, not a tar archive\n" * 40)
    cases += [
        Case("tars", "w0", "kept", "sample with a .pyd pickle member (ignored, never read)"),
        Case("tars", "w1", "kept", "sample with .pickle, .pth and object .npy members (ignored, never read)"),
        Case("tars", "escape", "unsafe_member_name", "member named ../escape.jpg"),
        Case("tars", "evil", "unsafe_member_name", "member named /abs/evil.jpg"),
        Case("tars", "up", "unsafe_member_name", "member named dir/../../up.jpg"),
        Case("tars", "badtxt", "non_utf8_text", "caption member that is not UTF-8"),
        Case("tars", "twice", "duplicate_member", "the same member name twice"),
        Case("tars", "u0", "ungrouped_members", "a key whose members are not contiguous"),
        Case("tars", "u1", "ungrouped_members", "a key whose members are not contiguous"),
        Case("tars", "w0", "duplicate_key", "a key already seen in another tar"),
        Case("tars", "t0", "kept", "a whole sample before the cut of a truncated tar"),
        Case("tars", "t1", "kept", "a whole sample before the cut of a truncated tar"),
        Case("tars", "t2", "truncated_archive", "the sample a truncated tar breaks off in"),
        Case("tars", "d-000003.tgz#unreadable", "corrupt_archive", "a .tgz with a scrambled deflate stream"),
        Case("tars", "e-000004.tar#unreadable", "corrupt_archive", "a zero-byte tar"),
        Case("tars", "f-000005.tar#unreadable", "corrupt_archive", "a text file named .tar"),
    ]
    return {"name": "tars", "kind": "caption", "format": "webdataset", "path": str(folder), "filters": {"min_side": 16}}


def build_bad_corpus(root: Path) -> BadCorpus:
    marker = root / "UNPICKLED"
    trap = pickle.dumps(_Trap(marker))
    npy = io.BytesIO()
    np.save(npy, np.array([_Trap(marker)], dtype=object), allow_pickle=True)
    cases: list[Case] = []
    sources = [
        _manifest_source(root, trap, cases),
        _table_source(root, cases),
        _tar_source(root, trap, npy.getvalue(), cases),
    ]
    return BadCorpus(sources, cases, marker, {"pickle": 1, "pth": 1, "pyd": 1, "vq.npy": 1})
