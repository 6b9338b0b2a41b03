"""ditaccel: sparse, windowed and cached attention for diffusers DiT pipelines, measured against dense.

    handle = ditaccel.accelerate(pipe)                 # the family's preset
    handle = ditaccel.accelerate(pipe, "tile", window=(3, 3, 3), dense_steps=2)
    handle.stats(); handle.remove()
"""

from . import metrics
from .accelerate import AccelerationHandle, accelerate
from .config import AttentionConfig
from .methods import METHODS, DenseConfig, RadialConfig, TileConfig, WindowConfig
from .pipelines import SUPPORTED_FAMILIES

__version__ = "0.1.0"

__all__ = [
    "accelerate", "AccelerationHandle", "AttentionConfig", "DenseConfig", "WindowConfig", "TileConfig",
    "RadialConfig", "METHODS", "metrics", "SUPPORTED_FAMILIES", "__version__",
]
