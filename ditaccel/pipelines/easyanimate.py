"""EasyAnimate V5.1 (``EasyAnimatePipeline``, ...): ``EasyAnimateTransformer3DModel``.

Joint attention in ``transformer_blocks.i.attn1`` over [text tokens (Qwen2-VL, then T5 when
given), video tokens] (text prefix, its count left to each call); ``EasyAnimateAttnProcessor2_0``
calls ``F.scaled_dot_product_attention`` directly. Latents [B, C, F, H, W] patched per frame:
grid (F, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class EasyAnimateAdapter(UncalibratedPreset, ModelAdapter):
    family = "easyanimate"
    transformer_classes = ("EasyAnimateTransformer3DModel",)
    text_position = "prefix"
    attention_route = "sdpa"
    typical_steps = 50

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p = transformer.config.patch_size
        B, _, F, H, W = x.shape
        return CallFacts((F, H // p, W // p), None, B, self.scalar_timestep(a.get("timestep")))
