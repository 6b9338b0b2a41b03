"""Transformers with Flux's layout under other names: ``BriaTransformer2DModel`` (Bria 3.2),
``LongCatImageTransformer2DModel`` (LongCat-Image, -Edit), ``OvisImageTransformer2DModel``
(Ovis-Image). A declarative table: they differ from Flux only in names and defaults.

Double-stream ``transformer_blocks.i.attn`` and single-stream ``single_transformer_blocks.i.attn``
over [text tokens, image tokens] (text prefix), packed latents with ``img_ids`` rows per image token;
the generated image is the first run of rows sharing the first id column, anything after it (an
edit model's reference image) is kept as dense extra tokens (see :mod:`.flux`).
"""

from __future__ import annotations

from .base import UncalibratedPreset
from .flux import FluxAdapter

FLUX_LIKE = (
    # family, transformer class, default steps of its pipeline
    ("bria", "BriaTransformer2DModel", 30),
    ("longcat_image", "LongCatImageTransformer2DModel", 50),
    ("ovis_image", "OvisImageTransformer2DModel", 50),
)


def _make(family: str, cls: str, steps: int) -> type:
    return type(f"{cls.removesuffix('Transformer2DModel')}Adapter", (UncalibratedPreset, FluxAdapter), {
        "family": family, "transformer_classes": (cls,), "typical_steps": steps, "context_parallel_streams": False,
        "tokens_note": "tokens after the image (edit references): dense extra tokens",
        "method_defaults": lambda self, method, target=None: {}, "__doc__": f"{cls}: Flux's layout (see :mod:`.flux_like`).",
    })


FLUX_LIKE_ADAPTERS = tuple(_make(*row) for row in FLUX_LIKE)
