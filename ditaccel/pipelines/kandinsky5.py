"""Kandinsky 5 (``Kandinsky5T2VPipeline``, ``Kandinsky5I2VPipeline``, ``Kandinsky5T2IPipeline``, ...):
``Kandinsky5Transformer3DModel``.

Self-attention ``visual_transformer_blocks.i.self_attention`` over the visual tokens only (text
through ``cross_attention``; the text encoder blocks are text-only and left alone). Latents are
channels-last [B, T, H, W, C], grid (T / p_t, H / p_h, W / p_w), raster order. With
``sparse_params`` (its own NABLA sparse attention, tokens in 8 x 8 "fractal" tiles) the model
passes its own block mask: those calls run the model's own attention untouched.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class Kandinsky5Adapter(UncalibratedPreset, ModelAdapter):
    family = "kandinsky5"
    transformer_classes = ("Kandinsky5Transformer3DModel",)
    text_position = "none"
    attention_route = "dispatch"
    typical_steps = 50
    tokens_note = "with sparse_params (NABLA) the model's own sparse attention runs"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("visual_transformer_blocks", "self_attention"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        pt, ph, pw = transformer.config.patch_size
        B, T, H, W, _ = x.shape
        return CallFacts((T // pt, H // ph, W // pw), 0, B, self.scalar_timestep(a.get("timestep")))
