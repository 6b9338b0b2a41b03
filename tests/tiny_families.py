"""Tiny random-weight bare transformers of every family ditaccel has an adapter for, with one
forward's inputs at an odd token grid and what that forward's self-attention sequence holds.

Each builder returns a :class:`Case`: the model (float32, eval, seeded), the forward's keyword
arguments (seeded), the token grid (T, H, W) the test expects, and ``segments``: the self-attention
sequence in the model's own order as ("video", n) / ("dense", n) runs, worked out here from the
model's documented layout, independently of the adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from tiny_pipelines import _seeded

HEADS, HEAD_DIM = 2, 16
WIDTH = HEADS * HEAD_DIM
TEXT_DIM = 32
TEXT = 6  # text tokens


@dataclass
class Case:
    model: torch.nn.Module
    kwargs: dict
    grid: tuple[int, int, int]
    segments: list  # [(kind, n), ...], or a list of such layouts when modules differ (told apart by length)
    output: Callable = field(default=lambda out: out[0] if isinstance(out, tuple) else out.sample)

    def run(self):
        with torch.no_grad():
            out = self.output(self.model(**self.kwargs))
        return out


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen)


Q_GAIN, OUT_GAIN = 4.0, 3.0  # as tiny_pipelines: peaked attention that matters (default init is near uniform)


@torch.no_grad()
def _sharpen_attention(model):
    for module in model.modules():
        to_q = getattr(module, "to_q", None)
        if not isinstance(to_q, torch.nn.Linear):
            continue
        norm_q = getattr(module, "norm_q", None)
        if getattr(norm_q, "weight", None) is not None:
            norm_q.weight.mul_(Q_GAIN)
        else:
            to_q.weight.mul_(Q_GAIN)
        to_out = getattr(module, "to_out", None)
        out = to_out[0] if isinstance(to_out, (torch.nn.ModuleList, torch.nn.Sequential)) else to_out
        if isinstance(out, torch.nn.Linear):
            out.weight.mul_(OUT_GAIN)


def _finish(model):
    _sharpen_attention(model)
    return model.eval().requires_grad_(False)


# --- brute-force token masks (independent of ditaccel) -----------------------------------------
def window_neighbours(i, n, k):
    start = min(max(i - k // 2, 0), n - k)
    return range(start, start + k)


def brute_force_mask(grid, segments, kernel):
    """[S, S] bool in the model's token order: within the ("video", n) run, query (t, h, w) keeps the
    keys inside the clamped ``kernel`` window around it (raster index (t * H + h) * W + w); every
    pair involving a ("dense", n) token is kept."""
    T, H, W = grid
    S = sum(n for _, n in segments)
    mask = torch.ones(S, S, dtype=torch.bool)
    offset = 0
    for kind, n in segments:
        if kind == "video":
            assert n == T * H * W
            video = torch.zeros(n, n, dtype=torch.bool)
            for t in range(T):
                for h in range(H):
                    for w in range(W):
                        keys = [(kt * H + kh) * W + kw for kt in window_neighbours(t, T, kernel[0])
                                for kh in window_neighbours(h, H, kernel[1]) for kw in window_neighbours(w, W, kernel[2])]
                        video[(t * H + h) * W + w, keys] = True
            mask[offset:offset + n, offset:offset + n] = video
        offset += n
    return mask


def model_allowed(attn_mask, B, S):
    """The model's own attention mask as [B, h, S, S] bool (additive masks: > -1e4 kept)."""
    if attn_mask is None:
        return torch.ones(B, 1, S, S, dtype=torch.bool)
    m = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -1e4
    while m.dim() < 4:
        m = m.unsqueeze(1)
    return m.expand(B, m.shape[1], S, S)


