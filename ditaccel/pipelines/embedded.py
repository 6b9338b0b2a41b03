"""The embedded default pipeline: the trained reference ``WanPipeline`` shipped in the package.

Every ``ditaccel`` command runs on it when no ``--model`` is given: no download, a CPU is enough.
:func:`load` returns the trained weights under ``ditaccel/pipelines/reference/weights/``
(``save_pretrained`` layout, trained by ``python -m ditaccel.pipelines.reference.train`` on
procedural moving-shape videos, see :mod:`.reference`); when they are missing (a checkout without
them) it builds the same architecture with seeded random weights instead, so :func:`load` stays the
one entry point either way. The architecture (:mod:`.reference.model`):

- ``transformer``: ``WanTransformer3DModel``, 4 layers, 4 heads x 32 dims (width 128), patch (1, 1, 1);
- ``vae``: ``AutoencoderKLWan`` with Wan 2.1's layout (8x spatial, 4x temporal compression, 16
  latent channels) at base width 16;
- ``text_encoder``: a 2-layer ``UMT5EncoderModel`` of width 64 (frozen random, see the model module);
- ``tokenizer``: word-level over the captions' vocabulary (:data:`VOCAB`), ``[PAD]`` 0, ``</s>`` 1,
  ``[UNK]`` 2 as in T5;
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with ``shift=3``.

Token count at :data:`DEFAULTS` (144 x 192 px, 17 frames): latents are (17 - 1) / 4 + 1 = 5 frames
of 144 / 8 x 192 / 8 = 18 x 24, and patch (1, 1, 1) keeps them, so self-attention runs over
T x H x W = 5 x 18 x 24 = **2160 video tokens** (no text tokens: Wan brings text in through
cross-attention). H != W on purpose: a transposed axis shows up.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..methods import XAttnConfig
from .reference import WEIGHTS_DIR as REFERENCE_DIR
from .reference import model as _model

SEED = 0

DEFAULTS = dict(height=144, width=192, num_frames=17, num_inference_steps=20, guidance_scale=5.0,
                max_sequence_length=_model.MAX_SEQUENCE_LENGTH)
"""Call arguments for the embedded pipeline (``pipe(prompt, **DEFAULTS)``): the size it was trained
at. Captions are at most 12 tokens, so 16 text tokens (Wan's default is 512) keep text encoding and
cross-attention small."""

DEFAULT_PROMPT = "a red square moving left on a gray striped background"

CALIBRATION_PROMPTS = (
    "a blue circle moving right on a navy checkered background",
    "a yellow triangle moving up on a brown cloudy background",
    "a green diamond moving down on a teal gradient background",
)
"""The prompts ``ditaccel calibrate`` profiles and tunes on by default (none is a held-out prompt)."""

HELDOUT_PROMPTS = (
    DEFAULT_PROMPT,
    "a magenta circle moving down on a brown striped background",
    "a cyan square moving up on a navy gradient background",
    "a yellow diamond moving left on a teal checkered background",
)
"""Prompts the calibrated preset is checked on, never calibrated on (the README's main job's is first)."""
DEFAULT_NEGATIVE_PROMPT = ""

HAND_PRESET = XAttnConfig(block_size=64, threshold=0.95, dense_steps=2)
"""The hand-picked preset this pipeline had before calibration (``benchmarks/preset_sweep.py``)."""

PRESET_FILE = REFERENCE_DIR.parent / "presets" / "embedded.json"
"""The calibrated preset, written by ``ditaccel calibrate`` on :data:`CALIBRATION_PROMPTS` at :data:`DEFAULTS`."""


def _calibrated_preset():
    from ..calibration.preset import read_preset, table_config

    return table_config(read_preset(PRESET_FILE), f"preset {PRESET_FILE.name}")


PRESET = _calibrated_preset()
"""What ``accelerate(pipe)`` runs on this pipeline when no method is given: the table ``ditaccel
calibrate`` chose for it (:data:`PRESET_FILE`; ``benchmarks/RESULTS.md``, "Calibrated preset"). On
two CPU cores every sparse candidate costs more per call than dense attention at 2,160 tokens, so
the calibrated table is output shares at whole steps plus cfg shares; the Wan family preset's
3 x 3 x 3 tile window would cover the whole 5 x 18 x 24 grid here and stay dense."""


SPECIAL_TOKENS = _model.SPECIAL_TOKENS
VOCAB = _model.vocabulary()
TRANSFORMER_CONFIG = _model.TRANSFORMER_CONFIG
VAE_CONFIG = _model.VAE_CONFIG
TEXT_ENCODER_CONFIG = _model.TEXT_ENCODER_CONFIG
SCHEDULER_CONFIG = _model.SCHEDULER_CONFIG
build_tokenizer = _model.build_tokenizer


def build(seed: int = SEED):
    """The embedded architecture with seeded random weights (float32, CPU), global RNG untouched."""
    return _model.build(seed)


def is_embedded_transformer(module) -> bool:
    """True for a ``WanTransformer3DModel`` of the embedded architecture (trained or not)."""
    if type(module).__name__ != "WanTransformer3DModel":
        return False
    config = module.config
    return all(_same(config.get(k), v) for k, v in TRANSFORMER_CONFIG.items())


def _same(a, b) -> bool:
    return tuple(a) == tuple(b) if isinstance(b, (list, tuple)) and isinstance(a, (list, tuple)) else a == b


def is_trained() -> bool:
    """True when the trained reference weights are shipped (and :func:`load` returns them)."""
    return (REFERENCE_DIR / "model_index.json").is_file()


def load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The embedded default pipeline on ``device`` in ``dtype`` (the one entry point).

    Loads the trained reference under ``ditaccel/pipelines/reference/weights/`` when it is shipped,
    else builds the seeded random-weight pipeline. Casting follows ``from_pretrained(torch_dtype=...)``:
    in float16 the modules a model keeps in float32 (``_keep_in_fp32_modules``) stay float32.
    """
    if is_trained():
        from . import reference

        return reference.load(device=device, dtype=dtype)
    pipe = build()
    for name in ("transformer", "vae", "text_encoder"):
        cast_model(getattr(pipe, name), dtype)
    return pipe.to(device)


def cast_model(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast floating parameters and buffers to ``dtype`` in place, as ``from_pretrained`` would."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else set()
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_floating_point():
            target = torch.float32 if keep & set(name.split(".")) else dtype
            if tensor.dtype != target:
                tensor.data = tensor.data.to(target)
    return model


def save(path: str | os.PathLike, pipe=None) -> Path:
    """Save ``pipe`` (default: a freshly built embedded pipeline) with ``save_pretrained``.

    The directory loads offline with ``WanPipeline.from_pretrained(path)`` and with ``--model path``.
    """
    pipe = pipe if pipe is not None else build()
    path = Path(path)
    pipe.save_pretrained(path, safe_serialization=True)
    return path


__all__ = ["DEFAULTS", "DEFAULT_PROMPT", "VOCAB", "build", "build_tokenizer", "cast_model", "is_trained", "load",
           "save"]
