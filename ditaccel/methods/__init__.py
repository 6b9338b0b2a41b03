"""Attention methods, one file each; the registry maps a method name to (config, method) classes.

``register_method(name, config_cls, method_cls)`` adds a method from outside the package: after it,
``ditaccel.accelerate(pipe, name, **knobs)`` runs it like a built-in one."""

from __future__ import annotations

from ..config import AttentionConfig
from .base import AttentionMethod, CallShape
from .cluster import ClusterConfig, ClusterMethod
from .dense import DenseConfig, DenseMethod
from .heads import HeadsConfig, HeadsMethod
from .radial import RadialConfig, RadialMethod
from .scheduled import ScheduledMethod
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
BUILTIN_METHODS = tuple(REGISTRY)
METHODS = BUILTIN_METHODS  # the built-in methods; ``method_names()`` adds registered ones

# ``table`` composes the methods above per (layer, head, step range): a name ``accelerate`` takes,
# kept out of METHODS (the single methods the bench, the demo and the fuzz tests iterate).
from .table import TableMethod  # noqa: E402
from .table_config import TableConfig, TableRule  # noqa: E402

COMPOSED_METHODS = ("table",)
REGISTRY["table"] = (TableConfig, TableMethod)


def method_names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def register_method(name: str, config_cls: type[AttentionConfig], method_cls: type[AttentionMethod], *,
                    replace: bool = False) -> None:
    """Make ``name`` a method ``accelerate`` accepts: ``config_cls`` a frozen dataclass subclass of
    ``AttentionConfig`` (its fields are the knobs, declared with ``ditaccel.config.knob``) whose
    ``method`` class attribute is ``name``; ``method_cls`` a subclass of ``AttentionMethod`` built
    from a config (define ``video_predicate`` for a static pattern, or ``plan_for``). Built-in
    names cannot be replaced; a registered one only with ``replace=True``."""
    import dataclasses

    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"register_method: name must be an identifier string, got {name!r}")
    if name in BUILTIN_METHODS or name in COMPOSED_METHODS:
        raise ValueError(f"register_method: {name!r} is a built-in method ({list(BUILTIN_METHODS)})")
    if name in REGISTRY and not replace:
        raise ValueError(f"register_method: {name!r} is already registered (pass replace=True)")
    if not (isinstance(config_cls, type) and issubclass(config_cls, AttentionConfig)
            and dataclasses.is_dataclass(config_cls)):
        raise ValueError(f"register_method: config_cls must be a dataclass subclass of AttentionConfig, "
                         f"got {config_cls!r}")
    if getattr(config_cls, "method", None) != name:
        raise ValueError(f"register_method: {config_cls.__name__}.method must be {name!r}, "
                         f"got {getattr(config_cls, 'method', None)!r}")
    if any(cfg is config_cls for n, (cfg, _) in REGISTRY.items() if n != name):
        raise ValueError(f"register_method: {config_cls.__name__} already belongs to another method")
    if not (isinstance(method_cls, type) and issubclass(method_cls, AttentionMethod)):
        raise ValueError(f"register_method: method_cls must be a subclass of AttentionMethod, got {method_cls!r}")
    config_cls()  # its defaults must validate, or the method could never be asked for by name
    REGISTRY[name] = (config_cls, method_cls)


def unregister_method(name: str) -> None:
    """Remove a method added with ``register_method`` (built-ins stay)."""
    if name in BUILTIN_METHODS or name in COMPOSED_METHODS or name not in REGISTRY:
        raise ValueError(f"unregister_method: {name!r} is not a registered external method")
    del REGISTRY[name]


def config_class(name) -> type[AttentionConfig]:
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"method must be one of {list(REGISTRY)} or a config instance, got {name!r}")
    return REGISTRY[name][0]


def make_method(config: AttentionConfig) -> AttentionMethod:
    for cfg_cls, method_cls in REGISTRY.values():
        if type(config) is cfg_cls:
            if config.schedule:
                return ScheduledMethod(config, method_cls)
            return method_cls(config)
    raise ValueError(f"no method for config type {type(config).__name__}; known: {list(REGISTRY)}")


__all__ = [
    "AttentionMethod", "CallShape", "DenseConfig", "WindowConfig", "TileConfig", "RadialConfig", "TopKConfig",
    "XAttnConfig", "HeadsConfig", "ClusterConfig", "TableConfig", "TableRule", "COMPOSED_METHODS",
    "METHODS", "REGISTRY", "config_class", "make_method", "register_method", "unregister_method", "method_names",
]