# --- Wan and derivatives ------------------------------------------------------------------------
_WAN_KW = dict(patch_size=(1, 2, 2), num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
               out_channels=4, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
_WAN_LATENT = (1, 4, 3, 10, 14)  # grid (3, 5, 7)
_WAN_GRID = (3, 5, 7)


def _wan_inputs(seed=1, channels=4):
    g = torch.Generator().manual_seed(seed)
    B, _, F, H, W = _WAN_LATENT
    return dict(hidden_states=_rand(g, B, channels, F, H, W), timestep=torch.tensor([500.0]),
                encoder_hidden_states=_rand(g, B, TEXT, TEXT_DIM), return_dict=False)


def build_wan():
    from diffusers import WanTransformer3DModel

    with _seeded(0):
        model = WanTransformer3DModel(**_WAN_KW)
    return Case(_finish(model), _wan_inputs(), _WAN_GRID, [("video", 105)])


def build_wan_vace():
    from diffusers import WanVACETransformer3DModel

    with _seeded(0):
        model = WanVACETransformer3DModel(**_WAN_KW, vace_layers=[0], vace_in_channels=8)
    kwargs = _wan_inputs()
    g = torch.Generator().manual_seed(7)
    kwargs["control_hidden_states"] = _rand(g, 1, 8, *_WAN_LATENT[2:])
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105)])


def build_wan_animate():
    """Wan-Animate: latents [B, 2C + 4, T + 1, H, W] (pose latents added to frames 1..T), a 16 x 16 face
    video through the motion encoder; self-attention over the 3 x 5 x 7 video tokens."""
    from diffusers import WanAnimateTransformer3DModel

    kw = {k: v for k, v in _WAN_KW.items() if k != "in_channels"}
    with _seeded(0):
        model = WanAnimateTransformer3DModel(
            **kw, in_channels=12, latent_channels=4, image_dim=None,
            motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}, motion_encoder_size=16, motion_style_dim=8,
            motion_dim=4, motion_encoder_dim=8, face_encoder_hidden_dim=16, face_encoder_num_heads=2,
            inject_face_latents_blocks=1, motion_encoder_batch_size=4)
    kwargs = _wan_inputs(channels=12)
    g = torch.Generator().manual_seed(5)
    kwargs.update(pose_hidden_states=_rand(g, 1, 4, 2, 10, 14), face_pixel_values=_rand(g, 1, 3, 5, 16, 16))
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105)])


def build_skyreels_v2():
    from diffusers import SkyReelsV2Transformer3DModel

    with _seeded(0):
        model = SkyReelsV2Transformer3DModel(**_WAN_KW)
    return Case(_finish(model), _wan_inputs(), _WAN_GRID, [("video", 105)])


def build_chronoedit():
    from diffusers import ChronoEditTransformer3DModel

    with _seeded(0):
        model = ChronoEditTransformer3DModel(**_WAN_KW)
    return Case(_finish(model), _wan_inputs(), _WAN_GRID, [("video", 105)])


def build_helios():
    """Helios with short-history latents: 2 history frames patched like the video (1, 2, 2) go
    before the video tokens: 2 * 5 * 7 = 70 dense extra tokens."""
    from diffusers import HeliosTransformer3DModel

    kw = {k: v for k, v in _WAN_KW.items() if k != "rope_max_seq_len"}
    with _seeded(0):
        model = HeliosTransformer3DModel(**kw, rope_dim=(4, 6, 6))
    kwargs = _wan_inputs()
    g = torch.Generator().manual_seed(3)
    kwargs.update(indices_hidden_states=torch.tensor([[2, 3, 4]]),
                  latents_history_short=_rand(g, 1, 4, 2, 10, 14), indices_latents_history_short=torch.tensor([[0, 1]]))
    return Case(_finish(model), kwargs, _WAN_GRID, [("dense", 70), ("video", 105)])


