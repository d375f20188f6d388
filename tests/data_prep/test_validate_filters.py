import pytest

from data_prep.filters import FilterConfig, filter_scores, filter_size, filter_text
from data_prep.imaging import Rejected
from data_prep.readers import RawRecord
from data_prep.schema import IMAGE_TAG
from data_prep.sources import SourceConfig
from data_prep.validate import map_fields


def _src(kind: str = "caption", **kw) -> SourceConfig:
    return SourceConfig(name="s", kind=kind, format="jsonl", path="x", **kw)


def _reject(row: dict, kind: str = "caption", **kw) -> str:
    with pytest.raises(Rejected) as info:
        map_fields(RawRecord("k", "loc", row=row), _src(kind, **kw))
    return info.value.reason


def test_reject_reasons():
    assert _reject({"caption": 5}) == "bad_column_type"
    assert _reject({"caption": "  "}) == "empty_text"
    assert _reject({}) == "empty_text"
    assert _reject({"txt": b"\xff\xfe"}) == "non_utf8_text"
    assert _reject({"caption": "ok \ud800"}) == "non_utf8_text"
    assert _reject({"label": 1.5}, "class_label") == "bad_column_type"
    assert _reject({"prompt": "a digit"}, "class_label") == "missing_label"
    assert _reject({"conversation": "not json"}, "chart_doc") == "bad_column_type"
    assert _reject({"conversation": [{"role": "user", "content": 3}]}, "chart_doc") == "bad_column_type"
    assert _reject({}, "chart_doc") == "empty_conversation"
    assert _reject({"caption": "two words", "similarity": "high"}) == "bad_column_type"


def test_mapping_auto_and_configured_fields():
    row = {"id": "a", "caption": "a cat", "similarity": 0.3, "pwatermark": 0.1, "url": "http://x", "blob": b"x"}
    f = map_fields(RawRecord("a", "loc", row=row), _src())
    assert f.text == "a cat" and f.scores == {"clip": 0.3, "watermark": 0.1}
    assert f.extra == {"id": "a", "url": "http://x"}  # bytes are not JSON: dropped
    f = map_fields(
        RawRecord("a", "loc", row={"desc": "x y z", "y": b"7"}), _src("class_label", text_field="desc", label_field="y")
    )
    assert f.text == "x y z" and f.label == 7


def test_conversation_gets_image_tag_and_sharegpt_roles():
    row = {"conversations": [{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A bar chart"}]}
    f = map_fields(RawRecord("a", "loc", row=row), _src("sft_multimodal"))
    assert [t.role for t in f.conversation] == ["user", "assistant"]
    assert f.conversation[0].content == f"{IMAGE_TAG}\nWhat is it?"
    tagged = [{"role": "user", "content": f"Look {IMAGE_TAG} here"}, {"role": "assistant", "content": "ok"}]
    f = map_fields(RawRecord("a", "loc", row={"conversation": tagged}), _src("chart_doc"))
    assert f.conversation[0].content == f"Look {IMAGE_TAG} here"


def test_class_name_from_hf_class_label():
    rec = RawRecord("a", "loc", row={"label": 1}, class_names=["cat", "dog"])
    assert map_fields(rec, _src("class_label")).class_name == "dog"


def test_filters_return_keep_and_reason():
    cfg = FilterConfig()
    assert filter_size(300, 200, cfg) == (True, "")
    assert filter_size(199, 400, cfg) == (False, "too_small")
    assert filter_size(900, 250, cfg) == (False, "bad_aspect_ratio")
    assert filter_size(50, 50, FilterConfig(min_side=0)) == (True, "")
    assert filter_text("one", cfg) == (False, "text_too_short")
    assert filter_text("a b", cfg) == (False, "text_too_short")  # under 5 characters
    assert filter_text("ten words " * 5, FilterConfig(max_words=5)) == (False, "text_too_long")
    assert filter_text(None, cfg) == (True, "")
    assert filter_scores({"clip": 0.27}, cfg) == (False, "score_clip_low")
    assert filter_scores({"clip": 0.3, "watermark": 0.8}, cfg) == (False, "score_watermark_high")
    assert filter_scores({"nsfw": 0.6}, cfg) == (False, "score_nsfw_high")
    assert filter_scores({"aesthetic": 4.0}, FilterConfig(min_scores={"aesthetic": 5.0})) == (
        False,
        "score_aesthetic_low",
    )
    assert filter_scores({}, cfg) == (True, "")  # thresholds apply only to carried scores


def test_filter_config_validation_names_field():
    with pytest.raises(ValueError, match="filters.min_side"):
        FilterConfig(min_side=-1)
    with pytest.raises(ValueError, match="filters.max_aspect"):
        FilterConfig(max_aspect=0.5)


def test_unforeseen_error_is_a_named_reject(monkeypatch):
    from data_prep import process
    from data_prep.imaging import ImageConfig

    def boom(*_a, **_k):
        raise MemoryError("simulated")

    monkeypatch.setattr(process, "decode_image", boom)
    rec = RawRecord("k", "loc", row={"caption": "two words here"}, image=b"x")
    row = process.prepare_record(rec, _src(), ImageConfig(), 0, 0)
    assert (row["reason"], row["detail"]) == ("processing_error", "MemoryError: simulated")
