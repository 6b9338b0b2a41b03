"""Stable Diffusion 3 / 3.5 (``StableDiffusion3Pipeline``, ...): ``SD3Transformer2DModel``.

Joint attention in ``transformer_blocks.i.attn`` over [image tokens, text tokens] (text suffix),
through ``JointAttnProcessor2_0``, which calls ``F.scaled_dot_product_attention`` directly (a
TorchFunctionMode intercepts it). SD3.5's dual-attention blocks add ``attn2``, self-attention over
the image tokens alone: also made sparse; the text count is left to each call (every token beyond
the grid's: the text in ``attn``, none in ``attn2``). Latents [B, C, H, W], grid (1, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class SD3Adapter(UncalibratedPreset, ModelAdapter):
    family = "sd3"
    transformer_classes = ("SD3Transformer2DModel",)
    text_position = "suffix"
    attention_route = "sdpa"
    typical_steps = 28
    tokens_note = "SD3.5 dual-attention attn2: image tokens only"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"), ("transformer_blocks", "attn2")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p = transformer.config.patch_size
        B, _, H, W = x.shape
        return CallFacts((1, H // p, W // p), None, B, self.scalar_timestep(a.get("timestep")))
