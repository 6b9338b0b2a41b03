"""HunyuanVideo (``HunyuanVideoPipeline``): ``HunyuanVideoTransformer3DModel``.

Joint attention: the double-stream blocks (``transformer_blocks.i.attn``) and single-stream
blocks (``single_transformer_blocks.i.attn``) attend over [video tokens, text tokens], text as a
suffix, with text padding masked by an attention mask. The token refiner's attention is over text
only and is left alone. Latents are [B, C, F, H, W], grid (F / p_t, H / p, W / p).
"""

from __future__ import annotations

from ..methods import TileConfig
from .base import CallFacts, ModelAdapter, blocks


class HunyuanVideoAdapter(ModelAdapter):
    family = "hunyuan_video"
    transformer_classes = ("HunyuanVideoTransformer3DModel",)
    text_position = "suffix"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        B, _, F, H, W = x.shape
        text_len = a["encoder_hidden_states"].shape[1]
        return CallFacts((F // pt, H // p, W // p), text_len, B, self.scalar_timestep(a.get("timestep")))

    def preset(self):
        return TileConfig(window=(3, 3, 3), dense_steps=1)
