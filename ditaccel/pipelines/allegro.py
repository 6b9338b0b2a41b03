"""Allegro (``AllegroPipeline``): ``AllegroTransformer3DModel``.

Self-attention ``transformer_blocks.i.attn1`` over the video tokens only (text through ``attn2``);
``AllegroAttnProcessor2_0`` calls ``F.scaled_dot_product_attention`` directly. A video padding mask,
when given, is an additive key mask. Latents [B, C, F, H, W], grid (F / p_t, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class AllegroAdapter(UncalibratedPreset, ModelAdapter):
    family = "allegro"
    transformer_classes = ("AllegroTransformer3DModel",)
    text_position = "none"
    attention_route = "sdpa"
    typical_steps = 100

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        B, _, F, H, W = x.shape
        return CallFacts((F // pt, H // p, W // p), 0, B, self.scalar_timestep(a.get("timestep")))
