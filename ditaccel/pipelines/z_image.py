"""Z-Image (``ZImagePipeline``, ``ZImageImg2ImgPipeline``, ...): ``ZImageTransformer2DModel``.

The forward takes lists: ``x`` of per-sample latents [C, F, H, W] patched by ``patch_size`` and
``f_patch_size``. The main ``layers.i.attention`` attend over one unified sequence per sample,
[image tokens, image pad tokens (to a multiple of 32), caption tokens and their pads], padded to
the batch's longest with a key-padding mask; the ``noise_refiner.i.attention`` layers over the
(padded) image tokens alone. Everything after the grid's tokens is one dense suffix run whose length
is left to each call. Omni mode (several images and SigLIP tokens per sample) runs the model's own
attention.
"""

from __future__ import annotations

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks


class ZImageAdapter(UncalibratedPreset, ModelAdapter):
    family = "z_image"
    transformer_classes = ("ZImageTransformer2DModel",)
    text_position = "suffix"
    attention_route = "dispatch"
    typical_steps = 50
    tokens_note = "image pad tokens and caption after the image; omni mode runs dense"

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("noise_refiner", "attention"), ("layers", "attention")))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["x"]
        t = self.scalar_timestep(a.get("t"))
        if isinstance(x[0], (list, tuple)):
            return CallFacts((1, 1, 1), 0, len(x), t, dense_reason="Z-Image omni mode (several images per sample)")
        p, pf = a.get("patch_size", 2), a.get("f_patch_size", 1)
        _, F, H, W = x[0].shape
        return CallFacts((F // pf, H // p, W // p), None, len(x), t)
