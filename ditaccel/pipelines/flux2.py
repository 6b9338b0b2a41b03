"""Flux.2 (``Flux2Pipeline``): ``Flux2Transformer2DModel``, an image model (grid T = 1).

Flux's layout: joint attention over [text tokens, image tokens] (text prefix) in
``transformer_blocks.i.attn`` and ``single_transformer_blocks.i.attn``; packed latents [B, S, C]
with 4-axis position ids (t, h, w, l). Reference images are appended after the generated image
(their ids have t = 10, 20, ...): kept as dense extra keys and queries, planned as one dense run with
the text. With a KV cache (``kv_cache``), the reference tokens live in the cache and the queries are
fewer than the keys: those calls run the model's own attention.
"""

from __future__ import annotations

from .base import UncalibratedPreset
from .flux import FluxAdapter


class Flux2Adapter(UncalibratedPreset, FluxAdapter):
    """Flux's modules and call facts (``img_ids`` rows: the generated image first, references after)."""

    family = "flux2"
    transformer_classes = ("Flux2Transformer2DModel",)
    context_parallel_streams = False  # not verified for Flux.2
    typical_steps = 50
    tokens_note = "reference-image tokens after the image: dense extra tokens"

    def method_defaults(self, method, target=None):
        return {}  # Flux's window/tile sizes were chosen for Flux, not Flux.2
