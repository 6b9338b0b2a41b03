"""CogView3-Plus (``CogView3PlusPipeline``): ``CogView3PlusTransformer2DModel``, and CogView4
(``CogView4Pipeline``, ``CogView4ControlPipeline``): ``CogView4Transformer2DModel``. Image models.

Both: joint attention in ``transformer_blocks.i.attn1`` over [text tokens, image tokens] (text
prefix); the processors call ``F.scaled_dot_product_attention`` directly. Latents [B, C, H, W],
grid (1, H / p, W / p). CogView4's optional text mask reaches SDPA as a float 0/1 matrix (a bias,
not a key-padding mask): such calls fall back to the model's own dense attention.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class CogView3PlusAdapter(UncalibratedPreset, ModelAdapter):
    family = "cogview3plus"
    transformer_classes = ("CogView3PlusTransformer2DModel",)
    text_position = "prefix"
    attention_route = "sdpa"
    typical_steps = 50

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p = transformer.config.patch_size
        B, _, H, W = x.shape
        text_len = a["encoder_hidden_states"].shape[1]
        return CallFacts((1, H // p, W // p), text_len, B, self.scalar_timestep(a.get("timestep")))


class CogView4Adapter(CogView3PlusAdapter):
    family = "cogview4"
    transformer_classes = ("CogView4Transformer2DModel",)
    tokens_note = "a text mask (a float 0/1 bias) runs the model's dense attention"
