"""The trainer-facing API: config validation, builders, task contract, per-block list, freeze effects."""

from __future__ import annotations

import pytest
import torch

from model.build import ModelConfig, build_collate, build_model, build_task, decoder_blocks
from model.flavors import get_flavor
from model.freeze import apply_freeze
from tests.model.toy import ALL_TASKS, make_sample


def test_model_config_validates_fields():
    with pytest.raises(KeyError, match="valid flavors"):
        ModelConfig(flavor="nope")
    with pytest.raises(ValueError, match="family"):
        ModelConfig(family="dalle")
    with pytest.raises(ValueError, match="cfg_drop_prob"):
        ModelConfig(cfg_drop_prob=1.5)


@pytest.mark.parametrize(
    ("family", "frozen", "trained"),
    [
        ("janus_pro", "model.language_model.", "model.generation_head."),
        ("janusflow", "language_model.", "vision_gen_dec_model."),
    ],
)
def test_task_contract_and_stage1_gradients(family, frozen, trained):
    flavor = get_flavor("debug")
    cfg = ModelConfig(flavor="debug", family=family, max_len=400, pack=True)
    batch = build_collate(flavor, cfg)([make_sample(t, i) for i, t in enumerate(ALL_TASKS)])
    model = build_model(flavor, family)
    assert isinstance(model, torch.nn.Module)
    blocks = decoder_blocks(model)
    assert len(blocks) == flavor.llm.num_layers
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)
    apply_freeze(model, family, 1)
    loss, metrics = build_task(model, flavor, cfg)(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert {f"loss/{t}" for t in ALL_TASKS} <= set(metrics)
    assert all(s.device == loss.device and c.device == loss.device for s, c in metrics.values())  # no host sync
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is None for n, g in grads.items() if n.startswith(frozen))
    assert any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(trained))


def test_real_flavor_builds_on_meta_without_memory():
    model = build_model(get_flavor("janus_pro_7b"), device="meta")
    assert next(model.parameters()).device.type == "meta"
    assert len(decoder_blocks(model)) == 30


def test_model_config_loads_through_the_job_config_loader():
    from common.config import ConfigError, load_config

    cfg = load_config(ModelConfig, None, ["flavor=janusflow_1_3b", "janusflow.t_sigma=0.5", "pack=true"])
    assert cfg.flavor == "janusflow_1_3b" and cfg.janusflow.t_sigma == 0.5 and cfg.pack
    with pytest.raises(ConfigError, match="t_sigma"):
        load_config(ModelConfig, None, ["janusflow.t_sigma=-1"])
    with pytest.raises(ConfigError):
        load_config(ModelConfig, None, ["janusflow.t_sigmaa=1"])


def test_janusflow_answers_are_the_same_batched_or_alone(tokenizer, special):
    from model.sampling import answer_questions
    from tests.model.toy import png

    model = build_model(get_flavor("debug"), "janusflow").eval()
    questions = [(png(1), "what is it?"), (None, "say something long please")]
    kw = {"image_size": 64, "num_image_tokens": 64, "max_new_tokens": 5}
    batched = answer_questions(model, tokenizer, special, questions, **kw)
    alone = [answer_questions(model, tokenizer, special, [q], **kw)[0] for q in questions]
    assert batched == alone and all(len(a) > 0 for a in batched)


def test_collate_fn_pickles_for_ray_workers():
    import pickle

    collate_fn = build_collate(get_flavor("debug"), ModelConfig(family="janusflow"), seed=3)
    samples = [make_sample("t2i", i) for i in range(30)]
    a, b = collate_fn(samples), pickle.loads(pickle.dumps(collate_fn))(samples)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (a["attention_mask"] == 0).any()  # some prompts dropped (and masked: JanusFlow)


def test_fitted_vq_plugs_into_the_model():
    from model.janus_pro import apply_vq, build_vq, vq_encode

    flavor = get_flavor("debug")
    model, vq = build_model(flavor, "janus_pro"), build_vq(flavor)
    apply_vq(model, vq)
    pix = torch.rand(2, 3, 64, 64) * 2 - 1
    assert torch.equal(vq_encode(model, pix), vq.encode(pix).image_tokens.view(2, -1))
    assert torch.equal(model.model.generation_embeddings.weight, vq.quantize.embedding.weight)


def test_real_flavor_needs_a_tokenizer_path():
    from model.tokenizer import load_tokenizer

    with pytest.raises(ValueError, match="checkpoint path"):
        load_tokenizer(get_flavor("janus_pro_1b"))
