"""Tiny, seeded, random-weight diffusers pipelines for tests (CPU, float32, no downloads).

Every builder returns a stock diffusers pipeline whose components are built from configs with
seeded random weights; text encoders and tokenizers are ``None`` because ``call_kwargs`` passes
precomputed (random, seeded) prompt embeddings, which every pipeline here accepts without touching
a text encoder. Each transformer has 2 heads of dim 16 and 2 blocks of every block type (the
HunyuanVideo token refiner: 1), and after init its queries and attention output projections are
scaled up (``_sharpen_attention``), so self-attention is peaked and a sizeable part of the result,
not the near-uniform, near-negligible average that default random init gives. VAEs keep the real compression ratios
(8x spatial, 4x temporal), so the size rules below are those of the full-size models.

Valid sizes (``height``, ``width`` in pixels; latent ``F = (num_frames - 1) // 4 + 1``):

* ``wan`` / ``wan22`` (WanPipeline, patch (1, 2, 2)): height, width multiples of 16 (the pipeline
  raises otherwise); num_frames = 4k + 1 (others are rounded down to 4k + 1 with a warning).
  Token grid (T, H, W) = (F, height / 16, width / 16).
* ``hunyuan_video`` (HunyuanVideoPipeline, patch 2, patch_t 1): height, width multiples of 16
  (raises otherwise); num_frames = 4k + 1 (others are floored by the latent formula).
  Token grid = (F, height / 16, width / 16). Text: 8 tokens, trailing padding masked.
* ``cogvideox`` (CogVideoXPipeline, CogVideoX 1.0 with RoPE, patch 2, no temporal patch):
  height, width multiples of 16 (the pipeline only checks 8, but the latent must split into 2x2
  patches); num_frames = 4k + 1. Token grid = (F, height / 16, width / 16).
* ``flux`` (FluxPipeline, 2x2 packing): height, width multiples of 16 (others are rounded down
  with a warning); num_frames must be None or 1. Token grid = (1, height / 16, width / 16).

Defaults give video grids (3, 4, 5) and a Flux grid (1, 6, 10): H != W on purpose, so a swapped
axis cannot pass unnoticed. ``SECOND_SIZE`` is a second resolution per family and ``ODD_GRID`` a
size with an all-odd grid plus the window kernel that exactly covers it. ``SPARSE_SIZE`` is a
larger grid on which block-sparse patterns (64-token blocks, (1, 8, 8) tiles) can leave blocks out;
the default grids fit in a single 64-token block. ``token_grid`` computes the grid for any size.
"""

from __future__ import annotations

import contextlib

import torch

VIDEO_FAMILIES = ("wan", "wan22", "hunyuan_video", "cogvideox")

# Default sizes: (height, width, num_frames) -> token grid noted alongside.
DEFAULT_SIZE = {
    "wan": dict(height=64, width=80, num_frames=9),  # grid (3, 4, 5)
    "wan22": dict(height=64, width=80, num_frames=9),  # grid (3, 4, 5)
    "hunyuan_video": dict(height=64, width=80, num_frames=9),  # grid (3, 4, 5)
    "cogvideox": dict(height=64, width=80, num_frames=9),  # grid (3, 4, 5)
    "flux": dict(height=96, width=160, num_frames=None),  # grid (1, 6, 10)
}

# A second resolution per family (a different token count and aspect).
SECOND_SIZE = {
    "wan": dict(height=96, width=64, num_frames=5),  # grid (2, 6, 4)
    "wan22": dict(height=96, width=64, num_frames=5),  # grid (2, 6, 4)
    "hunyuan_video": dict(height=96, width=64, num_frames=5),  # grid (2, 6, 4)
    "cogvideox": dict(height=96, width=64, num_frames=5),  # grid (2, 6, 4)
    "flux": dict(height=128, width=96),  # grid (1, 8, 6)
}

# A size whose token grid is odd on every axis, and the window kernel equal to that grid.
ODD_GRID = {
    fam: {"size": dict(height=80, width=112, num_frames=9), "grid": (3, 5, 7), "kernel": (3, 5, 7)}
    for fam in VIDEO_FAMILIES
}
ODD_GRID["flux"] = {"size": dict(height=80, width=112), "grid": (1, 5, 7), "kernel": (1, 5, 7)}

