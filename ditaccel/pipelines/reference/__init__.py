"""The reference pipeline: a small Wan-architecture ``WanPipeline`` trained here on moving shapes.

:mod:`.data` draws the captioned clips, :mod:`.model` builds the architecture, :mod:`.train` trains
it (``python -m ditaccel.pipelines.reference.train``), :mod:`.analysis` checks generated clips
against their captions and measures attention locality. The trained weights ship in ``weights/``
(``save_pretrained`` layout, safetensors); :func:`load` returns them.
"""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS_DIR = Path(__file__).with_name("weights")


def is_available() -> bool:
    return (WEIGHTS_DIR / "model_index.json").is_file()


def load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, path=None):
    """The trained reference ``WanPipeline`` on ``device`` in ``dtype``, offline."""
    from diffusers import WanPipeline

    from ..loading import from_pretrained

    path = Path(path) if path is not None else WEIGHTS_DIR
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"no trained reference pipeline under {path} (model_index.json missing); "
                                "train one with `python -m ditaccel.pipelines.reference.train`")
    pipe = from_pretrained(WanPipeline, path, dtype, local_files_only=True, use_safetensors=True)
    return pipe.to(device)


__all__ = ["WEIGHTS_DIR", "is_available", "load"]