# --- Flux-like (packed image tokens with position ids) ----------------------------------------
def _flux_ids(H, W, index=0):
    ids = torch.zeros(H, W, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(H)[:, None]
    ids[..., 2] = torch.arange(W)[None, :]
    return ids.reshape(H * W, 3)


def _flux_kwargs(seed, H, W, context=None, channels=16, guidance=False, pooled=32):
    g = torch.Generator().manual_seed(seed)
    ids = _flux_ids(H, W)
    n = H * W
    if context is not None:
        ids = torch.cat([ids, _flux_ids(*context, index=1)])
        n += context[0] * context[1]
    kwargs = dict(hidden_states=_rand(g, 1, n, channels), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=torch.zeros(TEXT, 3), return_dict=False)
    if pooled:
        kwargs["pooled_projections"] = _rand(g, 1, pooled)
    if guidance:
        kwargs["guidance"] = torch.tensor([3.5])
    return kwargs


_FLUX_KW = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=HEAD_DIM,
                num_attention_heads=HEADS, joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))


def build_flux():
    from diffusers import FluxTransformer2DModel

    with _seeded(0):
        model = FluxTransformer2DModel(**_FLUX_KW, pooled_projection_dim=32)
    return Case(_finish(model), _flux_kwargs(1, 7, 9), (1, 7, 9), [("dense", TEXT), ("video", 63)])


def build_flux_kontext():
    """Flux Kontext: a 5 x 6 context image appended after the 7 x 9 image (img_ids index 1)."""
    from diffusers import FluxTransformer2DModel

    with _seeded(0):
        model = FluxTransformer2DModel(**_FLUX_KW, pooled_projection_dim=32, guidance_embeds=True)
    kwargs = _flux_kwargs(1, 7, 9, context=(5, 6), guidance=True)
    return Case(_finish(model), kwargs, (1, 7, 9), [("dense", TEXT), ("video", 63), ("dense", 30)],
                output=lambda out: out[0][:, :63])


def build_chroma():
    from diffusers import ChromaTransformer2DModel

    with _seeded(0):
        model = ChromaTransformer2DModel(**_FLUX_KW, approximator_num_channels=8, approximator_hidden_dim=16,
                                         approximator_layers=1)
    kwargs = _flux_kwargs(1, 7, 9, pooled=0)
    return Case(_finish(model), kwargs, (1, 7, 9), [("dense", TEXT), ("video", 63)])


def _flux_like(cls_name, **config):
    import diffusers

    with _seeded(0):
        model = getattr(diffusers, cls_name)(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                             attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                             joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6), **config)
    return model


def build_bria():
    model = _flux_like("BriaTransformer2DModel", pooled_projection_dim=32)
    return Case(_finish(model), _flux_kwargs(1, 7, 9), (1, 7, 9), [("dense", TEXT), ("video", 63)])


def build_longcat_image():
    """LongCat-Image-Edit-style: a 5 x 6 reference image after the 7 x 9 image."""
    model = _flux_like("LongCatImageTransformer2DModel", pooled_projection_dim=32)
    kwargs = _flux_kwargs(1, 7, 9, context=(5, 6), pooled=0)
    return Case(_finish(model), kwargs, (1, 7, 9), [("dense", TEXT), ("video", 63), ("dense", 30)])


def build_ovis_image():
    model = _flux_like("OvisImageTransformer2DModel", out_channels=16)
    return Case(_finish(model), _flux_kwargs(1, 7, 9, pooled=0), (1, 7, 9), [("dense", TEXT), ("video", 63)])


# --- HunyuanVideo family ------------------------------------------------------------------------
_HV_KW = dict(in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
              num_single_layers=1, num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1,
              text_embed_dim=TEXT_DIM, pooled_projection_dim=16, rope_axes_dim=(4, 6, 6))
_TEXT_MASK = torch.tensor([[1, 1, 1, 1, 0, 0]])  # two padded text tokens


def build_hunyuan_video():
    from diffusers import HunyuanVideoTransformer3DModel

    with _seeded(0):
        model = HunyuanVideoTransformer3DModel(**_HV_KW)
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, *_WAN_LATENT), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM), encoder_attention_mask=_TEXT_MASK,
                  pooled_projections=_rand(g, 1, 16), guidance=torch.tensor([3500.0]), return_dict=False)
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105), ("dense", TEXT)])


