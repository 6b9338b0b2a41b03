"""Qwen-Image (``QwenImagePipeline``, ``QwenImageEditPipeline``, ...): ``QwenImageTransformer2DModel``.

Joint attention in ``transformer_blocks.i.attn`` over [text tokens, image tokens] (text prefix);
text padding arrives as a bool key mask built from ``encoder_hidden_states_mask``. Latents are packed
[B, S, C]; ``img_shapes[0]`` lists the (frames, rows, cols) token grid of every image in the
sequence: the first is the image being generated, the others (Qwen-Image-Edit's reference images)
follow it and are kept as dense extra keys and queries, planned as one dense run with the text.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks, dense_runs_first


class QwenImageAdapter(UncalibratedPreset, ModelAdapter):
    family = "qwen_image"
    transformer_classes = ("QwenImageTransformer2DModel",)
    text_position = "prefix"
    context_parallel_streams = True  # _cp_plan splits both streams and the text mask; [text_r | image_r]
    attention_route = "dispatch"
    typical_steps = 50
    tokens_note = "Edit reference images after the image: dense extra tokens; bool text key mask"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        shapes = a["img_shapes"]
        first = shapes[0] if isinstance(shapes[0], list) else shapes
        grid = tuple(int(s) for s in first[0])
        n_image = grid[0] * grid[1] * grid[2]
        text_len = a["encoder_hidden_states"].shape[1]
        extra = x.shape[1] - n_image
        order = dense_runs_first(text_len, n_image, extra) if extra > 0 else None
        return CallFacts(grid, text_len + max(extra, 0), x.shape[0], self.scalar_timestep(a.get("timestep")),
                         token_order=order)