# Larger grids for block-sparse tests: 64-token kernel blocks hold a whole default grid (60 video
# tokens), so at block granularity nothing can be left out there. These give >= 2 tiles of
# (1, 8, 8) per frame (video) or 2 x 3 tiles (Flux), grid multiples of the tile; VAE decoding at
# these sizes costs ~0.2-0.6 s per call, so use output_type="latent" with them.
SPARSE_SIZE = {fam: dict(height=128, width=256, num_frames=9) for fam in VIDEO_FAMILIES}  # grid (3, 8, 16)
SPARSE_SIZE["flux"] = dict(height=256, width=384)  # grid (1, 16, 24)

TEXT_LEN = 8  # text tokens per prompt (all families)

_WAN22_BOUNDARY_RATIO = 0.875  # as Wan2.2-T2V-A14B; with flow_shift 12 and 3 steps: t = 999, 960 | 857


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch's global CPU RNG for module construction without leaking the change."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


_Q_GAIN = 4.0  # query scale: default-init q/k give near-uniform attention (normalised entropy ~0.9)
_OUT_GAIN = 3.0  # attention output projection scale: make attention a sizeable part of each block


@torch.no_grad()
def _sharpen_attention(transformer: torch.nn.Module) -> None:
    """Scale every attention's queries by _Q_GAIN (through the q-norm's affine weight when there is
    one, else ``to_q``) and its output projection by _OUT_GAIN. Deterministic, applied after init.
    Result: attention is peaked (normalised entropy ~0.4-0.6 rather than ~0.9) and matters
    (zeroing the self-attention outputs moves the final latents by ~10-20%, not ~3%)."""
    for module in transformer.modules():
        if not (hasattr(module, "to_q") and hasattr(module, "to_k")):
            continue
        norm_q = getattr(module, "norm_q", None)
        if norm_q is not None and getattr(norm_q, "weight", None) is not None:
            norm_q.weight.mul_(_Q_GAIN)
        else:
            module.to_q.weight.mul_(_Q_GAIN)
            if module.to_q.bias is not None:
                module.to_q.bias.mul_(_Q_GAIN)
        to_out = getattr(module, "to_out", None)
        if to_out is not None:
            to_out[0].weight.mul_(_OUT_GAIN)


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    for name in ("transformer", "transformer_2", "vae"):
        module = getattr(pipe, name, None)
        if module is None:
            continue
        if name != "vae":
            _sharpen_attention(module)
        module.eval().requires_grad_(False)
    return pipe


# --------------------------------------------------------------------------------------------
# builders
# --------------------------------------------------------------------------------------------
def _wan_transformer(seed: int, in_channels: int = 4):
    from diffusers import WanTransformer3DModel

    with _seeded(seed):
        return WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=in_channels,
            out_channels=4,
            text_dim=32,
            freq_dim=32,
            ffn_dim=64,
            num_layers=2,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=64,
        )


def build_wan(seed: int = 0, wan22: bool = False, *, expand_timesteps: bool = False):
    """WanPipeline. wan22=True: Wan 2.2 A14B-style two-expert pipeline (``transformer`` for
    t >= 875, ``transformer_2`` below, UniPC flow_shift 12), so 3 or 4 steps run both experts
    (3 steps: t = 999, 960 on ``transformer``, 857 on ``transformer_2``).
    expand_timesteps=True: Wan 2.2 TI2V-style per-token timesteps ([B, S] ``timestep``)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline

    transformer = _wan_transformer(seed)
    transformer_2 = _wan_transformer(seed + 1) if wan22 else None
    with _seeded(seed + 2):
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=4,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 4,
            latents_std=[1.0] * 4,
        )
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=12.0 if wan22 else 3.0,
        num_train_timesteps=1000,
    )
    pipe = WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=transformer_2,
        boundary_ratio=_WAN22_BOUNDARY_RATIO if wan22 else None,
        expand_timesteps=expand_timesteps,
    )
    return _finish(pipe)


def build_wan22(seed: int = 0):
    return build_wan(seed, wan22=True)


def build_hunyuan_video(seed: int = 0):
    """HunyuanVideoPipeline: 2 double-stream + 2 single-stream blocks, 1 token-refiner block."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    with _seeded(seed):
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=32,
            pooled_projection_dim=16,
            rope_axes_dim=(4, 6, 6),
        )
    with _seeded(seed + 2):
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=2,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=7.0)
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    return _finish(pipe)


