"""Export and import, safetensors only (no pickle).

- Janus-Pro: a transformers directory (``save_pretrained``) plus a ``JanusProcessor`` (tokenizer + image
  processor) and a generation config carrying ``boi_token_id``, so stock
  ``JanusForConditionalGeneration.from_pretrained`` loads it and its own ``generate(generation_mode="image")``
  samples from it. The tokenizer must carry ``image_token``/``boi_token``/``eoi_token`` (the debug one and
  converted Janus-Pro ones do).
- JanusFlow: ``model.safetensors`` + ``config.json`` in the reference checkpoint's layout
  (github deepseek-ai/Janus ``janus/janusflow``: ``MultiModalityCausalLM``): the SigLIP tower is renamed to
  the reference's timm names (fused qkv, ``attn_pool``), the training-only REPA head is left out. Our flavor
  is stored beside it so :func:`load_janusflow` rebuilds the same module.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, JanusProcessor
from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil

from model.flavors import FlavorConfig, FlowConfig, LLMConfig, VisionConfig, VQConfig
from model.janusflow import JanusFlowModel, build_janusflow
from model.tokenizer import special_ids

OURS = "vision_und_enc_model."
REF = "vision_und_enc_model.vision_tower."
FLAVOR_FILE = "janus_pipeline_flavor.json"
_SIMPLE = {
    "embeddings.patch_embedding.": "patch_embed.proj.",
    "post_layernorm.": "norm.",
    "head.attention.out_proj.": "attn_pool.proj.",
    "head.layernorm.": "attn_pool.norm.",
    "head.mlp.": "attn_pool.mlp.",
}
_LAYER = {"layer_norm1.": "norm1.", "layer_norm2.": "norm2.", "self_attn.out_proj.": "attn.proj.", "mlp.": "mlp."}


CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set parts = [{'type': 'text', 'text': message['content']}] %}"
    "{% else %}{% set parts = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '<|User|>: ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|Assistant|>: ' }}{% endif %}"
    "{% for part in parts %}"
    "{% if part['type'] == 'image' %}{{ image_token }}{{ '\n' }}{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|Assistant|>:' }}{% endif %}"
)
"""The training prompt format (model.prompts, JANUS_SPEC "deepseek") as a chat template, so the stock
``JanusProcessor.apply_chat_template`` builds exactly the prompts the model was trained on: BOS, a system turn
and ``\n\n``, ``<|User|>: `` with each image as ``<image_placeholder>`` and a newline (the processor
expands it to ``<begin_of_image>`` + the image tokens + ``<end_of_image>``), ``\n\n``, then
``<|Assistant|>:``; a given answer follows after a space and ends with EOS."""


def export_janus_pro(model, tokenizer, out_dir: str | Path) -> Path:
    """Save a Janus-Pro model in transformers' format with what its ``generate`` needs."""
    out = Path(out_dir)
    ids = special_ids(tokenizer)
    model.generation_config = GenerationConfig(
        bos_token_id=ids.bos,
        eos_token_id=ids.eos,
        pad_token_id=ids.pad,
        do_sample=True,
        guidance_scale=5.0,
        generation_kwargs={"boi_token_id": ids.boi},
    )
    model.save_pretrained(out)
    size = model.config.vision_config.image_size
    processor = JanusProcessor(
        # SigLIP's normalisation as in training (model.collate): mean = std = 0.5, padded with grey 127
        image_processor=JanusImageProcessorPil(
            size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        num_image_tokens=model.config.vision_config.num_image_tokens,
        chat_template=CHAT_TEMPLATE.replace("image_token", repr(tokenizer.image_token)),
    )
    processor.save_pretrained(out)  # also writes the tokenizer
    return out


def siglip_to_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers SigLIP names (under OURS) -> the reference's timm names (under REF)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if not key.startswith(OURS):
            out[key] = value
            continue
        k = key[len(OURS) :]
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)$", k):
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)$", k):
            prefix = next(p for p in _LAYER if m[2].startswith(p))
            out[f"{REF}blocks.{m[1]}.{_LAYER[prefix]}{m[2][len(prefix) :]}"] = value
        elif k == "embeddings.position_embedding.weight":
            out[REF + "pos_embed"] = value.unsqueeze(0)
        elif k == "head.probe":
            out[REF + "attn_pool.latent"] = value
        elif k.startswith("head.attention.in_proj_"):
            kind, d = k.rsplit("_", 1)[-1], value.shape[0] // 3
            out[f"{REF}attn_pool.q.{kind}"] = value[:d]
            out[f"{REF}attn_pool.kv.{kind}"] = value[d:]
        else:
            prefix = next((p for p in _SIMPLE if k.startswith(p)), None)
            if prefix is None:
                raise KeyError(f"no reference name for SigLIP parameter {key!r}")
            out[REF + _SIMPLE[prefix] + k[len(prefix) :]] = value
    for name, parts in qkv.items():
        out[REF + name] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def siglip_from_reference(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`siglip_to_reference`."""
    inv_simple = {v: k for k, v in _SIMPLE.items()}
    inv_layer = {v: k for k, v in _LAYER.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not key.startswith(REF):
            out[key] = value
            continue
        k = key[len(REF) :]
        if m := re.match(r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", k):
            for name, part in zip("qkv", value.chunk(3, dim=0), strict=True):
                out[f"{OURS}encoder.layers.{m[1]}.self_attn.{name}_proj.{m[2]}"] = part
        elif m := re.match(r"blocks\.(\d+)\.(.*)$", k):
            prefix = next(p for p in inv_layer if m[2].startswith(p))
            out[f"{OURS}encoder.layers.{m[1]}.{inv_layer[prefix]}{m[2][len(prefix) :]}"] = value
        elif k == "pos_embed":
            out[OURS + "embeddings.position_embedding.weight"] = value[0]
        elif k == "attn_pool.latent":
            out[OURS + "head.probe"] = value
        elif k.startswith(("attn_pool.q.", "attn_pool.kv.")):
            continue  # joined below
        else:
            prefix = next(p for p in inv_simple if k.startswith(p))
            out[OURS + inv_simple[prefix] + k[len(prefix) :]] = value
    for kind in ("weight", "bias"):
        if f"{REF}attn_pool.q.{kind}" in state:
            q, kv = state[f"{REF}attn_pool.q.{kind}"], state[f"{REF}attn_pool.kv.{kind}"]
            out[f"{OURS}head.attention.in_proj_{kind}"] = torch.cat([q, kv], dim=0)
    return out


def janusflow_reference_state(model: JanusFlowModel, state: dict[str, torch.Tensor] | None = None):
    """The reference-named state dict of ``model`` (or of ``state``, e.g. EMA weights), REPA head dropped."""
    state = dict(state if state is not None else model.state_dict())
    state = {k: v for k, v in state.items() if not k.startswith("repa_head.")}
    return siglip_to_reference(state)


def reference_config(flavor: FlavorConfig) -> dict:
    """config.json of the reference ``MultiModalityCausalLM`` for this flavor."""
    from model.janus_pro import build_llama_config

    v, f, d = flavor.vision, flavor.flow, flavor.llm.hidden_size
    common = {
        "hidden_size": d,
        "block_out_channels": [f.channels],
        "layers_in_middle": f.num_blocks,
        "elementwise_affine": True,
        "use_bias": True,
        "norm_eps": f.norm_eps,
        "use_mid_block": True,
    }
    return {
        "model_type": "multi_modality",
        "vision_und_enc_config": {
            "cls": "CLIPVisionTower",
            "params": {
                "model_name": "siglip_large_patch16_384",
                "image_size": v.image_size,
                "select_feature": "same",
                "select_layer": -1,
            },
        },
        "vision_gen_enc_config": {
            "cls": "ShallowUViTEncoder",
            "params": {
                **common,
                "input_channels": f.latent_channels,
                "stride": f.patch_size,
                "kernel_size": f.patch_size,
                "padding": 0,
            },
        },
        "vision_gen_dec_config": {
            "cls": "ShallowUViTDecoder",
            "params": {**common, "in_channels": f.channels, "out_channels": f.latent_channels, "upsamples": 1},
        },
        "language_config": build_llama_config(flavor).to_diff_dict(),
        "torch_dtype": "float32",
    }


def export_janusflow(
    model: JanusFlowModel, out_dir: str | Path, tokenizer=None, state: dict[str, torch.Tensor] | None = None
) -> Path:
    """Write the reference layout; ``state`` overrides the weights (pass ``ema_state_dict(...)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in janusflow_reference_state(model, state).items()}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(reference_config(model.flavor), indent=2, sort_keys=True))
    (out / FLAVOR_FILE).write_text(json.dumps(dataclasses.asdict(model.flavor), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def flavor_from_dict(data: dict) -> FlavorConfig:
    return FlavorConfig(
        name=data["name"],
        families=tuple(data["families"]),
        llm=LLMConfig(**data["llm"]),
        vision=VisionConfig(**data["vision"]),
        vq=VQConfig(**data["vq"]),
        flow=FlowConfig(**data["flow"]),
        debug_tokenizer=data["debug_tokenizer"],
        image_token_id=data["image_token_id"],
    )


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    """``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    index = path / "model.safetensors.index.json"
    if not index.exists():
        return load_file(path / "model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(path / shard))
    return state


def load_janusflow(path: str | Path, flavor: FlavorConfig | None = None) -> JanusFlowModel:
    """A JanusFlow export (reference layout) -> our module; strict except the fresh REPA head."""
    path = Path(path)
    if flavor is None:
        flavor = flavor_from_dict(json.loads((path / FLAVOR_FILE).read_text()))
    model = build_janusflow(flavor)
    state = siglip_from_reference(read_safetensors_dir(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # never in a checkpoint: the training-only REPA head; possibly not: SigLIP's unused pooling head
    missing = [k for k in missing if not k.startswith(("repa_head.", OURS + "head."))]
    if missing or unexpected:
        raise KeyError(f"{path}: missing {missing[:5]}..., unexpected {unexpected[:5]}...")
    return model


def load_janusflow_export(path: str | Path) -> tuple[JanusFlowModel, FlavorConfig]:
    """An export directory -> the model and the flavor stored beside its weights."""
    flavor = flavor_from_dict(json.loads((Path(path) / FLAVOR_FILE).read_text()))
    return load_janusflow(path, flavor), flavor
