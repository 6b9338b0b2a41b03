"""HiDream-I1 (``HiDreamImagePipeline``): ``HiDreamImageTransformer2DModel``.

Double-stream ``double_stream_blocks.i.block.attn1`` attend over [image tokens, text tokens (T5,
Llama-3.1 layers)] and single-stream ``single_stream_blocks.i.block.attn1`` over the same
concatenation (text suffix, its count left to each call: the blocks see different Llama layers).
``HiDreamAttnProcessor`` calls ``F.scaled_dot_product_attention`` directly. Non-square images are
padded to the model's ``max_seq`` tokens with zeroed keys: the padding sits after the grid's tokens,
in the dense suffix run, so attention over it is kept as the model computes it. Latents
[B, C, H, W] (grid (1, H / p, W / p)), or pre-patchified [B, S, C] with ``img_sizes``.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset


class HiDreamAdapter(UncalibratedPreset, ModelAdapter):
    family = "hidream"
    transformer_classes = ("HiDreamImageTransformer2DModel",)
    text_position = "suffix"
    attention_route = "sdpa"
    typical_steps = 50
    tokens_note = "T5 + Llama tokens after the image; non-square padding kept dense"

    def self_attention_modules(self, transformer):
        found = []
        for list_name in ("double_stream_blocks", "single_stream_blocks"):
            for i, wrapper in enumerate(getattr(transformer, list_name, None) or []):
                module = getattr(getattr(wrapper, "block", None), "attn1", None)
                if module is not None:
                    found.append((f"{list_name}.{i}.block.attn1", len(found), module))
        return found

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        if x.dim() == 4:
            p = transformer.config.patch_size
            grid = (1, x.shape[2] // p, x.shape[3] // p)
        else:
            h, w = (int(s) for s in a["img_sizes"][0])
            grid = (1, h, w)
        return CallFacts(grid, None, x.shape[0], self.scalar_timestep(a.get("timesteps")))
