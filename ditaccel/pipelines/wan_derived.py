"""Models built on Wan's transformer: ``SkyReelsV2Transformer3DModel`` (SkyReels-V2, diffusion
forcing), ``ChronoEditTransformer3DModel`` (ChronoEdit), ``HeliosTransformer3DModel`` (Helios), and
any transformer with Wan's structure whatever its class name.

All run self-attention in ``blocks.i.attn1`` over the video tokens of [B, C, F, H, W] latents
patched by ``config.patch_size`` (text only through cross-attention), with a processor that passes
its own ``_attention_backend`` to ``dispatch_attention_fn``. Helios prepends its history latents
(short, mid, long: each patched at its own scale) to the video tokens: they are kept as dense extra
keys and queries before the grid (their count is whatever the attention call has beyond the grid).
Wan's structure, for a class no adapter names: a ``blocks`` list whose every block has an ``attn1``
with such a processor, a 3-axis ``config.patch_size``, and a forward that needs only
``hidden_states``, ``timestep`` and ``encoder_hidden_states``; its self-attention must hold exactly
the grid's tokens (anything else runs the model's own attention, with a warning).
"""

from __future__ import annotations

import inspect

from .base import CallFacts, ModelAdapter, UncalibratedPreset, blocks
from .wan import wan_grid

_WAN_FORWARD = {"hidden_states", "timestep", "encoder_hidden_states"}


def has_wan_structure(transformer) -> bool:
    block_list = getattr(transformer, "blocks", None)
    patch = getattr(getattr(transformer, "config", None), "get", lambda *_: None)("patch_size")
    if not block_list or not isinstance(patch, (tuple, list)) or len(patch) != 3:
        return False
    for block in block_list:
        processor = getattr(getattr(block, "attn1", None), "processor", None)
        if processor is None or not hasattr(processor, "_attention_backend"):
            return False
    params = list(inspect.signature(type(transformer).forward).parameters.values())[1:]
    required = {p.name for p in params if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return required <= _WAN_FORWARD and _WAN_FORWARD <= {p.name for p in params}


class WanDerivedAdapter(UncalibratedPreset, ModelAdapter):
    family = "wan_derived"
    transformer_classes = ("SkyReelsV2Transformer3DModel", "ChronoEditTransformer3DModel")
    pipeline_attrs = ("transformer", "transformer_2")
    text_position = "none"
    attention_route = "dispatch"
    typical_steps = 50
    tokens_note = "video tokens only; classes with Wan's structure are accepted by structure"

    def matches(self, transformer):
        return super().matches(transformer) or has_wan_structure(transformer)

    def self_attention_modules(self, transformer):
        return blocks(transformer, (("blocks", "attn1"),))

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        return CallFacts(wan_grid(transformer, x), 0, x.shape[0], self.scalar_timestep(a.get("timestep")))


class HeliosAdapter(WanDerivedAdapter):
    family = "helios"
    transformer_classes = ("HeliosTransformer3DModel",)
    text_position = "prefix"
    tokens_note = "history latents (short/mid/long) before the video: dense extra tokens"

    def matches(self, transformer):
        return ModelAdapter.matches(self, transformer)

    def call_facts(self, transformer, args, kwargs):
        a = self.bind(transformer, args, kwargs)
        x = a["hidden_states"]
        return CallFacts(wan_grid(transformer, x), None, x.shape[0], self.scalar_timestep(a.get("timestep")))
