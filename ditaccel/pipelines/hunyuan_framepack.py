"""FramePack (``HunyuanVideoFramepackPipeline``): ``HunyuanVideoFramepackTransformer3DModel``.

HunyuanVideo's blocks (``transformer_blocks.i.attn``, ``single_transformer_blocks.i.attn``) over
[history latents (4x, 2x, clean; each patched at its own scale), video tokens, image-projection
tokens, text tokens]. The history latents are dense extra keys and queries (their own grids are
not used): with the conditioning tokens after the video, both runs are planned as one dense run
(a token permutation around each attention call). The conditioning count is the image tokens plus
the text tokens (only the valid ones for a batch of one, which the model truncates); for larger
batches text padding is a key mask. Latents [B, C, F, H, W], grid (F / p_t, H / p, W / p).
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks, dense_after_prefix


class HunyuanFramepackAdapter(UncalibratedPreset, ModelAdapter):
    family = "hunyuan_framepack"
    transformer_classes = ("HunyuanVideoFramepackTransformer3DModel",)
    text_position = "prefix"
    attention_route = "dispatch"
    typical_steps = 50
    tokens_note = "history latents before the video, image + text after: one dense run (permuted)"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("transformer_blocks", "attn"), ("single_transformer_blocks", "attn")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        p, pt = transformer.config.patch_size, transformer.config.patch_size_t
        B, _, F, H, W = x.shape
        grid = (F // pt, H // p, W // p)
        mask = a["encoder_attention_mask"]
        text = int(mask[0].sum().item()) if B == 1 else a["encoder_hidden_states"].shape[1]
        image = a["image_embeds"].shape[1] if a.get("image_embeds") is not None else 0
        order = dense_after_prefix(grid[0] * grid[1] * grid[2], image + text)
        return CallFacts(grid, None, B, self.scalar_timestep(a.get("timestep")), token_order=order)
