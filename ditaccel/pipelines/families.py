"""The adapter registry: every family ditaccel knows, in the order ``find_adapter`` tries them
(class-name matches first; adapters that also match by structure come after every named class)."""

from __future__ import annotations

from .base import ModelAdapter
from .cogvideox import CogVideoXAdapter
from .flux import ChromaAdapter, FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .wan import WanAdapter
from .wan_derived import HeliosAdapter, WanDerivedAdapter

FAMILY_ADAPTERS: tuple[ModelAdapter, ...] = (
    WanAdapter(), HunyuanVideoAdapter(), CogVideoXAdapter(), FluxAdapter(),
    ChromaAdapter(), HeliosAdapter(),
    WanDerivedAdapter(),  # last: it also accepts unknown classes with Wan's structure
)
