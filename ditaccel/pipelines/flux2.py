"""Flux.2 (``Flux2Pipeline``): ``Flux2Transformer2DModel``, an image model (grid T = 1).

Flux's layout: joint attention over [text tokens, image tokens] (text prefix) in
``transformer_blocks.i.attn`` and ``single_transformer_blocks.i.attn``; packed latents [B, S, C]
with 4-axis position ids (t, h, w, l). Reference images are appended after the generated image
(their ids have t = 10, 20, ...): kept as dense extra keys and queries, planned as one dense run with
the text. With a KV cache (``kv_cache``), the reference tokens live in the cache and the queries are
fewer than the keys: those calls run the model's own attention.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, blocks, conservative_preset, conservative_source, dense_runs_first
from .flux import IMAGE_GRIDS


class Flux2Adapter(ModelAdapter):
    family = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    text_position = "prefix"
    attention_route = "dispatch"
    preset_source = conservative_source(50)
    typical_steps = 50
    tokens_note = "reference-image tokens after the image: dense extra tokens"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        grid, n_image = IMAGE_GRIDS.read(a["img_ids"], x.shape[1])
        text_len = a["encoder_hidden_states"].shape[1]
        extra = x.shape[1] - n_image
        order = dense_runs_first(text_len, n_image, extra) if extra else None
        return CallFacts(grid, text_len + extra, x.shape[0], self.scalar_timestep(a.get("timestep")),
                         token_order=order)

    def preset(self):
        return conservative_preset()
