"""CogVideoX 1.0 / 1.5 (``CogVideoXPipeline``, ...): ``CogVideoXTransformer3DModel``.

Joint attention in ``transformer_blocks.i.attn1`` over [text tokens, video tokens] (text prefix).
Its processor calls ``F.scaled_dot_product_attention`` directly, so it is intercepted with a
TorchFunctionMode. Latents are [B, F, C, H, W], grid (F / p_t, H / p, W / p) (p_t = 1 on 1.0).
Classifier-free guidance is batched (one forward holds both branches).
"""

from __future__ import annotations

from ..methods import TopKConfig
from .base import CallFacts, ModelAdapter, blocks

# Not yet calibrated: no sparse-attention configuration has been published for CogVideoX that we
# reproduce, so an explicit conservative choice: a quarter of the steps dense (>= 20%) and every
# query block keeping 30% of the key blocks (density >= 0.3 at any resolution, by construction).
PRESET = TopKConfig(topk=0.3, dense_steps=0.25)


class CogVideoXAdapter(ModelAdapter):
    family = "cogvideox"
    transformer_classes = ("CogVideoXTransformer3DModel",)
    text_position = "prefix"
    attention_route = "sdpa"
    preset_source = ("not yet calibrated: a conservative choice, topk 0.3 (density >= 0.3), 25% of steps dense "
                     "(dense_steps=0.25); no published configuration for this family")

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p = transformer.config.patch_size
        pt = transformer.config.patch_size_t or 1
        B, F, _, H, W = x.shape
        frames = (F + pt - 1) // pt  # CogVideoX 1.5 pads the frames to a multiple of p_t
        text_len = a["encoder_hidden_states"].shape[1]
        return CallFacts((frames, H // p, W // p), text_len, B, self.scalar_timestep(a.get("timestep")))

    def preset(self):
        return PRESET
