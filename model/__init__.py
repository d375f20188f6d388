"""Janus-Pro and JanusFlow: models, losses, freeze schedules, sampling, export (issue 5).

Nothing registers itself on import; import what you use:

- ``model.flavors``: ``FLAVORS``, ``get_flavor(name)``, ``FlavorConfig`` (+ LLM/Vision/VQ/Flow configs).
- ``model.build``: ``ModelConfig``, ``build_model(flavor, family, path=, device=)``,
  ``build_task(model, flavor, cfg, vae=)`` -> ``loss, metrics = task(batch)``,
  ``build_collate(flavor, cfg, tokenizer)`` -> picklable ``list[Sample] -> batch``, ``decoder_blocks(model)``.
- ``model.freeze``: ``FREEZE_SCHEDULES``, ``PARAM_GROUPS``, ``apply_freeze(model, family, stage)``.
- ``model.collate``: ``collate(samples, ...)`` (pure), packing, the flat positions of slots and targets.
- ``model.attention``: packed attention (one causal sequence per sample, no T x T mask), its layout.
- ``model.losses``: chunked linear + cross-entropy, reductions, device-side metric sums.
- ``model.tokenizer``: ``build_debug_tokenizer()``, ``load_tokenizer(flavor, path)``, ``special_ids(tok)``.
- ``model.janus_pro`` / ``model.janusflow`` / ``model.janusflow_task``: builders (``build_vq``,
  ``build_vae``), tasks, ``build_ema`` / ``apply_ema_update`` / ``ema_state_dict``.
- ``model.sampling``: ``generate_images_janus_pro``, ``generate_images_janusflow``, ``answer_questions``.
- ``model.export``: ``export_janus_pro``, ``export_janusflow``, ``load_janusflow``
  (``model.janus_pro.load_janus_pro`` for HF-format Janus-Pro).
- ``model.flops``: ``flops_per_sample``, ``flops_per_batch``.
"""
