"""Cosmos Predict 2 / 2.5 (``Cosmos2TextToImagePipeline``, ``Cosmos2VideoToWorldPipeline``,
``Cosmos2_5_PredictBasePipeline``, ...): ``CosmosTransformer3DModel``.

Self-attention ``transformer_blocks.i.attn1`` over the video tokens only (text through ``attn2``).
Its processor calls ``dispatch_attention_fn`` without an ``_attention_backend`` of its own, so it
uses diffusers' active backend: ours is made the active one for the duration of each hooked
module's forward ("dispatch-active"). Latents [B, C, F, H, W], grid by ``config.patch_size``.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks
from .wan import wan_grid


class CosmosAdapter(UncalibratedPreset, ModelAdapter):
    family = "cosmos"
    transformer_classes = ("CosmosTransformer3DModel",)
    text_position = "none"
    attention_route = "dispatch-active"
    typical_steps = 35

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        return CallFacts(wan_grid(transformer, x), 0, x.shape[0], self.scalar_timestep(a.get("timestep")))
