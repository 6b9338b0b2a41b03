"""The adapter registry: every family ditaccel knows, in the order ``find_adapter`` tries them
(class-name matches first; adapters that also match by structure come after every named class)."""

from __future__ import annotations

from .allegro import AllegroAdapter
from .base import ModelAdapter
from .cogvideox import CogVideoXAdapter
from .cogview import CogView3PlusAdapter, CogView4Adapter
from .consisid import ConsisIDAdapter
from .cosmos import CosmosAdapter
from .easyanimate import EasyAnimateAdapter
from .flux import ChromaAdapter, FluxAdapter
from .flux2 import Flux2Adapter
from .flux_like import FLUX_LIKE_ADAPTERS
from .hidream import HiDreamAdapter
from .hunyuan_framepack import HunyuanFramepackAdapter
from .hunyuan_image import HunyuanImageAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .hunyuan_video15 import HunyuanVideo15Adapter
from .kandinsky5 import Kandinsky5Adapter
from .ltx import LTXVideoAdapter
from .ltx2 import LTX2Adapter
from .lumina2 import Lumina2Adapter
from .mochi import MochiAdapter
from .qwen_image import QwenImageAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter
from .z_image import ZImageAdapter
from .wan_derived import HeliosAdapter, WanDerivedAdapter

FAMILY_ADAPTERS: tuple[ModelAdapter, ...] = (
    WanAdapter(), HunyuanVideoAdapter(), CogVideoXAdapter(), FluxAdapter(),
    ChromaAdapter(), HeliosAdapter(), HunyuanVideo15Adapter(), HunyuanFramepackAdapter(), ConsisIDAdapter(),
    CogView3PlusAdapter(), CogView4Adapter(), Flux2Adapter(), SD3Adapter(), QwenImageAdapter(), HunyuanImageAdapter(),
    LTXVideoAdapter(), LTX2Adapter(), MochiAdapter(), CosmosAdapter(), AllegroAdapter(), EasyAnimateAdapter(),
    Kandinsky5Adapter(), Lumina2Adapter(), ZImageAdapter(), HiDreamAdapter(), *(adapter() for adapter in FLUX_LIKE_ADAPTERS),
    WanDerivedAdapter(),  # last: it also accepts unknown classes with Wan's structure
)