def build_cogvideox(seed: int = 0):
    """CogVideoXPipeline: CogVideoX 1.0 (5B-style: 3-D RoPE, no temporal patch), 2 blocks."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    d = DEFAULT_SIZE["cogvideox"]
    with _seeded(seed):
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=32,
            num_layers=2,
            sample_width=d["width"] // 8,
            sample_height=d["height"] // 8,
            sample_frames=d["num_frames"],
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=TEXT_LEN,
            use_rotary_positional_embeddings=True,
        )
    with _seeded(seed + 2):
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            sample_height=d["height"],
            sample_width=d["width"],
        )
    scheduler = CogVideoXDDIMScheduler(
        beta_schedule="scaled_linear",
        clip_sample=False,
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        set_alpha_to_one=True,
        snr_shift_scale=1.0,
        timestep_spacing="trailing",
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    return _finish(pipe)


def build_flux(seed: int = 0):
    """FluxPipeline (FLUX.1-dev-style: guidance embedding), 2 double + 2 single blocks."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels x 2x2 packing
            num_layers=2,
            num_single_layers=2,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=16,
            guidance_embeds=True,
            axes_dims_rope=(4, 6, 6),
        )
    with _seeded(seed + 2):
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(4, 4, 4, 4),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=2,
            sample_size=32,
            use_quant_conv=False,
            use_post_quant_conv=False,
            shift_factor=0.0609,
            scaling_factor=1.5035,
        )
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        transformer=transformer,
    )
    return _finish(pipe)


FAMILIES = {
    "wan": build_wan,
    "wan22": build_wan22,
    "hunyuan_video": build_hunyuan_video,
    "cogvideox": build_cogvideox,
    "flux": build_flux,
}


# --------------------------------------------------------------------------------------------
# call arguments
# --------------------------------------------------------------------------------------------
def _valid_lengths(batch_size: int, negative: bool) -> list[int]:
    """Unpadded text lengths per sample: differ across the batch and between cond / uncond."""
    base = [3, 5, 6, 4] if negative else [5, 7, 4, 6]
    return [base[i % len(base)] for i in range(batch_size)]


def _text(gen, batch_size, dim, device, dtype):
    return torch.randn(batch_size, TEXT_LEN, dim, generator=gen).to(device=device, dtype=dtype)


def _mask(batch_size, negative, device, dtype):
    lengths = torch.tensor(_valid_lengths(batch_size, negative))
    mask = torch.arange(TEXT_LEN)[None, :] < lengths[:, None]  # ones then zeros (HunyuanVideo requires it)
    return mask.to(device=device, dtype=dtype)


