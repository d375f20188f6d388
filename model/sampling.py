"""Batched sampling: Janus-Pro text-to-image (CFG, KV cache), JanusFlow Euler ODE (CFG), text answers.

Inputs follow the model's device; a ``generator`` for token sampling must live there too (JanusFlow's initial
noise is drawn with a CPU generator, then moved). Prompts of different lengths are left-padded (attention
mask 0, positions counted from the first real token), so one batch holds any mix. Unconditional rows replace
every prompt token but BOS by pad, as in training; JanusFlow also masks them out of attention (as its
reference inference does).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from model.collate import preprocess_understanding
from model.janusflow import JanusFlowModel
from model.prompts import UND_BOI, UND_SLOT, prompt_ids, understanding_prompt
from model.tokenizer import SpecialIds


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _llm(model: nn.Module) -> nn.Module:
    from model.family import family_of

    return family_of(model).llm(model)


def _lm_head(model: nn.Module) -> nn.Module:
    from model.family import family_of

    return family_of(model).lm_head(model)


def left_pad(rows: list[list[int]], pad: int, masks: list[list[int]] | None = None):
    """-> ids [B, T], attention mask [B, T] (0 on padding and on masked tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r)
        attn[i, width - len(r) :] = torch.tensor(masks[i] if masks else [1] * len(r))
    return ids, attn


def positions(attn: torch.Tensor) -> torch.Tensor:
    return (attn.cumsum(-1) - 1).clamp(min=0)


def cfg_prompt_rows(tokenizer, special: SpecialIds, prompts: list[str], mask_uncond: bool):
    """Cond and uncond prompt rows (ending with ``<begin_of_image>``) and their attention masks."""
    rows, masks = [], []
    for text in prompts:
        cond = [*prompt_ids(tokenizer, special, text), special.boi]
        uncond = [cond[0]] + [special.pad] * (len(cond) - 2) + [special.boi]
        rows += [cond, uncond]
        masks += [[1] * len(cond), [1] + [0 if mask_uncond else 1] * (len(cond) - 2) + [1]]
    return rows, masks


@torch.no_grad()
def generate_images_janus_pro(
    model: nn.Module,
    tokenizer,
    special: SpecialIds,
    prompts: list[str],
    *,
    cfg_weight: float = 5.0,
    temperature: float = 1.0,
    greedy: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [B, n], pixels [B, 3, H, W] in [-1, 1]). Rows interleave cond/uncond; logits = u + w(c - u).

    Plain multinomial sampling at ``temperature`` (the paper's), or argmax with ``greedy``.
    """
    n = model.config.vision_config.num_image_tokens
    rows, masks = cfg_prompt_rows(tokenizer, special, prompts, mask_uncond=False)
    ids, attn = (x.to(_device(model)) for x in left_pad(rows, special.pad, masks))
    embeds = model.get_input_embeddings()(ids)
    cache, out_ids = DynamicCache(), []
    llm = _llm(model)
    for _ in range(n):
        h = llm(
            inputs_embeds=embeds,
            attention_mask=attn,
            position_ids=positions(attn)[:, -embeds.shape[1] :],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        logits = model.model.generation_head(h).float()
        cond, uncond = logits[0::2], logits[1::2]
        guided = uncond + cfg_weight * (cond - uncond)
        if greedy:
            nxt = guided.argmax(-1, keepdim=True)
        else:
            nxt = torch.multinomial(torch.softmax(guided / temperature, -1), 1, generator=generator)
        out_ids.append(nxt)
        embeds = model.prepare_embeddings_for_image_generation(nxt.repeat_interleave(2, dim=0))
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
    image_ids = torch.cat(out_ids, dim=1)
    pixels = model.model.vqmodel.decode(image_ids).clamp(-1, 1)
    return image_ids, pixels


@torch.no_grad()
def generate_images_janusflow(
    model: JanusFlowModel,
    vae,
    tokenizer,
    special: SpecialIds,
    prompts: list[str],
    *,
    cfg_weight: float = 2.0,
    steps: int = 30,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Euler ODE from t=0 (noise) to t=1 (data), v = w v_c - (w-1) v_u. -> (latents, pixels in [-1, 1]).

    The prompt (without its ``<begin_of_image>``, whose slot takes the time embedding) is run once into a
    KV cache; each step runs the 1 + n generation tokens on top of it and crops the cache back.
    """
    flow = model.flavor.flow
    rows, masks = cfg_prompt_rows(tokenizer, special, prompts, mask_uncond=True)
    ids, attn = (x.to(_device(model)) for x in left_pad([r[:-1] for r in rows], special.pad, [m[:-1] for m in masks]))
    # Positions count every token of a row but its left padding: the masked (dropped) prompt tokens of an
    # uncond row keep their places, as in training, where a dropped prompt is masked, not removed.
    present = left_pad([r[:-1] for r in rows], special.pad)[1].to(ids.device)
    llm, prefix = _llm(model), ids.shape[1]
    cache = DynamicCache()
    llm(input_ids=ids, attention_mask=attn, position_ids=positions(present), past_key_values=cache, use_cache=True)
    b = len(prompts)
    shape = (b, flow.latent_channels, flow.latent_size, flow.latent_size)
    param = next(model.parameters())
    z = torch.randn(shape, generator=generator).to(param.device, param.dtype)
    n = flow.grid**2
    full = torch.cat([attn, attn.new_ones(2 * b, n + 1)], dim=1)
    pos = positions(torch.cat([present, present.new_ones(2 * b, n + 1)], dim=1))[:, prefix:]
    for step in range(steps):
        t = torch.full((2 * b,), step / steps, device=z.device)
        tokens, t_emb, skip = model.encode_latents(z.repeat_interleave(2, dim=0), t)
        embeds = torch.cat([t_emb[:, None], tokens], dim=1)
        h = llm(inputs_embeds=embeds, attention_mask=full, position_ids=pos, past_key_values=cache, use_cache=True)
        cache.crop(-(n + 1))  # drop this step's tokens, keep the prompt
        v = model.decode_velocity(h.last_hidden_state[:, 1:], skip, t_emb)
        v = cfg_weight * v[0::2] - (cfg_weight - 1.0) * v[1::2]
        z = z + v / steps
    pixels = vae.decode((z / vae.config.scaling_factor).to(vae.dtype)).sample.clamp(-1, 1)
    return z, pixels


@torch.no_grad()
def answer_questions(
    model: nn.Module,
    tokenizer,
    special: SpecialIds,
    questions: list[tuple[bytes | None, str]],
    *,
    image_size: int,
    num_image_tokens: int,
    max_new_tokens: int = 64,
    do_sample: bool = False,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[str]:
    """Understanding: (image bytes or None, question) -> answer text, greedy or sampled, batched."""
    exs = [understanding_prompt(tokenizer, special, q, num_image_tokens, img is not None) for img, q in questions]
    ids, attn = left_pad([e.input_ids for e in exs], special.pad)
    kinds, _ = left_pad([e.kinds for e in exs], 0)
    images = [preprocess_understanding(img, image_size) for img, _ in questions if img is not None]
    pix = torch.stack(images) if images else torch.zeros(0, 3, image_size, image_size)
    dev = _device(model)
    ids, attn, kinds, pix = ids.to(dev), attn.to(dev), kinds.to(dev), pix.to(dev)
    batch = {"input_ids": ids, "kinds": kinds, "und_pixel_values": pix}
    embeds = _understanding_embeds(model, batch)
    cache, done = DynamicCache(), torch.zeros(len(exs), dtype=torch.bool, device=dev)
    out: list[torch.Tensor] = []
    llm, head = _llm(model), _lm_head(model)
    for _ in range(max_new_tokens):
        h = llm(
            inputs_embeds=embeds,
            attention_mask=attn,
            position_ids=positions(attn)[:, -embeds.shape[1] :],
            past_key_values=cache,
            use_cache=True,
        ).last_hidden_state[:, -1]
        logits = head(h).float()
        if do_sample:
            nxt = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[:, 0]
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, special.eos), nxt)
        out.append(nxt)
        done |= nxt == special.eos
        if done.all():
            break
        embeds = _llm_embed(model, nxt[:, None])
        attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], dim=1)
    tokens = torch.stack(out, dim=1).tolist()
    return [tokenizer.decode(row[: row.index(special.eos)] if special.eos in row else row) for row in tokens]


