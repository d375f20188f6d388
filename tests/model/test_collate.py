"""Prompt template, label masking, CFG drop, image preprocessing and packing."""

from __future__ import annotations

import io
import itertools
import random

import pytest
import torch
from PIL import Image

from data_prep.schema import TASKS
from model.collate import collate, preprocess_understanding
from model.prompts import GEN_BOI, GEN_SLOT, IGNORE, UND_BOI, UND_SLOT
from tests.model.toy import ALL_TASKS, make_sample, png


def _collate(samples, tokenizer, special, **kw):
    return collate(
        samples,
        tokenizer=tokenizer,
        special=special,
        num_image_tokens=64,
        und_image_size=64,
        gen_image_size=64,
        **kw,
    )


def _trained_text(batch, row, tokenizer) -> str:
    labels = batch["labels"][row]
    return tokenizer.decode(labels[labels != IGNORE].tolist())


def test_sft_trains_only_the_assistant_answer(tokenizer, special):
    batch = _collate([make_sample("sft", 3), make_sample("caption", 5)], tokenizer, special)
    assert _trained_text(batch, 0, tokenizer) == " bars 3<｜end▁of▁sentence｜>"
    assert _trained_text(batch, 1, tokenizer) == " a square number 5<｜end▁of▁sentence｜>"
    text = tokenizer.decode(batch["input_ids"][0][batch["kinds"][0] != UND_SLOT].tolist())
    assert text.startswith("<｜begin▁of▁sentence｜>You are helpful.\n\n<|User|>: <begin_of_image><end_of_image>")
    assert text.endswith("What is shown 3?\n\n<|Assistant|>: bars 3<｜end▁of▁sentence｜>")
    for row in range(2):
        assert int((batch["kinds"][row] == UND_SLOT).sum()) == 64
        assert int((batch["kinds"][row] == UND_BOI).sum()) == 1
        slots = batch["kinds"][row] == UND_SLOT
        assert (batch["input_ids"][row][slots] == special.image).all()
    assert batch["und_pixel_values"].shape == (2, 3, 64, 64)


def test_text_sample_is_trained_on_all_tokens(tokenizer, special):
    batch = _collate([make_sample("text", 1)], tokenizer, special)
    assert _trained_text(batch, 0, tokenizer) == "the quick brown fox 1<｜end▁of▁sentence｜>"
    assert batch["und_pixel_values"].shape[0] == 0


def test_generation_prompt_and_slots(tokenizer, special):
    batch = _collate([make_sample("t2i", 2), make_sample("class_label", 4)], tokenizer, special)
    assert (batch["labels"] == IGNORE).all()
    ids, kinds = batch["input_ids"][1], batch["kinds"][1]
    boi = int((kinds == GEN_BOI).nonzero())
    prompt = tokenizer.decode(ids[:boi].tolist())
    assert prompt == "<｜begin▁of▁sentence｜><|User|>: digit 4\n\n<|Assistant|>:"
    assert ids[boi] == special.boi
    assert (kinds[boi + 1 : boi + 65] == GEN_SLOT).all() and ids[boi + 65] == special.eoi
    assert batch["gen_pixel_values"].shape == (2, 3, 64, 64)
    assert batch["gen_pixel_values"].min() >= -1 and batch["gen_pixel_values"].max() <= 1
    assert batch["gen_task"].tolist() == [0, 5]


def test_cfg_drop_replaces_prompt_by_pad_and_keeps_bos_boi(tokenizer, special):
    batch = _collate(
        [make_sample("t2i", 2)], tokenizer, special, cfg_drop_prob=0.999, rng=random.Random(0), mask_dropped=True
    )
    ids, kinds, attn = batch["input_ids"][0], batch["kinds"][0], batch["attention_mask"][0]
    boi = int((kinds == GEN_BOI).nonzero())
    assert ids[0] == special.bos and ids[boi] == special.boi
    assert (ids[1:boi] == special.pad).all()
    assert attn[0] == 1 and (attn[1:boi] == 0).all() and (attn[boi:] == 1).all()