def call_kwargs(
    family: str,
    pipe,
    *,
    height: int | None = None,
    width: int | None = None,
    num_frames: int | None = None,
    batch_size: int = 1,
    cfg: bool = True,
    steps: int = 3,
    seed: int = 0,
    output_type: str = "np",
    **overrides,
) -> dict:
    """Keyword arguments for ``pipe(**kwargs)``: seeded latents generator, seeded random prompt
    embeddings of ``TEXT_LEN`` tokens (negative ones when ``cfg``), sizes (family defaults when
    None) and guidance so that ``cfg=True`` really runs classifier-free guidance:

    * wan / wan22: guidance_scale 5 (> 1) -> separate "cond" and "uncond" transformer calls;
      prompt embeds zero-padded after a few tokens, as WanPipeline pads T5 output (no mask).
    * hunyuan_video: true_cfg_scale 6 with negative prompt/pooled/mask -> separate calls;
      guidance_scale 6 is the distilled guidance embedding, always on. prompt_attention_mask is
      [B, TEXT_LEN] float 1/0, ones first, trailing padding (lengths differ per sample).
    * cogvideox: guidance_scale 6 -> one batched call with [uncond; cond] (batch 2B).
    * flux: true_cfg_scale 4 with negative prompt/pooled embeds -> separate calls; guidance_scale
      3.5 is the distilled guidance embedding, always on.

    ``overrides`` are merged last (e.g. ``latents=...``, ``guidance_scale=...``).
    The dict holds a freshly seeded ``generator`` that a pipeline call consumes: build a new dict
    for every call (reusing one gives different noise the second time).
    """
    if family not in FAMILIES:
        raise KeyError(f"unknown family {family!r}; one of {sorted(FAMILIES)}")
    size = DEFAULT_SIZE[family]
    height = size["height"] if height is None else height
    width = size["width"] if width is None else width
    transformer = pipe.transformer if pipe.transformer is not None else pipe.transformer_2
    device = pipe._execution_device
    dtype = transformer.dtype
    gen = torch.Generator().manual_seed(10_000 + seed)  # text; latents use their own generator

    kw = dict(
        height=height,
        width=width,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    )
    if family == "flux":
        if num_frames not in (None, 1):
            raise ValueError(f"flux makes images: num_frames must be None or 1, not {num_frames}")
    else:
        kw["num_frames"] = size["num_frames"] if num_frames is None else num_frames

    if family in ("wan", "wan22"):
        dim = transformer.config.text_dim
        pos = _text(gen, batch_size, dim, device, dtype)
        neg = _text(gen, batch_size, dim, device, dtype)
        # WanPipeline zero-pads T5 embeddings past each prompt's length; emulate that.
        pos = pos * _mask(batch_size, False, device, dtype)[..., None]
        neg = neg * _mask(batch_size, True, device, dtype)[..., None]
        kw["prompt_embeds"] = pos
        kw["guidance_scale"] = 5.0 if cfg else 1.0
        if cfg:
            kw["negative_prompt_embeds"] = neg
    elif family == "hunyuan_video":
        cfg_t = transformer.config
        kw["prompt_embeds"] = _text(gen, batch_size, cfg_t.text_embed_dim, device, dtype)
        kw["pooled_prompt_embeds"] = torch.randn(batch_size, cfg_t.pooled_projection_dim, generator=gen).to(
            device=device, dtype=dtype
        )
        kw["prompt_attention_mask"] = _mask(batch_size, False, device, dtype)
        neg = _text(gen, batch_size, cfg_t.text_embed_dim, device, dtype)
        neg_pooled = torch.randn(batch_size, cfg_t.pooled_projection_dim, generator=gen).to(device=device, dtype=dtype)
        kw["guidance_scale"] = 6.0
        kw["true_cfg_scale"] = 6.0 if cfg else 1.0
        if cfg:
            kw["negative_prompt_embeds"] = neg
            kw["negative_pooled_prompt_embeds"] = neg_pooled
            kw["negative_prompt_attention_mask"] = _mask(batch_size, True, device, dtype)
    elif family == "cogvideox":
        dim = transformer.config.text_embed_dim
        kw["prompt_embeds"] = _text(gen, batch_size, dim, device, dtype)
        neg = _text(gen, batch_size, dim, device, dtype)
        kw["guidance_scale"] = 6.0 if cfg else 1.0
        if cfg:
            kw["negative_prompt_embeds"] = neg
    elif family == "flux":
        cfg_t = transformer.config
        kw["prompt_embeds"] = _text(gen, batch_size, cfg_t.joint_attention_dim, device, dtype)
        kw["pooled_prompt_embeds"] = torch.randn(batch_size, cfg_t.pooled_projection_dim, generator=gen).to(
            device=device, dtype=dtype
        )
        neg = _text(gen, batch_size, cfg_t.joint_attention_dim, device, dtype)
        neg_pooled = torch.randn(batch_size, cfg_t.pooled_projection_dim, generator=gen).to(device=device, dtype=dtype)
        kw["guidance_scale"] = 3.5
        kw["true_cfg_scale"] = 4.0 if cfg else 1.0
        if cfg:
            kw["negative_prompt_embeds"] = neg
            kw["negative_pooled_prompt_embeds"] = neg_pooled
    kw.update(overrides)
    return kw


def token_grid(family: str, height: int | None = None, width: int | None = None, num_frames: int | None = None):
    """(T, H, W) token grid that ``call_kwargs`` sizes give for a family's tiny pipeline."""
    size = DEFAULT_SIZE[family]
    height = size["height"] if height is None else height
    width = size["width"] if width is None else width
    if family == "flux":
        return (1, height // 16, width // 16)
    num_frames = size["num_frames"] if num_frames is None else num_frames
    return ((num_frames - 1) // 4 + 1, height // 16, width // 16)


# --- shared by the test files (one build per family per session) ---------------------------------

_SHARED: dict = {}


def pipe_for(family: str):
    """The tiny pipeline of ``family``, built once per test session and shared by every test file;
    every test leaves it unwrapped (``remove()`` is bit-exact, tested)."""
    if family not in _SHARED:
        _SHARED[family] = FAMILIES[family](seed=0)
    return _SHARED[family]


def run_latents(pipe, family: str, sparse_size: bool = False, **kw) -> torch.Tensor:
    """Final latents of one call (decoded frames would shrink differences); ``sparse_size``: a grid of
    several blocks."""
    kw.setdefault("output_type", "latent")
    if sparse_size:
        kw = {**SPARSE_SIZE[family], **kw}
    out = pipe(**call_kwargs(family, pipe, **kw))
    return torch.as_tensor(out.images if hasattr(out, "images") else out.frames)