def build_hunyuan_video15():
    """Text-to-video: the image stream is all padding (zeros), ByT5 and MLLM text after the video."""
    from diffusers import HunyuanVideo15Transformer3DModel

    with _seeded(0):
        model = HunyuanVideo15Transformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, num_layers=1,
            num_refiner_layers=1, mlp_ratio=2.0, patch_size=2, patch_size_t=1, text_embed_dim=TEXT_DIM,
            text_embed_2_dim=24, image_embed_dim=16, rope_axes_dim=(4, 6, 6))
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, *_WAN_LATENT), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM), encoder_attention_mask=_TEXT_MASK,
                  encoder_hidden_states_2=_rand(g, 1, 4, 24), encoder_attention_mask_2=torch.tensor([[1, 1, 1, 0]]),
                  image_embeds=torch.zeros(1, 3, 16), return_dict=False)
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105), ("dense", 3 + 4 + TEXT)])


def build_hunyuan_framepack():
    """History latents (clean, 2x, 4x: 51 tokens) before the video; 3 image tokens and the 4 valid
    text tokens after it (a batch of one: the model drops the padded text)."""
    from diffusers import HunyuanVideoFramepackTransformer3DModel

    with _seeded(0):
        model = HunyuanVideoFramepackTransformer3DModel(**_HV_KW, has_image_proj=True, image_proj_dim=16,
                                                        has_clean_x_embedder=True)
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, *_WAN_LATENT), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM), encoder_attention_mask=_TEXT_MASK,
                  pooled_projections=_rand(g, 1, 16), image_embeds=_rand(g, 1, 3, 16),
                  indices_latents=torch.tensor([1, 2, 3]), guidance=torch.tensor([3500.0]),
                  latents_clean=_rand(g, 1, 4, 1, 10, 14), indices_latents_clean=torch.tensor([0]),
                  latents_history_2x=_rand(g, 1, 4, 2, 10, 14), indices_latents_history_2x=torch.tensor([4, 5]),
                  latents_history_4x=_rand(g, 1, 4, 4, 10, 14), indices_latents_history_4x=torch.arange(6, 10),
                  return_dict=False)
    # history: clean 1 x 5 x 7 = 35; 2x padded to 2 x 12 x 16, patched (2, 4, 4): 1 x 3 x 4 = 12; 4x padded
    # to 4 x 16 x 16, patched (4, 8, 8): 1 x 2 x 2 = 4
    return Case(_finish(model), kwargs, _WAN_GRID, [("dense", 35 + 12 + 4), ("video", 105), ("dense", 3 + 4)])


# --- CogVideoX-like (text prefix, SDPA called directly) --------------------------------------
_COG_KW = dict(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4,
               time_embed_dim=16, text_embed_dim=TEXT_DIM, num_layers=1, sample_width=14, sample_height=10,
               sample_frames=9, patch_size=2, temporal_compression_ratio=4, max_text_seq_length=TEXT,
               use_rotary_positional_embeddings=True)


def _cog_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=_rand(g, 1, 3, 4, 10, 14), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                timestep=torch.tensor([500]), return_dict=False)


def _cog_rope():
    from diffusers.models.embeddings import get_3d_rotary_pos_embed

    return get_3d_rotary_pos_embed(HEAD_DIM, ((0, 0), (5, 7)), (5, 7), 3)


def build_cogvideox():
    from diffusers import CogVideoXTransformer3DModel

    with _seeded(0):
        model = CogVideoXTransformer3DModel(**_COG_KW)
    kwargs = {**_cog_inputs(), "image_rotary_emb": _cog_rope()}
    return Case(_finish(model), kwargs, _WAN_GRID, [("dense", TEXT), ("video", 105)])