def _llm_embed(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return _llm(model).get_input_embeddings()(ids)


def _understanding_embeds(model: nn.Module, batch: dict) -> torch.Tensor:
    from model.family import family_of

    return family_of(model).understanding_embeds(model, batch)


def janusflow_understanding_embeds(model: JanusFlowModel, batch: dict) -> torch.Tensor:
    """JanusFlow's prompt embeddings with aligned SigLIP features in the understanding slots (inference)."""
    embeds = _llm_embed(model, batch["input_ids"])
    pix = batch["und_pixel_values"]
    if pix.shape[0]:
        feats = model.understanding_features(pix.to(embeds.dtype))
        embeds = embeds.masked_scatter((batch["kinds"] == UND_SLOT)[..., None], feats.reshape(-1, embeds.shape[-1]))
        boi = model.beg_of_und_embed.expand(pix.shape[0], -1)
        embeds = embeds.masked_scatter((batch["kinds"] == UND_BOI)[..., None], boi)
    return embeds


def _on_device(generator: torch.Generator | None, model: nn.Module) -> torch.Generator | None:
    """Token sampling draws on the model's device: a CPU generator becomes one there with the same seed
    (on the CPU it is used as it is, so CPU results do not change)."""
    device = _device(model)
    if generator is None or generator.device.type == device.type:
        return generator
    return torch.Generator(device=device).manual_seed(generator.initial_seed())


def sample_janus_pro(
    model: nn.Module,
    vae,
    tokenizer,
    special: SpecialIds,
    prompts: list[str],
    *,
    generator: torch.Generator | None = None,
    cfg_weight: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] (the family spec's sampler: no VAE, tokens drawn at ``temperature``)."""
    weight = {} if cfg_weight is None else {"cfg_weight": cfg_weight}
    gen = _on_device(generator, model)
    _, pixels = generate_images_janus_pro(
        model, tokenizer, special, prompts, generator=gen, temperature=temperature, **weight
    )
    return pixels


def sample_janusflow(
    model: JanusFlowModel,
    vae,
    tokenizer,
    special: SpecialIds,
    prompts: list[str],
    *,
    generator: torch.Generator | None = None,
    cfg_weight: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Pixels [B, 3, H, W] in [-1, 1] through ``vae`` (the family spec's sampler: an ODE, no temperature)."""
    if temperature != 1.0:
        raise ValueError(f"temperature {temperature}: JanusFlow's ODE sampler has none (use 1)")
    weight = {} if cfg_weight is None else {"cfg_weight": cfg_weight}
    return generate_images_janusflow(model, vae, tokenizer, special, prompts, generator=generator, **weight)[1]
