"""Drawing the toy world: procedural shapes, charts, documents and templated text, each with exact labels.

Every function takes a ``numpy.random.Generator`` and returns the image (PIL, RGB) plus the exact facts
it shows, so captions, questions and later judges agree with the pixels by construction.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from data_prep.imaging import encode_pixels

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 180),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {
    "top left": (0, 0),
    "top": (1, 0),
    "top right": (2, 0),
    "left": (0, 1),
    "center": (1, 1),
    "right": (2, 1),
    "bottom left": (0, 2),
    "bottom": (1, 2),
    "bottom right": (2, 2),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five"}
BACKGROUND = (255, 255, 255)
_SUPERSAMPLE = 4


def _font(size: int) -> ImageFont.FreeTypeFont:
    """DejaVu Sans as shipped inside matplotlib, so rendering does not depend on the system's fonts."""
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
    return ImageFont.truetype(str(path), size)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, ...], fill: tuple[int, ...]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_shapes(rng: np.random.Generator, size: int, max_count: int) -> tuple[Image.Image, dict[str, Any]]:
    """``count`` shapes of one colour and kind, each in its own cell of a 3x3 grid."""
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    count = int(rng.integers(1, max_count + 1))
    cells = rng.choice(len(POSITIONS), size=count, replace=False)
    names = [list(POSITIONS)[int(i)] for i in sorted(cells)]
    big = size * _SUPERSAMPLE
    img = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(img)
    cell = big / 3
    items = []
    for name in names:
        cx, cy = POSITIONS[name]
        half = cell * float(rng.uniform(0.28, 0.42))
        jx, jy = (float(v) for v in rng.uniform(-0.06, 0.06, size=2) * cell)
        mx, my = (cx + 0.5) * cell + jx, (cy + 0.5) * cell + jy
        _draw_shape(draw, shape, (mx - half, my - half, mx + half, my + half), COLORS[color])
        items.append({"position": name, "size": round(2 * half / big, 4)})
    img = img.resize((size, size), Image.Resampling.LANCZOS)
    single = f"a {color} {shape} in the {names[0]}"
    caption = single if count == 1 else f"{NUMBER_WORDS[count]} {color} {shape}s"
    facts = {"color": color, "shape": shape, "count": count, "items": items, "caption": caption}
    return img, facts


def render_digit(pixels: np.ndarray, size: int) -> Image.Image:
    """An 8x8 sklearn digit (values 0..16, ink high) as a smooth RGB image, white ink on black."""
    gray = np.clip(np.asarray(pixels, dtype=np.float64) * (255.0 / 16.0), 0, 255).astype(np.uint8)
    return Image.fromarray(gray.reshape(8, 8), mode="L").resize((size, size), Image.Resampling.BILINEAR).convert("RGB")


