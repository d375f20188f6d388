"""Our losses against independent computations on the same weights and batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.collate import collate
from model.janus_pro import JanusProTask, build_janus_pro, vq_encode
from model.losses import metric_values
from model.prompts import prompt_ids
from tests.model.toy import make_sample


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


def test_understanding_loss_equals_transformers_loss(debug_flavor, tokenizer, special):
    model = build_janus_pro(debug_flavor).eval()
    samples = [make_sample(t, i) for i, t in enumerate(("caption", "chart_doc", "sft", "text", "caption"))]
    batch = _collate(samples, tokenizer, special)
    ours, metrics = JanusProTask(model)(batch)
    ref = model(
        input_ids=batch["input_ids"],
        pixel_values=batch["und_pixel_values"],
        attention_mask=batch["attention_mask"],
        labels=batch["labels"],
    ).loss
    assert batch["und_pixel_values"].shape[0] == 4
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert {"loss/caption", "loss/chart_doc", "loss/sft", "loss/text"} <= set(metric_values(metrics))


def _direct_t2i_loss(model, tokenizer, special, sample, ids: torch.Tensor) -> torch.Tensor:
    """Prompt + <begin_of_image> + embedded ids[:-1] through the LLM; generation head on the last n."""
    prompt = torch.tensor([[*prompt_ids(tokenizer, special, sample.text), special.boi]])
    text = model.get_input_embeddings()(prompt)
    img = model.model.generation_aligner(model.model.generation_embeddings(ids[None, :-1]))
    hidden = model.model.language_model(inputs_embeds=torch.cat([text, img], 1)).last_hidden_state
    logits = model.model.generation_head(hidden[:, -ids.numel() :])
    return F.cross_entropy(logits[0], ids, reduction="sum")


def test_t2i_loss_equals_direct_computation(debug_flavor, tokenizer, special):
    model = build_janus_pro(debug_flavor).eval()
    samples = [make_sample("t2i", 1, vq_tokens=64), make_sample("t2i", 2, vq_tokens=64)]
    batch = _collate(samples, tokenizer, special)
    ours, _ = JanusProTask(model)(batch)
    total = sum(_direct_t2i_loss(model, tokenizer, special, s, torch.from_numpy(s.vq.astype("int64"))) for s in samples)
    torch.testing.assert_close(ours, total / 128, rtol=1e-5, atol=1e-5)


def test_t2i_loss_from_pixels_uses_the_frozen_vq(debug_flavor, tokenizer, special):
    model = build_janus_pro(debug_flavor).eval()
    samples = [make_sample("t2i", 3), make_sample("class_label", 4)]
    batch = _collate(samples, tokenizer, special)
    assert "gen_ids" not in batch
    ids = vq_encode(model, batch["gen_pixel_values"])
    assert ids.shape == (2, 64)
    ours, _ = JanusProTask(model)(batch)
    batch_ids = dict(batch, gen_ids=ids)
    torch.testing.assert_close(ours, JanusProTask(model)(batch_ids)[0])


def test_packed_batch_has_the_same_loss(debug_flavor, tokenizer, special):
    model = build_janus_pro(debug_flavor).eval()
    tasks = ("caption", "text", "t2i", "sft", "class_label", "text")
    samples = [make_sample(t, i, vq_tokens=64) for i, t in enumerate(tasks)]
    plain = _collate(samples, tokenizer, special)
    packed = _collate(samples, tokenizer, special, max_len=256, pack=True)
    assert packed["input_ids"].shape[0] < len(samples)
    assert int(packed["segment_ids"].max()) > 1
    task = JanusProTask(model)
    torch.testing.assert_close(task(plain)[0], task(packed)[0], rtol=1e-5, atol=1e-5)


def test_sample_reduction_weighs_every_sample_the_same(debug_flavor, tokenizer, special):
    from model.janus_pro import JanusProTaskConfig

    model = build_janus_pro(debug_flavor).eval()
    tasks = ("sft", "t2i", "text", "class_label", "caption")
    samples = [make_sample(t, i, vq_tokens=64) for i, t in enumerate(tasks)]
    token_task = JanusProTask(model)
    sample_task = JanusProTask(model, JanusProTaskConfig(reduction="sample"))
    # alone, a sample's token mean is its own mean: the sample reduction is the mean of those
    alone = torch.stack([token_task(_collate([s], tokenizer, special))[0] for s in samples])
    plain, packed = _collate(samples, tokenizer, special), _collate(samples, tokenizer, special, max_len=256, pack=True)
    assert int(packed["segment_ids"].max()) > 1
    for batch in (plain, packed):
        torch.testing.assert_close(sample_task(batch)[0], alone.mean(), rtol=1e-5, atol=1e-5)
    # the token mean weighs the 64-id image samples far more than a short answer
    counts = []
    for s in samples:
        alone_batch = _collate([s], tokenizer, special)
        counts.append(alone_batch["text_pos"].numel() + alone_batch["gen_slot_pos"].numel())
    weights = torch.tensor(counts) / sum(counts)
    torch.testing.assert_close(token_task(plain)[0], (alone * weights).sum(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(token_task(plain)[0], alone.mean(), rtol=1e-3)


def test_janusflow_sample_reduction_of_the_text_loss(debug_flavor, tokenizer, special):
    from model.janusflow import build_janusflow
    from model.janusflow_task import JanusFlowTask, JanusFlowTaskConfig, build_vae

    model, vae = build_janusflow(debug_flavor).eval(), build_vae(debug_flavor)
    samples = [make_sample(t, i) for i, t in enumerate(("sft", "text", "caption"))]  # text losses only
    task = JanusFlowTask(model, vae, JanusFlowTaskConfig(reduction="sample"))
    alone = torch.stack([JanusFlowTask(model, vae)(_collate([s], tokenizer, special))[0] for s in samples])
    torch.testing.assert_close(task(_collate(samples, tokenizer, special))[0], alone.mean(), rtol=1e-5, atol=1e-5)


def test_unknown_reduction_is_rejected():
    import pytest

    from model.janus_pro import JanusProTaskConfig

    with pytest.raises(ValueError, match="reduction 'mean'"):
        JanusProTaskConfig(reduction="mean")


def test_janusflow_packed_batch_has_the_same_loss(debug_flavor, tokenizer, special):
    from model.janusflow import build_janusflow
    from model.janusflow_task import JanusFlowTask, build_vae

    task = JanusFlowTask(build_janusflow(debug_flavor).eval(), build_vae(debug_flavor))
    tasks = ("caption", "t2i", "text", "class_label", "sft")
    samples = [make_sample(t, i) for i, t in enumerate(tasks)]
    plain = _collate(samples, tokenizer, special)
    packed = _collate(samples, tokenizer, special, max_len=300, pack=True)
    assert int(packed["segment_ids"].max()) > 1
    torch.manual_seed(5)
    a, ma = task(plain)
    torch.manual_seed(5)  # same t and noise per generation image, in the same order
    b, mb = task(packed)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert abs(metric_values(ma)["loss/repa"] - metric_values(mb)["loss/repa"]) < 1e-5


def test_ema_update_is_an_exponential_average():
    from model.janusflow_task import apply_ema_update, build_ema, ema_state_dict

    net = torch.nn.Linear(2, 2)
    net.bias.requires_grad_(False)
    ema = build_ema(net, decay=0.9)
    assert set(ema.shadow) == {"weight"}  # frozen parameters need no shadow
    start = net.weight.detach().clone()
    with torch.no_grad():
        net.weight.add_(1.0)
    apply_ema_update(ema, net)
    torch.testing.assert_close(ema.shadow["weight"], start + 0.1)
    state = ema_state_dict(ema, net)
    torch.testing.assert_close(state["weight"], start + 0.1)
    assert torch.equal(state["bias"], net.bias)
