"""Attention methods, one file each; the registry maps a method name to (config, method) classes."""

from __future__ import annotations

from ..config import AttentionConfig
from .base import AttentionMethod, CallShape
from .cluster import ClusterConfig, ClusterMethod
from .dense import DenseConfig, DenseMethod
from .heads import HeadsConfig, HeadsMethod
from .radial import RadialConfig, RadialMethod
from .tile import TileConfig, TileMethod
from .topk import TopKConfig, TopKMethod
from .window import WindowConfig, WindowMethod
from .xattn import XAttnConfig, XAttnMethod

REGISTRY: dict[str, tuple[type[AttentionConfig], type[AttentionMethod]]] = {
    "dense": (DenseConfig, DenseMethod),
    "window": (WindowConfig, WindowMethod),
    "tile": (TileConfig, TileMethod),
    "radial": (RadialConfig, RadialMethod),
    "heads": (HeadsConfig, HeadsMethod),
    "cluster": (ClusterConfig, ClusterMethod),
    "topk": (TopKConfig, TopKMethod),
    "xattn": (XAttnConfig, XAttnMethod),
}
METHODS = tuple(REGISTRY)


def config_class(name) -> type[AttentionConfig]:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"method must be one of {list(METHODS)} or a config instance, got {name!r}")
    return REGISTRY[name][0]


def make_method(config: AttentionConfig) -> AttentionMethod:
    for cfg_cls, method_cls in REGISTRY.values():
        if type(config) is cfg_cls:
            return method_cls(config)
    raise ValueError(f"no method for config type {type(config).__name__}; known: {list(METHODS)}")


__all__ = [
    "AttentionMethod", "CallShape", "DenseConfig", "WindowConfig", "TileConfig", "RadialConfig", "TopKConfig",
    "XAttnConfig", "HeadsConfig", "ClusterConfig",
    "METHODS", "REGISTRY", "config_class", "make_method",
]
