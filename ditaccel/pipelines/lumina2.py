"""Lumina-Image 2.0 (``Lumina2Pipeline``): ``Lumina2Transformer2DModel``.

The main ``layers.i.attn`` attend over one joint sequence per sample: [its valid caption tokens,
image tokens, zero padding up to the batch's longest]; the ``noise_refiner.i.attn`` layers over the
image tokens alone (both made sparse; the caption-only ``context_refiner`` is left alone). Text is a
prefix whose length is left to each call. The processor calls ``F.scaled_dot_product_attention``
directly (GQA by repeating keys). When the samples' caption lengths differ, their image tokens sit
at different offsets: such forwards run the model's own attention. Latents [B, C, H, W], grid
(1, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class Lumina2Adapter(UncalibratedPreset, ModelAdapter):
    family = "lumina2"
    transformer_classes = ("Lumina2Transformer2DModel",)
    text_position = "prefix"
    attention_route = "sdpa"
    typical_steps = 30
    tokens_note = "noise_refiner layers: image tokens only; unequal caption lengths in a batch run dense"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("noise_refiner", "attn"), ("layers", "attn")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p = transformer.config.patch_size
        B, _, H, W = x.shape
        lengths = a["encoder_attention_mask"].sum(dim=1)
        reason = "" if bool((lengths == lengths[0]).all()) else \
            "the samples' caption lengths differ, so their image tokens sit at different offsets"
        return CallFacts((1, H // p, W // p), None, B, self.scalar_timestep(a.get("timestep")), dense_reason=reason)