def build_consisid():
    from diffusers import ConsisIDTransformer3DModel

    kw = {k: v for k, v in _COG_KW.items() if k != "temporal_compression_ratio"}
    with _seeded(0):
        model = ConsisIDTransformer3DModel(**kw)
    kwargs = {**_cog_inputs(), "image_rotary_emb": _cog_rope()}
    return Case(_finish(model), kwargs, _WAN_GRID, [("dense", TEXT), ("video", 105)])


_COGVIEW_KW = dict(patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=HEAD_DIM,
                   num_attention_heads=HEADS, text_embed_dim=TEXT_DIM, time_embed_dim=16, condition_dim=8,
                   pos_embed_max_size=16, sample_size=16)


def _cogview_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor([[80.0, 112.0]])
    return dict(hidden_states=_rand(g, 1, 4, 14, 18), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                timestep=torch.tensor([500]), original_size=size, target_size=size,
                crop_coords=torch.zeros(1, 2), return_dict=False)


def build_cogview3plus():
    from diffusers import CogView3PlusTransformer2DModel

    with _seeded(0):
        model = CogView3PlusTransformer2DModel(**_COGVIEW_KW)
    return Case(_finish(model), _cogview_inputs(), (1, 7, 9), [("dense", TEXT), ("video", 63)])


def build_cogview4():
    from diffusers import CogView4Transformer2DModel

    with _seeded(0):
        model = CogView4Transformer2DModel(**_COGVIEW_KW, rope_axes_dim=(8, 8))
    return Case(_finish(model), _cogview_inputs(), (1, 7, 9), [("dense", TEXT), ("video", 63)])


# --- other image models -------------------------------------------------------------------------
def _flux2_ids(H, W, t=0):
    ids = torch.cartesian_prod(torch.tensor([t]), torch.arange(H), torch.arange(W), torch.tensor([0]))
    return ids.float()


def build_flux2():
    """Flux.2 with one 5 x 6 reference image after the 7 x 9 image (ids t = 10)."""
    from diffusers import Flux2Transformer2DModel

    with _seeded(0):
        model = Flux2Transformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                        attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                        joint_attention_dim=TEXT_DIM, timestep_guidance_channels=16,
                                        axes_dims_rope=(4, 4, 4, 4))
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([_flux2_ids(7, 9), _flux2_ids(5, 6, t=10)])[None]
    txt_ids = torch.cartesian_prod(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]), torch.arange(TEXT))
    kwargs = dict(hidden_states=_rand(g, 1, 93, 16), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                  timestep=torch.tensor([0.5]), img_ids=ids, txt_ids=txt_ids.float()[None],
                  guidance=torch.tensor([4.0]), return_dict=False)
    return Case(_finish(model), kwargs, (1, 7, 9), [("dense", TEXT), ("video", 63), ("dense", 30)])


def build_sd3():
    """SD3.5-style: block 0 has the dual attention (attn2 over the image tokens alone)."""
    from diffusers import SD3Transformer2DModel

    with _seeded(0):
        model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                      attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                      joint_attention_dim=TEXT_DIM, caption_projection_dim=WIDTH,
                                      pooled_projection_dim=16, pos_embed_max_size=16, dual_attention_layers=(0,),
                                      qk_norm="rms_norm")
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, 1, 4, 14, 18), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                  pooled_projections=_rand(g, 1, 16), timestep=torch.tensor([500]), return_dict=False)
    # attn: joint, image then text; attn2 (dual attention): image only
    return Case(_finish(model), kwargs, (1, 7, 9), [[("video", 63), ("dense", TEXT)], [("video", 63)]])


def _qwen(edit: bool):
    from diffusers import QwenImageTransformer2DModel

    with _seeded(0):
        model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                            joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(1)
    shapes = [(1, 7, 9), (1, 5, 6)] if edit else [(1, 7, 9)]
    n = sum(f * h * w for f, h, w in shapes)
    kwargs = dict(hidden_states=_rand(g, 1, n, 16), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                  encoder_hidden_states_mask=_TEXT_MASK.clone(), timestep=torch.tensor([0.5]), img_shapes=[shapes],
                  return_dict=False)
    segments = [("dense", TEXT), ("video", 63)] + ([("dense", 30)] if edit else [])
    return Case(_finish(model), kwargs, (1, 7, 9), segments)


