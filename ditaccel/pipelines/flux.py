"""Flux (``FluxPipeline``, ``FluxKontextPipeline``, ...): ``FluxTransformer2DModel``, and Chroma
(``ChromaPipeline``): ``ChromaTransformer2DModel``, the same layout. Image models (grid T = 1).

Joint attention over [text tokens, image tokens] (text prefix) in the double-stream blocks
(``transformer_blocks.i.attn``) and the single-stream blocks (``single_transformer_blocks.i.attn``).
Latents arrive packed as [B, S, C]; ``img_ids`` has a row (i, row, col) per image token: i = 0 for
the image being generated, i >= 1 for Kontext's context image (appended after it, possibly at
another size). The (H, W) grid is that of the i = 0 rows; the context-image tokens are kept as
dense extra keys and queries, planned as one dense run with the text (their own grid is not used).
"""

from __future__ import annotations

import weakref

import torch

from ..methods import TopKConfig
from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks, dense_runs_first

# Not yet calibrated: no sparse-attention configuration has been published for Flux that we
# reproduce, so an explicit conservative choice: a quarter of the steps dense (>= 20%) and every
# query block keeping 30% of the key blocks (density >= 0.3 at any resolution, by construction).
PRESET = TopKConfig(topk=0.3, dense_steps=0.25)


class FluxAdapter(ModelAdapter):
    family = "flux"
    transformer_classes = ("FluxTransformer2DModel",)
    text_position = "prefix"
    context_parallel_streams = True  # _cp_plan splits hidden_states and encoder_hidden_states; [text_r | image_r]
    attention_route = "dispatch"
    tokens_note = "Kontext context-image tokens after the image: dense extra tokens"
    preset_source = ("not yet calibrated: a conservative choice, topk 0.3 (density >= 0.3), 25% of steps dense "
                     "(dense_steps=0.25); no published configuration for this family")
    typical_steps = 28  # FluxPipeline's default num_inference_steps

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
        return PRESET

    def method_defaults(self, method, target=None):
        if method == "window":
            return {"kernel_size": (1, 9, 9)}
        if method == "tile":
            return {"window": (1, 5, 5)}
        return {}


class ImageGridCache:
    """``image_grid_from_ids`` read on the host once per ids tensor: pipelines pass the same
    ``img_ids`` tensor to every step, and reading it is a device sync."""

    def __init__(self):
        self._last = None  # (weakref to the ids tensor, its version and the length, the answer)

    def read(self, ids: torch.Tensor, num_tokens: int):
        last = self._last
        if last is not None and last[0]() is ids and last[1] == (ids._version, num_tokens):
            return last[2]
        found = image_grid_from_ids(ids[0] if ids.dim() == 3 else ids, num_tokens)
        self._last = (weakref.ref(ids), (ids._version, num_tokens), found)
        return found


def image_grid_from_ids(ids: torch.Tensor, num_tokens: int) -> tuple[tuple[int, int, int], int]:
    """(1, H, W) of the generated image and its token count, from position ids [S, 3] whose first
    column is 0 on the generated image's rows (which come first, in raster order)."""
    if ids.shape[0] != num_tokens:
        raise ValueError(f"img_ids has {ids.shape[0]} rows but hidden_states has {num_tokens} tokens")
    target = ids[:, 0] == ids[0, 0]
    n = int(target.sum().item())
    if not bool(target[:n].all()):
        raise ValueError("img_ids: the generated image's rows are not one run at the start of the sequence")
    rows = ids[:n, 1]
    cols = ids[:n, 2]
    H = int(rows.max().item() - rows.min().item()) + 1
    W = int(cols.max().item() - cols.min().item()) + 1
    if H * W != n:
        raise ValueError(f"img_ids describe a {H}x{W} grid but the generated image has {n} tokens")
    return (1, H, W), n


class ChromaAdapter(UncalibratedPreset, FluxAdapter):
    family = "chroma"
    transformer_classes = ("ChromaTransformer2DModel",)
    tokens_note = ""
    context_parallel_streams = False  # not verified for Chroma
    typical_steps = 35

    def method_defaults(self, method, target=None):
        return {}


IMAGE_GRIDS = ImageGridCache()
