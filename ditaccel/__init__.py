"""ditaccel: sparse, windowed and cached attention for diffusers DiT pipelines, measured against dense.

    handle = ditaccel.accelerate(pipe)                 # the preset (the family's; the embedded pipeline has its own)
    handle = ditaccel.accelerate(pipe, "tile", window=(3, 3, 3), dense_steps=2)
    handle = ditaccel.accelerate(pipe, "topk", cdf=0.9, order="hilbert", refresh=5, dense_steps=10)
    handle.stats(); handle.remove()
"""

from . import metrics
from .accelerate import AccelerationHandle, accelerate
from .config import AttentionConfig
from .methods import (
    METHODS, ClusterConfig, DenseConfig, HeadsConfig, RadialConfig, TileConfig, TopKConfig, WindowConfig, XAttnConfig,
    register_method, unregister_method,
)
from .pipelines import SUPPORTED_FAMILIES

__version__ = "0.1.0"

__all__ = [
    "accelerate", "AccelerationHandle", "AttentionConfig", "DenseConfig", "WindowConfig", "TileConfig",
    "RadialConfig", "TopKConfig", "XAttnConfig", "HeadsConfig", "ClusterConfig", "METHODS", "register_method", "unregister_method", "metrics", "SUPPORTED_FAMILIES", "__version__",
]
