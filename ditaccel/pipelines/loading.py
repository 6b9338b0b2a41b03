"""``from_pretrained`` the way every ditaccel command loads a checkpoint: quiet, dtype-aware."""

from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def quiet_progress_bars():
    """Hide diffusers' and transformers' loading bars for the block, then restore their setting:
    a loading bar on stderr would bury a command's one-line messages."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    saved = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    for module, _ in saved:
        module.disable_progress_bar()
    try:
        yield
    finally:
        for module, enabled in saved:
            if enabled:
                module.enable_progress_bar()


def dtype_kwargs(dtype: torch.dtype | None) -> dict:
    """The dtype argument of ``from_pretrained``: ``dtype`` from diffusers 0.42 on (which deprecates
    ``torch_dtype``), ``torch_dtype`` before."""
    import diffusers
    from packaging.version import Version

    if dtype is None:
        return {}
    return {"dtype": dtype} if Version(diffusers.__version__).release >= (0, 42) else {"torch_dtype": dtype}


def from_pretrained(cls, path, dtype: torch.dtype | None = None, **kwargs):
    """``cls.from_pretrained(path, ...)`` with the dtype argument this diffusers understands, quietly."""
    with quiet_progress_bars():
        return cls.from_pretrained(path, **dtype_kwargs(dtype), **kwargs)