def _figure_to_image(fig: Any, size: int) -> Image.Image:
    """Rasterise a matplotlib figure without its PNG metadata (so bytes depend on pixels only)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    rgba = np.asarray(canvas.buffer_rgba())
    img = Image.fromarray(rgba[..., :3].copy(), mode="RGB")
    return img if img.size == (size, size) else img.resize((size, size), Image.Resampling.LANCZOS)


CHART_TITLES = ("Sales", "Rain", "Votes", "Score", "Apples", "Visits", "Energy", "Growth")
DOC_TITLES = ("Invoice", "Receipt", "Report", "Memo", "Order", "Notice")
DOC_ITEMS = (2, 3)
"""Item lines per document, both ends included."""
DOC_AMOUNTS = (1, 19)
"""Amount of each item, both ends included (uniform): a total is the sum of 2-3 of them."""
BAR_LABELS = ("A", "B", "C", "D", "E")


def _qa(question: str, answer: str) -> tuple[str, str]:
    return question, answer


CHART_KINDS = ("bar", "line", "pie")


def render_chart(rng: np.random.Generator, size: int, kind: str | None = None) -> tuple[Image.Image, dict[str, Any]]:
    """A bar, line or pie chart with questions whose answers are read off the data that drew it. ``kind`` forces
    one of :data:`CHART_KINDS` (benchmarks that study one kind); the toy world leaves it None and draws it."""
    from matplotlib.figure import Figure

    drawn = str(rng.choice(list(CHART_KINDS)))
    if kind is not None and kind not in CHART_KINDS:
        raise ValueError(f"render_chart: kind {kind!r} is not one of {CHART_KINDS}")
    kind = kind or drawn
    title = str(rng.choice(CHART_TITLES))
    dpi = 64  # at 128 px: title ~13 px high, tick labels ~9 px, legible to a small model
    fig = Figure(figsize=(size / dpi, size / dpi), dpi=dpi)
    ax = fig.add_axes((0.14, 0.14, 0.82, 0.68))
    fig.suptitle(title, fontsize=14, y=0.98, fontweight="bold")
    qas: list[tuple[str, str]] = [_qa("What is the title of the chart?", title)]
    if kind == "bar":
        n = int(rng.integers(3, 6))
        values = rng.permutation(np.arange(1, 10))[:n].astype(int)
        labels = list(BAR_LABELS[:n])
        ax.bar(labels, values, color="tab:blue")
        ax.tick_params(labelsize=9)
        qas += [
            _qa("Which bar is highest?", labels[int(np.argmax(values))]),
            _qa("Which bar is lowest?", labels[int(np.argmin(values))]),
            _qa("How many bars are there?", str(n)),
        ]
        data: dict[str, Any] = {"labels": labels, "values": values.tolist()}
    elif kind == "line":
        trend = str(rng.choice(["up", "down"]))
        steps = rng.integers(1, 4, size=5)
        values = np.concatenate([[0], np.cumsum(steps)]) * (1 if trend == "up" else -1)
        values = values - values.min() + 1
        ax.plot(range(1, 7), values, color="tab:red", linewidth=2)
        ax.tick_params(labelsize=9)
        qas += [_qa("Is the line going up or down?", trend)]
        data = {"values": values.astype(int).tolist(), "trend": trend}
    else:
        n = int(rng.integers(2, 5))
        shares = rng.permutation(np.array([5, 4, 3, 2, 1])[: n + 1])[:n].astype(float)
        labels = list(BAR_LABELS[:n])
        ax.pie(shares, labels=labels, textprops={"fontsize": 10})
        qas += [
            _qa("Which slice is largest?", labels[int(np.argmax(shares))]),
            _qa("How many slices are there?", str(n)),
        ]
        data = {"labels": labels, "shares": shares.astype(int).tolist()}
    img = _figure_to_image(fig, size)
    return img, {"doc_type": f"{kind}_chart", "title": title, "qas": qas, "data": data}


def render_document(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict[str, Any]]:
    """A small printed document: a title, a few item lines and a total."""
    title = str(rng.choice(DOC_TITLES))
    n = int(rng.integers(DOC_ITEMS[0], DOC_ITEMS[1] + 1))
    amounts = rng.integers(DOC_AMOUNTS[0], DOC_AMOUNTS[1] + 1, size=n).astype(int)
    total = int(amounts.sum())
    img = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(img)
    big, small = _font(max(8, size // 7)), _font(max(7, size // 11))
    draw.text((size * 0.08, size * 0.05), title, fill=(0, 0, 0), font=big)
    y = size * 0.30
    for i, amount in enumerate(amounts):
        draw.text((size * 0.08, y), f"item {i + 1}: {amount}", fill=(40, 40, 40), font=small)
        y += size * 0.14
    draw.text((size * 0.08, y + size * 0.04), f"total: {total}", fill=(0, 0, 0), font=small)
    qas = [
        _qa("What is the title of the document?", title),
        _qa("What is the total?", str(total)),
        _qa("How many items are listed?", str(n)),
    ]
    return img, {"doc_type": "document", "title": title, "qas": qas, "data": {"amounts": amounts.tolist()}}


_TEXT_TEMPLATES = (
    "arithmetic",
    "shape_fact",
    "color_fact",
    "counting",
)


def render_text(rng: np.random.Generator) -> dict[str, Any]:
    """A templated text-only sample: short exact statements the language model can learn."""
    kind = str(rng.choice(_TEXT_TEMPLATES))
    if kind == "arithmetic":
        a, b = (int(v) for v in rng.integers(0, 10, size=2))
        text = f"Question: what is {a} plus {b}? Answer: {a + b}."
    elif kind == "shape_fact":
        facts = {
            "circle": "is round and has no corners",
            "square": "has four equal sides and four corners",
            "triangle": "has three sides and three corners",
        }
        shape = str(rng.choice(SHAPES))
        text = f"A {shape} {facts[shape]}."
    elif kind == "color_fact":
        things = {
            "red": "a tomato",
            "green": "grass",
            "blue": "the sky",
            "yellow": "a banana",
            "purple": "a plum",
            "orange": "an orange",
        }
        color = str(rng.choice(list(things)))
        text = f"The colour of {things[color]} is {color}."
    else:
        start = int(rng.integers(0, 10))
        seq = ", ".join(str(start + i) for i in range(5))
        text = f"Counting up from {start}: {seq}."
    return {"text": text, "template": kind}


def encode_image(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    """PNG or JPEG bytes of a drawn image (no chroma subsampling: small shapes keep their colours' edges)."""
    if fmt not in ("png", "jpg"):
        raise ValueError(f"unsupported image format {fmt!r}")
    return encode_pixels(img, fmt, quality, subsampling=0)
