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

import torch

from ..methods import RadialConfig
from .base import CallFacts, ModelAdapter, blocks

# Radial Attention (Li et al. 2025, arXiv:2505.18875; github.com/mit-han-lab/radial-attention), its
# published Wan configurations, the dense steps as fractions so they follow the call's step count:
# Wan 2.1-14B T2V: 12 of 50 steps dense, 1 dense layer, decay_factor 0.2.
WAN21_PRESET = RadialConfig(dense_steps=12 / 50, dense_layers=1, decay_factor=0.2)
# Wan 2.2-A14B T2V (two transformers): 11 of 40 steps dense, decay_factor 0.8; the dense layer as
# Wan 2.1's (the published Wan 2.2 figures give steps and decay only).
WAN22_PRESET = RadialConfig(dense_steps=11 / 40, dense_layers=1, decay_factor=0.8)
# A method named by the user on Wan 2.1 starts from that method's published Wan setting: radial as
# above; Sparse VideoGen (Xi et al. 2025) keeps the first 20% of Wan's steps dense for its
# spatial/temporal head patterns ('heads').
WAN21_METHOD_DEFAULTS = {
    "radial": {"dense_steps": WAN21_PRESET.dense_steps, "decay_factor": WAN21_PRESET.decay_factor,
               "dense_layers": WAN21_PRESET.dense_layers},
    "heads": {"dense_steps": 0.2},
}


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
    preset_source = ("Radial Attention (Li et al. 2025, mit-han-lab/radial-attention): Wan 2.1 radial, 12 of 50 "
                     "steps dense (0.24), 1 dense layer, decay_factor 0.2; Wan 2.2 (a pipeline with transformer_2) "
                     "11 of 40 dense (0.275), decay_factor 0.8. Sparse VideoGen's Wan setting for method 'heads': "
                     "20% of steps dense (dense_steps=0.2)")

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("blocks", "attn1"), ("vace_blocks", "attn1")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        return CallFacts(wan_grid(transformer, x), 0, x.shape[0], self.scalar_timestep(a.get("timestep")))

    def preset(self):
        return WAN21_PRESET

    def preset_for(self, obj):
        # The embedded reference pipeline is a Wan too, trained small: it keeps the preset chosen for
        # it by calibration (see embedded.PRESET).
        from . import embedded

        if obj is not None and any(embedded.is_embedded_transformer(t) for _, t in self.transformers(obj)):
            return embedded.PRESET
        if obj is not None and not isinstance(obj, torch.nn.Module) and getattr(obj, "transformer_2", None) is not None:
            return WAN22_PRESET
        return self.preset()

    def method_defaults(self, method, target=None):
        # What was published for Wan 2.1 per method (a dense fraction becomes a count on a bare
        # transformer: ``for_target``). The embedded pipeline is a small Wan trained here, not Wan 2.1:
        # its methods keep their own defaults.
        from . import embedded

        if target is not None and any(embedded.is_embedded_transformer(t) for _, t in self.transformers(target)):
            return {}
        return dict(WAN21_METHOD_DEFAULTS.get(method, {}))
