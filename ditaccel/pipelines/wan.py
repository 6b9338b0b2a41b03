"""Wan 2.1 / 2.2 (``WanPipeline``, ``WanImageToVideoPipeline``, ``WanVACEPipeline``, ...):
``WanTransformer3DModel``, ``WanVACETransformer3DModel``, ``WanAnimateTransformer3DModel``.

Self-attention is ``blocks.i.attn1`` over video tokens only; text (and I2V image tokens) reach
the model through cross-attention ``attn2``, so there is no text in self-attention. Latents are
[B, C, F, H, W]; the token grid is (F / p_t, H / p_h, W / p_w), frame-major raster. Wan 2.2 has a
second transformer, ``transformer_2``, for the low-noise steps: both are hooked. WanVACE's control
branch (``vace_blocks.i.attn1``) runs self-attention over the control video on the same grid: it is
made sparse too. Derivatives (SkyReels-V2, ChronoEdit, Helios, and unknown classes with Wan's
structure) are in :mod:`.wan_derived`.
"""

from __future__ import annotations

from ..methods import TileConfig
from .base import CallFacts, ModelAdapter, blocks


def wan_grid(transformer, hidden_states) -> tuple[int, int, int]:
    pt, ph, pw = transformer.config.patch_size
    _, _, F, H, W = hidden_states.shape
    return (F // pt, H // ph, W // pw)


class WanAdapter(ModelAdapter):
    family = "wan"
    transformer_classes = ("WanTransformer3DModel", "WanVACETransformer3DModel", "WanAnimateTransformer3DModel")
    pipeline_attrs = ("transformer", "transformer_2")
    text_position = "none"
    attention_route = "dispatch"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("blocks", "attn1"), ("vace_blocks", "attn1")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        return CallFacts(wan_grid(transformer, x), 0, x.shape[0], self.scalar_timestep(a.get("timestep")))

    def preset(self):
        return TileConfig(window=(3, 3, 3), dense_steps=1)

    def preset_for(self, obj):
        # The embedded reference pipeline is a Wan too, but its 5 x 18 x 24 token grid fits inside
        # the family preset's tile window: it gets the preset chosen for it (see embedded.PRESET).
        from . import embedded

        if obj is not None and any(embedded.is_embedded_transformer(t) for _, t in self.transformers(obj)):
            return embedded.PRESET
        return self.preset()
