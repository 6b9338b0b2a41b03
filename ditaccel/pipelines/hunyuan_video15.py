"""HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, ``HunyuanVideo15ImageToVideoPipeline``):
``HunyuanVideo15Transformer3DModel``.

Joint attention in ``transformer_blocks.i.attn`` over [video tokens, then per sample: valid image
tokens, valid ByT5 tokens, valid MLLM tokens, then the invalid ones] — several conditioning streams
after the video (text suffix), their count the sum of the streams' lengths (left to each call:
every token beyond the grid). Padding is a bool mask ``key_valid & query_valid`` [B, 1, S, S]: a
key-padding mask whose padded query rows see nothing, which the runtime accepts as key padding
(anything else falls back to the model's dense attention). Latents [B, C, F, H, W], grid
(F / p_t, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class HunyuanVideo15Adapter(UncalibratedPreset, ModelAdapter):
    family = "hunyuan_video15"
    transformer_classes = ("HunyuanVideo15Transformer3DModel",)
    text_position = "suffix"
    attention_route = "dispatch"
    typical_steps = 50
    tokens_note = "image, ByT5 and MLLM streams after the video, bool padding mask"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        B, _, F, H, W = x.shape
        return CallFacts((F // pt, H // p, W // p), None, B, self.scalar_timestep(a.get("timestep")))
