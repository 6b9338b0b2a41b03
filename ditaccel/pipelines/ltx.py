"""LTX-Video (``LTXPipeline``, ``LTXImageToVideoPipeline``, ...): ``LTXVideoTransformer3DModel``.

Self-attention ``transformer_blocks.i.attn1`` over the video tokens only (text through
cross-attention ``attn2``). Latents arrive packed [B, S, C] in frame-major raster order; the forward
is told the latent ``num_frames``, ``height``, ``width``, so the grid is those over the patch sizes.
``LTXConditionPipeline`` appends conditioning tokens (``video_coords``): those calls hold more
tokens than the grid and run the model's own attention.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


def packed_video_grid(transformer, a) -> tuple[int, int, int]:
    p, pt = transformer.config.patch_size, transformer.config.patch_size_t
    return (int(a["num_frames"]) // pt, int(a["height"]) // p, int(a["width"]) // p)


class LTXVideoAdapter(UncalibratedPreset, ModelAdapter):
    family = "ltx_video"
    transformer_classes = ("LTXVideoTransformer3DModel",)
    text_position = "none"
    attention_route = "dispatch"
    typical_steps = 50

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        return CallFacts(packed_video_grid(transformer, a), 0, x.shape[0], self.scalar_timestep(a.get("timestep")))
