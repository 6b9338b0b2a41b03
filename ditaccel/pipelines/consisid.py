"""ConsisID (``ConsisIDPipeline``): ``ConsisIDTransformer3DModel``, CogVideoX 1.0's layout.

Joint attention in ``transformer_blocks.i.attn1`` over [text tokens, video tokens] (text prefix)
through CogVideoX's processor, which calls ``F.scaled_dot_product_attention`` directly (a
TorchFunctionMode intercepts it). The face-identity cross-attention is left alone. Latents are
[B, F, C, H, W], grid (F, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class ConsisIDAdapter(UncalibratedPreset, ModelAdapter):
    family = "consisid"
    transformer_classes = ("ConsisIDTransformer3DModel",)
    text_position = "prefix"
    attention_route = "sdpa"
    typical_steps = 50

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p = transformer.config.patch_size
        B, F, _, H, W = x.shape
        text_len = a["encoder_hidden_states"].shape[1]
        return CallFacts((F, H // p, W // p), text_len, B, self.scalar_timestep(a.get("timestep")))
