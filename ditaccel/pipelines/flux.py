"""Flux (``FluxPipeline``, ...): ``FluxTransformer2DModel``, an image model (grid T = 1).

Joint attention over [text tokens, image tokens] (text prefix) in the double-stream blocks
(``transformer_blocks.i.attn``) and the single-stream blocks (``single_transformer_blocks.i.attn``).
Latents arrive packed as [B, S, C]; the (H, W) token grid is read from ``img_ids``
(rows of (0, row, col)).
"""

from __future__ import annotations

from ..methods import TopKConfig
from .base import CallFacts, ModelAdapter, blocks

# Not yet calibrated: no sparse-attention configuration has been published for Flux that we
# reproduce, so an explicit conservative choice: a quarter of the steps dense (>= 20%) and every
# query block keeping 30% of the key blocks (density >= 0.3 at any resolution, by construction).
PRESET = TopKConfig(topk=0.3, dense_steps=0.25)


class FluxAdapter(ModelAdapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    text_position = "prefix"
    preset_source = ("not yet calibrated: a conservative choice, topk 0.3 (density >= 0.3), 25% of steps dense "
                     "(dense_steps=0.25); no published configuration for this family")

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        ids = a["img_ids"]
        ids = ids[0] if ids.dim() == 3 else ids
        H = int(ids[:, 1].max().item()) + 1
        W = int(ids[:, 2].max().item()) + 1
        if H * W != x.shape[1]:
            raise ValueError(f"Flux img_ids describe a {H}x{W} grid but hidden_states has {x.shape[1]} tokens")
        text_len = a["encoder_hidden_states"].shape[1]
        return CallFacts((1, H, W), text_len, x.shape[0], self.scalar_timestep(a.get("timestep")))

    def preset(self):
        return PRESET

    def method_defaults(self, method):
        if method == "window":
            return {"kernel_size": (1, 9, 9)}
        if method == "tile":
            return {"window": (1, 5, 5)}
        return {}