def build_qwen_image():
    return _qwen(edit=False)


def build_qwen_image_edit():
    """Qwen-Image-Edit: a 5 x 6 reference image after the 7 x 9 image."""
    return _qwen(edit=True)


def build_hunyuan_image():
    from diffusers import HunyuanImageTransformer2DModel

    with _seeded(0):
        model = HunyuanImageTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                               attention_head_dim=HEAD_DIM, num_layers=1, num_single_layers=1,
                                               num_refiner_layers=1, mlp_ratio=2.0, patch_size=(2, 2),
                                               text_embed_dim=TEXT_DIM, rope_axes_dim=(8, 8))
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, 1, 4, 14, 18), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM), encoder_attention_mask=_TEXT_MASK,
                  return_dict=False)
    return Case(_finish(model), kwargs, (1, 7, 9), [("video", 63), ("dense", TEXT)])


# --- other video models -------------------------------------------------------------------------
def _video_inputs(seed=1, channels=4, text=True):
    g = torch.Generator().manual_seed(seed)
    kwargs = dict(hidden_states=_rand(g, 1, channels, 3, 10, 14), timestep=torch.tensor([500.0]), return_dict=False)
    if text:
        kwargs["encoder_hidden_states"] = _rand(g, 1, TEXT, TEXT_DIM)
    return kwargs


def build_ltx_video():
    from diffusers import LTXVideoTransformer3DModel

    with _seeded(0):
        model = LTXVideoTransformer3DModel(in_channels=8, out_channels=8, num_attention_heads=HEADS,
                                           attention_head_dim=HEAD_DIM, cross_attention_dim=WIDTH, num_layers=1,
                                           caption_channels=TEXT_DIM)
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, 1, 105, 8), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                  timestep=torch.tensor([500.0]), encoder_attention_mask=_TEXT_MASK, num_frames=3, height=5, width=7,
                  return_dict=False)
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105)])


def build_ltx2():
    """LTX-2 with 5 audio latent frames: only the video stream's self-attention is sparse."""
    from diffusers import LTX2VideoTransformer3DModel

    with _seeded(0):
        model = LTX2VideoTransformer3DModel(
            in_channels=8, out_channels=8, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
            cross_attention_dim=WIDTH, audio_in_channels=8, audio_out_channels=8, audio_num_attention_heads=HEADS,
            audio_attention_head_dim=HEAD_DIM, audio_cross_attention_dim=WIDTH, num_layers=1,
            caption_channels=TEXT_DIM)
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, 1, 105, 8), audio_hidden_states=_rand(g, 1, 5, 8),
                  encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                  audio_encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM), timestep=torch.tensor([500.0]),
                  num_frames=3, height=5, width=7, audio_num_frames=5, fps=24.0, return_dict=False)
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105)])


def build_mochi():
    """Mochi drops each sample's padded text: 4 valid text tokens after the video."""
    from diffusers import MochiTransformer3DModel

    with _seeded(0):
        model = MochiTransformer3DModel(patch_size=2, num_attention_heads=HEADS, attention_head_dim=HEAD_DIM,
                                        num_layers=1, pooled_projection_dim=16, in_channels=4, text_embed_dim=TEXT_DIM,
                                        time_embed_dim=16, max_sequence_length=TEXT)
    kwargs = {**_video_inputs(), "encoder_attention_mask": _TEXT_MASK}
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105), ("dense", 4)])


def build_cosmos():
    from diffusers import CosmosTransformer3DModel

    with _seeded(0):
        model = CosmosTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=HEADS,
                                         attention_head_dim=HEAD_DIM, num_layers=1, mlp_ratio=2.0,
                                         text_embed_dim=TEXT_DIM, adaln_lora_dim=8, max_size=(8, 16, 16),
                                         patch_size=(1, 2, 2), concat_padding_mask=False, extra_pos_embed_type=None)
    return Case(_finish(model), _video_inputs(), _WAN_GRID, [("video", 105)])


