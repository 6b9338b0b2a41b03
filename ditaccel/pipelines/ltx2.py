"""LTX-2 (``LTX2Pipeline``, ``LTX2ImageToVideoPipeline``, ...): ``LTX2VideoTransformer3DModel``,
audio and video in one transformer.

Only the video stream's self-attention (``transformer_blocks.i.attn1``, over the packed video
tokens) is made sparse; the audio stream's self-attention (``audio_attn1``), the text
cross-attentions and the audio<->video cross-modal attentions stay dense (they are not hooked).
Grid: latent ``num_frames``, ``height``, ``width`` over the patch sizes. A ``video_self_attention_mask``
(keyframe conditioning) is not a key-padding mask: those calls run the model's own attention.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks
from .ltx import packed_video_grid


class LTX2Adapter(UncalibratedPreset, ModelAdapter):
    family = "ltx2"
    transformer_classes = ("LTX2VideoTransformer3DModel",)
    text_position = "none"
    attention_route = "dispatch"
    typical_steps = 30
    tokens_note = "video self-attention only; audio and cross-modal attention dense"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        return CallFacts(packed_video_grid(transformer, a), 0, x.shape[0], self.scalar_timestep(a.get("timestep")))
