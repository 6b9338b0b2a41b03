"""HunyuanImage 2.1 (``HunyuanImagePipeline``, ``HunyuanImageRefinerPipeline``):
``HunyuanImageTransformer2DModel``.

HunyuanVideo's block layout (``transformer_blocks.i.attn``, ``single_transformer_blocks.i.attn``)
over [image tokens, text tokens (MLLM, then ByT5 when given)] (text suffix, its count left to each
call); text padding is a key mask [B, 1, 1, S]. Latents [B, C, H, W] (the refiner: [B, C, F, H, W]),
patched by ``config.patch_size`` on the trailing axes.
"""

from __future__ import annotations


from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class HunyuanImageAdapter(UncalibratedPreset, ModelAdapter):
    family = "hunyuan_image"
    transformer_classes = ("HunyuanImageTransformer2DModel",)
    text_position = "suffix"
    attention_route = "dispatch"
    typical_steps = 50

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        sizes = [d // p for d, p in zip(x.shape[2:], transformer.config.patch_size)]
        grid = tuple(sizes) if len(sizes) == 3 else (1, *sizes)
        return CallFacts(grid, None, x.shape[0], self.scalar_timestep(a.get("timestep")))