def build_allegro():
    from diffusers import AllegroTransformer3DModel

    with _seeded(0):
        model = AllegroTransformer3DModel(patch_size=2, patch_size_t=1, num_attention_heads=HEADS,
                                          attention_head_dim=HEAD_DIM, in_channels=4, out_channels=4, num_layers=1,
                                          cross_attention_dim=WIDTH, sample_height=10, sample_width=14,
                                          sample_frames=3, caption_channels=TEXT_DIM)
    return Case(_finish(model), _video_inputs(), _WAN_GRID, [("video", 105)])


def build_easyanimate():
    from diffusers import EasyAnimateTransformer3DModel

    with _seeded(0):
        model = EasyAnimateTransformer3DModel(num_attention_heads=HEADS, attention_head_dim=HEAD_DIM, in_channels=4,
                                              out_channels=4, patch_size=2, sample_width=14, sample_height=10,
                                              num_layers=1, mmdit_layers=1, time_embed_dim=16,
                                              text_embed_dim=TEXT_DIM)
    return Case(_finish(model), _video_inputs(), _WAN_GRID, [("dense", TEXT), ("video", 105)])


def build_kandinsky5():
    """Kandinsky 5: channels-last latents [B, T, H, W, C]."""
    from diffusers import Kandinsky5Transformer3DModel

    with _seeded(0):
        model = Kandinsky5Transformer3DModel(in_visual_dim=4, in_text_dim=TEXT_DIM, in_text_dim2=16, time_dim=16,
                                             out_visual_dim=4, patch_size=(1, 2, 2), model_dim=WIDTH, ff_dim=64,
                                             num_text_blocks=1, num_visual_blocks=1, axes_dims=(4, 6, 6))
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, 1, 3, 10, 14, 4), encoder_hidden_states=_rand(g, 1, TEXT, TEXT_DIM),
                  timestep=torch.tensor([500.0]), pooled_projections=_rand(g, 1, 16),
                  visual_rope_pos=[torch.arange(3), torch.arange(5), torch.arange(7)], text_rope_pos=torch.arange(TEXT),
                  return_dict=False)
    return Case(_finish(model), kwargs, _WAN_GRID, [("video", 105)], output=lambda out: out)


def build_lumina2(mask=None):
    """Lumina 2: [valid caption, image] in the main layers, the image alone in the noise refiner."""
    from diffusers import Lumina2Transformer2DModel

    with _seeded(0):
        model = Lumina2Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, hidden_size=WIDTH,
                                          num_layers=1, num_refiner_layers=1, num_attention_heads=HEADS, num_kv_heads=1,
                                          multiple_of=16, axes_dim_rope=(4, 6, 6), axes_lens=(32, 32, 32),
                                          cap_feat_dim=TEXT_DIM)
    mask = _TEXT_MASK if mask is None else mask
    g = torch.Generator().manual_seed(1)
    B = mask.shape[0]
    kwargs = dict(hidden_states=_rand(g, B, 4, 14, 18), timestep=torch.tensor([0.5] * B),
                  encoder_hidden_states=_rand(g, B, TEXT, TEXT_DIM), encoder_attention_mask=mask, return_dict=False)
    return Case(_finish(model), kwargs, (1, 7, 9), [[("dense", 4), ("video", 63)], [("video", 63)]])


