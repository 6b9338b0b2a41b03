"""Admission control of ``ditaccel demo``: size a request before any work and refuse what cannot run.

A request is checked, before the pipeline runs at all, against

- the prompt: text of at most :attr:`Limits.max_prompt_chars` characters that encodes as UTF-8
  (a lone surrogate, which JSON can carry, makes the tokenizers library raise a ``TypeError``);
- the size (before the frame count, so a huge request is told that first):

  - the work: latent tokens (``T x H x W`` of the latent grid, frames included) x steps, against
    :attr:`Limits.max_token_steps`;
  - the memory: an estimate from the latent grid and the pixel count (:func:`estimate_bytes`)
    against :attr:`Limits.max_memory_bytes`, by default a fraction of what the device has free now
    (CPU: the available RAM; CUDA: free memory plus what torch's allocator caches);
- the frame count: video pipelines whose VAE compresses time ``k`` x (``vae_scale_factor_temporal``,
  4 for Wan and HunyuanVideo) take ``k * n + 1`` frames; diffusers silently rounds anything else,
  so ``frames=2`` would quietly run 1 frame.

A refusal is a ``ValueError`` (the page shows it as "Invalid input: ...") that names the limit, the
request's figure and the ``ditaccel demo`` flag that raises the limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MEMORY_FRACTION = 0.8  # of the free memory a request may plan to use; the rest is headroom
DEFAULT_MAX_PROMPT_CHARS = 2000
DEFAULT_MAX_TOKEN_STEPS = {"cpu": 2_000_000, "cuda": 200_000_000}
# Peak RSS growth of one generation on the embedded pipeline (float32, CPU, 2 steps, warm-up, dense,
# accelerated preset, files; ru_maxrss around one DemoSession.generate): 144x192x17 (2160 tokens) 402 MB,
# 288x384x17 (8640) 1214 MB, 144x192x65 (7344) 1054 MB, 576x768x1 (6912) 698 MB. The terms below
# estimate 477, 1718, 1591 and 739 MB for those (tests/test_demo_robust.py keeps them above).
# For other models they are an extrapolation by model and VAE width; --max-memory-gb overrides.
ACTIVATIONS_PER_CHANNEL = 16  # live tensors of the model width per token (both CFG branches)
ACTIVATIONS_PER_FFN_CHANNEL = 4  # of the feed-forward width
FIXED_BYTES_PER_TOKEN = 48 * 1024  # width-independent float32 state per token (latents, RoPE, plans)
BYTES_PER_PIXEL_CHANNEL = 40  # per output pixel and VAE base channel: decode, float media, encoders
OVERHEAD_BYTES = 64 * 2**20


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; None: derived from the device when the request comes."""

    max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS
    max_token_steps: int | None = None
    max_memory_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in ("max_prompt_chars", "max_token_steps", "max_memory_bytes"):
            value = getattr(self, name)
            if value is None and name != "max_prompt_chars":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Limits.{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class Sizing:
    """What a request would cost: its latent grid, work and estimated peak memory."""

    grid: tuple[int, int, int]
    pixels: int
    steps: int
    memory_bytes: int

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def token_steps(self) -> int:
        return self.tokens * self.steps


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new request can still get on ``device``: CUDA free + cached by torch, else available RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional: read Linux's estimate directly
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the free memory of this machine")


def _ints(value, n: int) -> tuple[int, ...]:
    if isinstance(value, int):
        return (value,) * n
    values = tuple(int(v) for v in value)
    return values[-n:] if len(values) >= n else (1,) * (n - len(values)) + values


def _config(module) -> dict:
    return dict(getattr(module, "config", None) or {})


def latent_grid(pipe, height: int, width: int, frames: int | None) -> tuple[int, int, int]:
    """(T, H, W) tokens of ``pipe``'s transformer for an output of ``frames x height x width``.

    From the diffusers attributes every video/image pipeline sets (``vae_scale_factor_temporal``,
    ``vae_scale_factor_spatial`` or ``vae_scale_factor``) and the transformer's ``patch_size``
    (``patch_size_t``). Pipelines that pack latents themselves (Flux packs 2 x 2) get an upper bound.
    """
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", None) or 8
    temporal = getattr(pipe, "vae_scale_factor_temporal", None) or 1
    config = _config(getattr(pipe, "transformer", None))
    patch = config.get("patch_size") or 1
    if isinstance(patch, int):
        pt, ph, pw = int(config.get("patch_size_t") or 1), patch, patch
    else:
        pt, ph, pw = _ints(patch, 3)
    if frames and (frames - 1) % temporal:
        frames = frames // temporal * temporal + 1  # what diffusers rounds it to (with a warning)
    latent_frames = 1 if not frames else (frames - 1) // temporal + 1
    return (max(1, -(-latent_frames // pt)), max(1, height // (spatial * ph)), max(1, width // (spatial * pw)))


def _channels(module, keys: tuple[str, ...], default: int) -> int:
    config = _config(module)
    for key in keys:
        value = config.get(key)
        if isinstance(value, (list, tuple)) and value:
            return int(max(value))
        if isinstance(value, int) and value > 0:
            return value
    return default


def estimate_bytes(pipe, grid: tuple[int, int, int], pixels: int, dtype: torch.dtype) -> int:
    """A generous estimate of the peak memory one demo generation needs (see the figures above)."""
    transformer = getattr(pipe, "transformer", None)
    config = _config(transformer)
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    width = heads * head_dim if isinstance(heads, int) and isinstance(head_dim, int) else \
        _channels(transformer, ("inner_dim", "hidden_size", "d_model"), 3072)
    vae_width = _channels(getattr(pipe, "vae", None), ("base_dim", "block_out_channels"), 128)
    ffn = config.get("ffn_dim") if isinstance(config.get("ffn_dim"), int) else 4 * width
    element = torch.tensor([], dtype=dtype).element_size()
    token_bytes = element * (ACTIVATIONS_PER_CHANNEL * width + ACTIVATIONS_PER_FFN_CHANNEL * ffn) \
        + FIXED_BYTES_PER_TOKEN
    return OVERHEAD_BYTES + math.prod(grid) * token_bytes + pixels * BYTES_PER_PIXEL_CHANNEL * vae_width


def check_prompt(prompt: str, limits: Limits) -> None:
    if len(prompt) > limits.max_prompt_chars:
        raise ValueError(f"prompt is {len(prompt)} characters long; the limit is {limits.max_prompt_chars} "
                         f"(raise it with ditaccel demo --max-prompt-chars N)")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"prompt must be valid Unicode text; character {exc.start} is a lone surrogate "
                         f"{prompt[exc.start]!r}") from None


def check_frames(pipe, frames: int | None) -> None:
    temporal = getattr(pipe, "vae_scale_factor_temporal", None)
    if frames is None or not isinstance(temporal, int) or temporal <= 1 or (frames - 1) % temporal == 0:
        return
    below = (frames - 1) // temporal * temporal + 1
    raise ValueError(f"frames must be {temporal}k+1 for {type(pipe).__name__} (its VAE compresses time "
                     f"{temporal}x): 1, {1 + temporal}, {1 + 2 * temporal}, ...; got {frames} "
                     f"(nearest: {below} or {below + temporal})")


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GB"


def admit(pipe, request, limits: Limits, device: torch.device, dtype: torch.dtype) -> Sizing:
    """Check ``request`` (a ``GenerateRequest``) for ``pipe`` on ``device``; a ValueError refuses it."""
    check_prompt(request.prompt, limits)
    grid = latent_grid(pipe, request.height, request.width, request.frames)
    pixels = request.height * request.width * (request.frames or 1)
    sizing = Sizing(grid, pixels, request.steps, estimate_bytes(pipe, grid, pixels, dtype))
    size = f"{request.height}x{request.width}x{request.frames or 1}"
    max_work = limits.max_token_steps or DEFAULT_MAX_TOKEN_STEPS.get(device.type, DEFAULT_MAX_TOKEN_STEPS["cuda"])
    if sizing.token_steps > max_work:
        raise ValueError(f"request too large: {size} px is a latent grid of {grid[0]}x{grid[1]}x{grid[2]} = "
                         f"{sizing.tokens:,} tokens x {request.steps} steps = {sizing.token_steps:,} token-steps; "
                         f"the limit on {device.type} is {max_work:,} (raise it with ditaccel demo "
                         f"--max-token-steps N)")
    if limits.max_memory_bytes is not None:
        budget, where = limits.max_memory_bytes, "set with --max-memory-gb"
    else:
        budget = int(MEMORY_FRACTION * free_memory_bytes(device))
        where = f"{MEMORY_FRACTION:.0%} of the memory free on {device} now"
    if sizing.memory_bytes > budget:
        raise ValueError(f"request too large: {size} px ({sizing.tokens:,} latent tokens) needs about "
                         f"{_gb(sizing.memory_bytes)}; the limit is {_gb(budget)} ({where}; raise it with "
                         f"ditaccel demo --max-memory-gb GB)")
    check_frames(pipe, request.frames)  # after the size: a huge request hears first that it is too large
    return sizing


__all__ = ["Limits", "Sizing", "admit", "check_frames", "check_prompt", "estimate_bytes", "free_memory_bytes",
           "latent_grid"]
