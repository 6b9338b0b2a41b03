"""Mochi 1 (``MochiPipeline``): ``MochiTransformer3DModel``.

Joint attention in ``transformer_blocks.i.attn1`` over [video tokens, text tokens] (text suffix).
``MochiAttnProcessor2_0`` drops each sample's padded text and calls ``F.scaled_dot_product_attention``
once per sample (batch 1, its own length), so the text count is left to each call (every token
beyond the grid). Latents [B, C, F, H, W] patched per frame: grid (F, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class MochiAdapter(UncalibratedPreset, ModelAdapter):
    family = "mochi"
    transformer_classes = ("MochiTransformer3DModel",)
    text_position = "suffix"
    attention_route = "sdpa"
    typical_steps = 64
    tokens_note = "per-sample SDPA calls without padded text"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p = transformer.config.patch_size
        B, _, F, H, W = x.shape
        return CallFacts((F, H // p, W // p), None, B, self.scalar_timestep(a.get("timestep")))
