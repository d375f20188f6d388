"""Export/import round trips, reference names, and the samplers against independent computations."""

from __future__ import annotations

import io

import torch
from transformers import JanusForConditionalGeneration, JanusProcessor

from model.build import ModelConfig, build_collate, build_model, build_task
from model.collate import preprocess_understanding
from model.export import export_janus_pro, export_janusflow, janusflow_reference_state, load_janusflow
from model.flavors import get_flavor
from model.janusflow_task import apply_ema_update, build_ema, build_vae, ema_state_dict
from model.prompts import prompt_ids, understanding_prompt
from model.sampling import answer_questions, generate_images_janus_pro, generate_images_janusflow
from tests.model.toy import ALL_TASKS, make_sample, png


def _train_a_few_steps(family: str, steps: int = 3):
    flavor = get_flavor("debug")
    cfg = ModelConfig(flavor="debug", family=family)
    batch = build_collate(flavor, cfg)([make_sample(t, i, vq_tokens=64) for i, t in enumerate(ALL_TASKS)])
    model = build_model(flavor, family)
    task = build_task(model, flavor, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = build_ema(model, 0.5)
    for _ in range(steps):
        loss, _ = task(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        apply_ema_update(ema, model)
    return model.eval(), ema


def test_janus_pro_export_loads_in_stock_transformers(tmp_path, tokenizer, special):
    model, _ = _train_a_few_steps("janus_pro")
    with torch.no_grad():  # sharpen the head so greedy choices are well separated
        model.model.generation_head.vision_head.weight.mul_(30)
    export_janus_pro(model, tokenizer, tmp_path)
    files = {p.suffix for p in tmp_path.iterdir()}
    assert ".safetensors" in files and not files & {".bin", ".pt", ".pkl"}
    stock = JanusForConditionalGeneration.from_pretrained(tmp_path).eval()
    ours_loaded = build_model(get_flavor("debug"), "janus_pro", path=tmp_path)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in ours_loaded.state_dict().items())
    processor = JanusProcessor.from_pretrained(tmp_path)
    gen_inputs = processor(text=["a red square"], generation_mode="image", return_tensors="pt")
    assert gen_inputs["input_ids"][0, -1] == special.boi
    ex = understanding_prompt(tokenizer, special, "what is it?", 64, True)
    ids, pix = torch.tensor([ex.input_ids]), preprocess_understanding(png(3), 64)[None]
    with torch.no_grad():
        torch.testing.assert_close(
            stock(input_ids=ids, pixel_values=pix).logits, model(input_ids=ids, pixel_values=pix).logits
        )
    # stock generate(generation_mode="image") == our batched, left-padded, KV-cached sampler (greedy)
    prompts = ["a red square", "two blue circles on grey"]
    ours, pixels = generate_images_janus_pro(model, tokenizer, special, prompts, greedy=True)
    assert pixels.shape == (2, 3, 64, 64) and pixels.abs().max() <= 1
    for row, text in enumerate(prompts):
        p = torch.tensor([[*prompt_ids(tokenizer, special, text), special.boi]])
        theirs = stock.generate(p, attention_mask=torch.ones_like(p), generation_mode="image", do_sample=False)
        assert torch.equal(theirs[0], ours[row])
    # understanding answers: ours (batched with a text-only question) == stock greedy text generation
    answers = answer_questions(
        model,
        tokenizer,
        special,
        [(png(3), "what is it?"), (None, "hi")],
        image_size=64,
        num_image_tokens=64,
        max_new_tokens=6,
    )
    theirs = stock.generate(
        ids, pixel_values=pix, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False
    )
    new = theirs[0, ids.shape[1] :].tolist()
    new = new[: new.index(special.eos)] if special.eos in new else new
    assert answers[0] == tokenizer.decode(new)


def reference_janusflow_shapes(flavor) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the reference MultiModalityCausalLM (janus/janusflow/models),
    read off its modules: timm SigLIP tower, ShallowUViTEncoder/Decoder, LlamaForCausalLM."""
    d, v, f, llm = flavor.llm.hidden_size, flavor.vision, flavor.flow, flavor.llm
    vd, vm, c, lat, p = v.hidden_size, v.intermediate_size, f.channels, f.latent_channels, f.patch_size
    s: dict[str, tuple[int, ...]] = {}
    t = "vision_und_enc_model.vision_tower."
    s[t + "patch_embed.proj.weight"], s[t + "patch_embed.proj.bias"] = (vd, 3, v.patch_size, v.patch_size), (vd,)
    s[t + "pos_embed"] = (1, v.grid**2, vd)

    def linear(name, out, inp):
        s[name + ".weight"], s[name + ".bias"] = (out, inp), (out,)

    def norm(name, dim):
        s[name + ".weight"], s[name + ".bias"] = (dim,), (dim,)

    for i in range(v.num_layers):
        b = f"{t}blocks.{i}."
        norm(b + "norm1", vd), norm(b + "norm2", vd)
        linear(b + "attn.qkv", 3 * vd, vd), linear(b + "attn.proj", vd, vd)
        linear(b + "mlp.fc1", vm, vd), linear(b + "mlp.fc2", vd, vm)
    norm(t + "norm", vd)
    s[t + "attn_pool.latent"] = (1, 1, vd)
    linear(t + "attn_pool.q", vd, vd), linear(t + "attn_pool.kv", 2 * vd, vd), linear(t + "attn_pool.proj", vd, vd)
    norm(t + "attn_pool.norm", vd), linear(t + "attn_pool.mlp.fc1", vm, vd), linear(t + "attn_pool.mlp.fc2", vd, vm)
    linear("vision_und_enc_aligner", d, vd)
    s["beg_of_und_embed"] = (1, d)
    e = "vision_gen_enc_model."
    linear(e + "time_embed.linear_1", d, c), linear(e + "time_embed.linear_2", d, d)
    s[e + "in_conv.weight"], s[e + "in_conv.bias"] = (c, lat, p, p), (c,)

    def convnext(name, ch):
        s[name + "depthwise.weight"], s[name + "depthwise.bias"] = (ch, 1, 7, 7), (ch,)
        s[name + "norm.weight"] = (ch,)
        linear(name + "channelwise_linear_1", 4 * ch, ch), linear(name + "channelwise_linear_2", ch, 4 * ch)
        s[name + "channelwise_norm.weight"] = s[name + "channelwise_norm.bias"] = (1, 1, 1, 4 * ch)
        linear(name + "cond_embeds_mapper", 2 * ch, d)

    for i in range(f.num_blocks):
        convnext(f"{e}mid_block.res_blocks.{i}.", c)
        convnext(f"vision_gen_dec_model.mid_block.res_blocks.{i}.", 2 * c)
    linear("vision_gen_enc_aligner", d, c)
    s["vision_gen_dec_model.input_norm.weight"] = (c,)
    s["vision_gen_dec_model.out_convs.0.norm.weight"] = (2 * c,)
    s["vision_gen_dec_model.out_convs.0.unpatch_conv.weight"] = (lat * p * p, 2 * c, 1, 1)
    s["vision_gen_dec_model.out_convs.0.unpatch_conv.bias"] = (lat * p * p,)
    lm = "language_model.model."
    s[lm + "embed_tokens.weight"], s["language_model.lm_head.weight"] = (llm.vocab_size, d), (llm.vocab_size, d)
    s[lm + "norm.weight"] = (d,)
    for i in range(llm.num_layers):
        b = f"{lm}layers.{i}."
        for proj in "qkvo":
            s[f"{b}self_attn.{proj}_proj.weight"] = (d, d)
        s[b + "mlp.gate_proj.weight"] = s[b + "mlp.up_proj.weight"] = (llm.intermediate_size, d)
        s[b + "mlp.down_proj.weight"] = (d, llm.intermediate_size)
        s[b + "input_layernorm.weight"] = s[b + "post_attention_layernorm.weight"] = (d,)
    s["vision_gen_dec_aligner_norm.weight"] = (d,)
    linear("vision_gen_dec_aligner", c, d)
    return s


def test_janusflow_export_names_match_the_reference():
    for name in ("janusflow_1_3b", "debug"):
        flavor = get_flavor(name)
        model = build_model(flavor, "janusflow", device="meta")
        ours = {k: tuple(v.shape) for k, v in janusflow_reference_state(model).items()}
        assert ours == reference_janusflow_shapes(flavor), name


def test_janusflow_round_trip_with_ema(tmp_path, tokenizer, special):
    model, ema = _train_a_few_steps("janusflow")
    export_janusflow(model, tmp_path, tokenizer, state=ema_state_dict(ema, model))
    assert not any(p.suffix in (".bin", ".pt", ".pkl") for p in tmp_path.iterdir())
    loaded = load_janusflow(tmp_path).eval()
    for k, v in loaded.state_dict().items():
        if not k.startswith("repa_head."):
            expected = ema.shadow.get(k, model.state_dict()[k])
            assert torch.equal(v, expected), k
    assert not torch.equal(ema.shadow["vision_gen_dec_aligner.weight"], model.vision_gen_dec_aligner.weight)
    # the reference forward's shapes: tokens [B, 576->64, D], t_emb [B, D], velocity = latent shape
    z, t = torch.randn(2, 4, 16, 16), torch.rand(2)
    tokens, t_emb, skip = loaded.encode_latents(z, t)
    assert tokens.shape == (2, 64, 128) and t_emb.shape == (2, 128) and skip.shape == (2, 32, 8, 8)
    assert loaded.decode_velocity(torch.randn(2, 64, 128), skip, t_emb).shape == z.shape


def _direct_velocity(model, tokenizer, special, prompt: str, z, t, dropped: bool = False):
    """One sample, no cache, no padding: [prompt] + t_emb + z tokens -> velocity. A dropped prompt is as in
    training: BOS, then pads that keep their positions but are masked out of attention."""
    ids = torch.tensor([prompt_ids(tokenizer, special, prompt)])
    attn = torch.ones(1, ids.shape[1], dtype=torch.long)
    if dropped:
        ids[:, 1:], attn[:, 1:] = special.pad, 0
    tokens, t_emb, skip = model.encode_latents(z, torch.full((1,), t))
    embeds = torch.cat([model.language_model.get_input_embeddings()(ids), t_emb[:, None], tokens], dim=1)
    attn = torch.cat([attn, attn.new_ones(1, 1 + tokens.shape[1])], dim=1)
    pos = torch.arange(embeds.shape[1])[None]
    h = model.language_model.model(inputs_embeds=embeds, attention_mask=attn, position_ids=pos).last_hidden_state
    return model.decode_velocity(h[:, -tokens.shape[1] :], skip, t_emb)


def test_janusflow_euler_cfg_sampler_matches_direct_computation(tokenizer, special):
    model = build_model(get_flavor("debug"), "janusflow").eval()
    with torch.no_grad():
        for p in model.vision_gen_dec_model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # GRN starts at zero: make every path matter
    vae = build_vae(get_flavor("debug"))
    prompts, w, steps = ["a red square", "two blue circles on grey"], 2.0, 2
    z_final, pixels = generate_images_janusflow(
        model, vae, tokenizer, special, prompts, cfg_weight=w, steps=steps, generator=torch.Generator().manual_seed(0)
    )
    assert pixels.shape == (2, 3, 64, 64)
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for step in range(steps):
            for row, prompt in enumerate(prompts):
                zr = z[row : row + 1]
                vc = _direct_velocity(model, tokenizer, special, prompt, zr, step / steps)
                vu = _direct_velocity(model, tokenizer, special, prompt, zr, step / steps, dropped=True)
                z[row : row + 1] = zr + (w * vc - (w - 1) * vu) / steps
    torch.testing.assert_close(z_final, z, rtol=1e-4, atol=1e-4)


def test_janus_pro_export_answers_through_the_stock_chat_template(tmp_path, tokenizer, special):
    """The stock understanding path: JanusProcessor.apply_chat_template builds our training prompt exactly,
    and generate answers as our sampler does."""
    from PIL import Image

    model, _ = _train_a_few_steps("janus_pro")
    export_janus_pro(model, tokenizer, tmp_path)
    processor = JanusProcessor.from_pretrained(tmp_path)
    stock = JanusForConditionalGeneration.from_pretrained(tmp_path).eval()
    question = "What digit is this?"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    image = Image.open(io.BytesIO(png(3))).convert("RGB")
    inputs = processor(text=prompt, images=[image], return_tensors="pt")
    expected = understanding_prompt(tokenizer, special, question, 64, True).input_ids
    assert inputs["input_ids"][0].tolist() == expected
    torch.testing.assert_close(inputs["pixel_values"][0], preprocess_understanding(png(3), 64), atol=1e-2, rtol=0)
    with torch.no_grad():
        out = stock.generate(**inputs, max_new_tokens=6, do_sample=False)
    theirs = processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    ours = answer_questions(
        model, tokenizer, special, [(png(3), question)], image_size=64, num_image_tokens=64, max_new_tokens=6
    )
    assert theirs == ours[0]
    # a system turn and a finished exchange render as training samples do
    chat = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    rendered = processor.apply_chat_template(chat)
    expected = "You are helpful.\n\n<|User|>: hi\n\n<|Assistant|>: hello"
    assert rendered == f"{tokenizer.bos_token}{expected}{tokenizer.eos_token}"


def test_janusflow_mlflow_model_generates_and_answers(tmp_path, tokenizer):
    """The MLflow pyfunc around a JanusFlow export and its VAE: an image for a prompt, an answer for a question."""
    import base64

    import mlflow.pyfunc
    from PIL import Image

    from model.inference import save_mlflow_model

    flavor = get_flavor("debug")
    export = export_janusflow(build_model(flavor, "janusflow"), tmp_path / "export", tokenizer)
    build_vae(flavor).save_pretrained(tmp_path / "vae")
    loaded = mlflow.pyfunc.load_model(str(save_mlflow_model(export, tmp_path / "mlmodel", tmp_path / "vae")))
    picture = base64.b64encode(png(2)).decode()
    rows = [{"prompt": "a handwritten digit 3"}, {"question": "What is it?", "image": picture}]
    out = loaded.predict(rows, params={"max_new_tokens": 3, "cfg_weight": 3.0})
    image = Image.open(io.BytesIO(base64.b64decode(out["image"][0])))
    assert image.size == (64, 64) and isinstance(out["answer"][1], str) and not isinstance(out["answer"][0], str)
