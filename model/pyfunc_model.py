"""The MLflow model of a trained stage (models from code: MLflow runs this file to load it, nothing is
unpickled). Saved by :func:`model.inference.save_mlflow_model`; load it with
``mlflow.pyfunc.load_model("models:/<name>/<version>")`` (or a logged model's id) and call ``predict`` with
rows of:

- ``prompt``: text-to-image; the row's ``image`` output is a base64 PNG;
- ``question`` (and optionally ``image``: base64 PNG bytes): understanding; the row's ``answer`` output.

``params``: ``seed`` (0), ``cfg_weight`` (0: the family's paper weight), ``temperature`` (1, Janus-Pro only),
``max_new_tokens`` (32).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import mlflow.pyfunc
from mlflow.models import set_model


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """One dict per request. A DataFrame row or a dict is a request, unless its cells are lists (MLflow
    turns ``{"prompt": [a, b]}`` into one row of lists): then each position is one."""
    if hasattr(model_input, "to_dict"):  # a pandas DataFrame
        records = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        records = [model_input]
    else:
        records = [dict(r) for r in model_input]
    rows = []
    for record in records:
        listed = {k: v for k, v in record.items() if v is not None and not isinstance(v, str | bytes | float)}
        if not listed:
            rows.append(record)
            continue
        n = max(len(list(v)) for v in listed.values())
        columns = {k: list(v) if k in listed else [v] * n for k, v in record.items()}
        rows += [{k: v[i] if i < len(v) else None for k, v in columns.items()} for i in range(n)]
    return rows


def _present(value: Any) -> bool:
    return isinstance(value, str | bytes) and len(value) > 0


class JanusPyfunc(mlflow.pyfunc.PythonModel):
    """Janus-Pro or JanusFlow weights (artifact ``weights``; a JanusFlow VAE as artifact ``vae``)."""

    def load_context(self, context: Any) -> None:
        from model.inference import load_for_inference

        self.lm = load_for_inference(context.artifacts["weights"], context.artifacts.get("vae"))

    def predict(self, context: Any, model_input: Any, params: dict[str, Any] | None = None):
        import pandas as pd

        from model.inference import answer, generate_images

        params = params or {}
        rows = _rows(model_input)
        prompts = [(i, r["prompt"]) for i, r in enumerate(rows) if _present(r.get("prompt"))]
        questions = [(i, r) for i, r in enumerate(rows) if _present(r.get("question"))]
        images: dict[int, str] = {}
        if prompts:
            cfg = float(params.get("cfg_weight") or 0.0)
            pics = generate_images(
                self.lm,
                [p for _, p in prompts],
                seed=int(params.get("seed", 0)),
                cfg_weight=cfg if cfg > 0 else None,
                temperature=float(params.get("temperature", 1.0)),
            )
            for (i, _), pic in zip(prompts, pics, strict=True):
                buf = io.BytesIO()
                pic.save(buf, format="PNG")
                images[i] = base64.b64encode(buf.getvalue()).decode()
        answers: dict[int, str] = {}
        if questions:
            pairs = [(_image_bytes(r.get("image")), r["question"]) for _, r in questions]
            found = answer(self.lm, pairs, max_new_tokens=int(params.get("max_new_tokens", 32)))
            answers = {i: a for (i, _), a in zip(questions, found, strict=True)}
        return pd.DataFrame(
            {"image": [images.get(i) for i in range(len(rows))], "answer": [answers.get(i) for i in range(len(rows))]}
        )


def _image_bytes(value: Any) -> bytes | None:
    if not _present(value):
        return None
    return value if isinstance(value, bytes) else base64.b64decode(value)


set_model(JanusPyfunc())