def test_cfg_drop_rate_is_about_ten_percent(tokenizer, special):
    rng = random.Random(1)
    samples = [make_sample("t2i", i) for i in range(400)]
    batch = _collate(samples, tokenizer, special, cfg_drop_prob=0.1, rng=rng)
    dropped = (batch["input_ids"][:, 1] == special.pad).float().mean().item()
    assert 0.06 < dropped < 0.14
    # understanding samples are never dropped
    batch = _collate([make_sample("caption", 1)] * 50, tokenizer, special, cfg_drop_prob=0.9, rng=rng)
    assert not (batch["input_ids"][:, 1] == special.pad).any()


def test_understanding_image_is_padded_square_with_grey():
    buf = io.BytesIO()
    Image.new("RGB", (64, 32), (255, 0, 0)).save(buf, format="PNG")
    x = preprocess_understanding(buf.getvalue(), 64)
    assert x.shape == (3, 64, 64)
    grey = 127 / 127.5 - 1
    torch.testing.assert_close(x[:, 0, 0], torch.full((3,), grey))
    torch.testing.assert_close(x[:, 32, 32], torch.tensor([1.0, -1.0, -1.0]))
    assert png(0)  # the helper makes decodable images


def test_packing_keeps_attention_inside_samples(tokenizer, special):
    samples = [make_sample(t, i) for i, t in enumerate(ALL_TASKS)]
    batch = _collate(samples, tokenizer, special, max_len=200, pack=True)
    seg, pos = batch["segment_ids"], batch["position_ids"]
    assert batch["input_ids"].shape[1] == 200 and seg.max() >= 2
    for r in range(seg.shape[0]):
        for s in seg[r].unique().tolist():
            if s:
                assert pos[r][seg[r] == s].tolist() == list(range(int((seg[r] == s).sum())))
    # the attention layout: one sequence per sample, its tokens in order, never two samples in one
    cu, perm = batch["attn_cu_seqlens"].tolist(), batch["attn_perm"]
    flat_seg, flat_pos = seg.reshape(-1), pos.reshape(-1)
    row_of = torch.arange(seg.numel()) // seg.shape[1]
    for a, b in itertools.pairwise(cu):
        tokens = perm[a:b]
        assert len(set(zip(row_of[tokens].tolist(), flat_seg[tokens].tolist(), strict=True))) == 1
        assert flat_pos[tokens].tolist() == sorted(flat_pos[tokens].tolist())
    assert cu[-1] == int((seg > 0).sum())  # every real token is in its sample's sequence (nothing masked here)
    # the flat positions name the right tokens
    assert (batch["kinds"].reshape(-1)[batch["gen_slot_pos"]] == GEN_SLOT).all()
    assert torch.equal(batch["labels"].reshape(-1)[batch["text_pos"] + 1], batch["text_targets"])
    assert batch["sample_task"].tolist() == [TASKS.index(t) for t in ALL_TASKS]  # packing keeps the order
    # every sample's tokens appear exactly once across the packed rows
    assert int((batch["kinds"] == GEN_SLOT).sum()) == 2 * 64
    assert sorted(batch["token_task"][seg > 0].unique().tolist()) == list(range(6))


def test_long_text_is_truncated_but_images_are_never_cut(tokenizer, special):
    from data_prep.schema import Sample, SampleMeta

    long = Sample("long", SampleMeta("toy", "long", "text"), text="x" * 500)
    batch = _collate([long, make_sample("caption", 1)], tokenizer, special, max_len=100)
    assert batch["input_ids"].shape[1] == 100 and (batch["labels"][0] != IGNORE).sum() == 99
    with pytest.raises(ValueError, match="image tokens beyond"):
        _collate([make_sample("t2i", 1)], tokenizer, special, max_len=50)