def build_z_image():
    """Z-Image: list inputs; [63 image tokens, 1 image pad (to 64), 6 caption tokens + 26 pads (to 32)] in the
    main layers, [63 image tokens, 1 pad] in the noise refiner."""
    from diffusers import ZImageTransformer2DModel

    with _seeded(0):
        model = ZImageTransformer2DModel(in_channels=4, dim=WIDTH, n_layers=1, n_refiner_layers=1, n_heads=HEADS,
                                         n_kv_heads=HEADS, cap_feat_dim=TEXT_DIM, axes_dims=[4, 6, 6],
                                         axes_lens=[64, 32, 32])
    g = torch.Generator().manual_seed(1)
    kwargs = dict(x=[_rand(g, 4, 1, 14, 18)], t=torch.tensor([0.5]), cap_feats=[_rand(g, TEXT, TEXT_DIM)],
                  return_dict=False)
    return Case(_finish(model), kwargs, (1, 7, 9), [[("video", 63), ("dense", 1 + 32)], [("video", 63), ("dense", 1)]],
                output=lambda out: torch.stack(out[0]))


def build_hidream():
    """HiDream-I1: text = 6 T5 tokens + 4 tokens of a Llama layer (a different layer per block)."""
    from diffusers import HiDreamImageTransformer2DModel

    with _seeded(0):
        model = HiDreamImageTransformer2DModel(patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                               num_single_layers=1, attention_head_dim=HEAD_DIM,
                                               num_attention_heads=HEADS, caption_channels=[TEXT_DIM, TEXT_DIM],
                                               text_emb_dim=16, num_routed_experts=2, num_activated_experts=1,
                                               axes_dims_rope=(4, 6, 6), max_resolution=(16, 16), llama_layers=[0, 1])
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=_rand(g, 1, 4, 14, 14), timesteps=torch.tensor([500]),
                  encoder_hidden_states_t5=_rand(g, 1, TEXT, TEXT_DIM),
                  encoder_hidden_states_llama3=_rand(g, 2, 1, 4, TEXT_DIM), pooled_embeds=_rand(g, 1, 16),
                  return_dict=False)
    return Case(_finish(model), kwargs, (1, 7, 7), [("video", 49), ("dense", TEXT + 4 + 4)])


BUILDERS: dict[str, Callable[[], Case]] = {
    "WanTransformer3DModel": build_wan,
    "WanVACETransformer3DModel": build_wan_vace,
    "WanAnimateTransformer3DModel": build_wan_animate,
    "SkyReelsV2Transformer3DModel": build_skyreels_v2,
    "ChronoEditTransformer3DModel": build_chronoedit,
    "HeliosTransformer3DModel": build_helios,
    "FluxTransformer2DModel": build_flux,
    "FluxTransformer2DModel/kontext": build_flux_kontext,
    "ChromaTransformer2DModel": build_chroma,
    "BriaTransformer2DModel": build_bria,
    "LongCatImageTransformer2DModel/edit": build_longcat_image,
    "OvisImageTransformer2DModel": build_ovis_image,
    "HunyuanVideoTransformer3DModel": build_hunyuan_video,
    "HunyuanVideo15Transformer3DModel": build_hunyuan_video15,
    "HunyuanVideoFramepackTransformer3DModel": build_hunyuan_framepack,
    "CogVideoXTransformer3DModel": build_cogvideox,
    "ConsisIDTransformer3DModel": build_consisid,
    "CogView3PlusTransformer2DModel": build_cogview3plus,
    "CogView4Transformer2DModel": build_cogview4,
    "Flux2Transformer2DModel": build_flux2,
    "SD3Transformer2DModel": build_sd3,
    "QwenImageTransformer2DModel": build_qwen_image,
    "QwenImageTransformer2DModel/edit": build_qwen_image_edit,
    "HunyuanImageTransformer2DModel": build_hunyuan_image,
    "LTXVideoTransformer3DModel": build_ltx_video,
    "LTX2VideoTransformer3DModel": build_ltx2,
    "MochiTransformer3DModel": build_mochi,
    "CosmosTransformer3DModel": build_cosmos,
    "AllegroTransformer3DModel": build_allegro,
    "EasyAnimateTransformer3DModel": build_easyanimate,
    "Kandinsky5Transformer3DModel": build_kandinsky5,
    "Lumina2Transformer2DModel": build_lumina2,
    "ZImageTransformer2DModel": build_z_image,
    "HiDreamImageTransformer2DModel": build_hidream,
}
