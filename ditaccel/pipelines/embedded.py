"""The embedded default pipeline: a small Wan-architecture ``WanPipeline`` built in code.

Every ``ditaccel`` command runs on it when no ``--model`` is given: no download, a CPU is enough.
All five components are built from configs; the three models get seeded random weights (the same
weights on every call):

- ``transformer``: ``WanTransformer3DModel``, 4 layers, 4 heads x 32 dims (width 128), patch (1, 1, 1);
- ``vae``: ``AutoencoderKLWan`` with Wan 2.1's layout (8x spatial, 4x temporal compression, 16
  latent channels) at base width 16, one res-block per level;
- ``text_encoder``: a 2-layer ``UMT5EncoderModel`` of width 64;
- ``tokenizer``: a word-level ``tokenizers`` model over :data:`VOCAB` (colours, shapes, motions and a
  few function words) plus ``[PAD]`` (0), ``</s>`` (1), ``[UNK]`` (2) as in T5, wrapped in
  ``transformers.PreTrainedTokenizerFast``: ``pipe(prompt="a red square moving left")`` works;
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with ``shift=3``.

Token count at :data:`DEFAULTS` (256 x 320 px, 5 frames): latents are (5 - 1) / 4 + 1 = 2 frames of
256 / 8 x 320 / 8 = 32 x 40, and patch (1, 1, 1) keeps them as they are, so self-attention runs over
T x H x W = 2 x 32 x 40 = **2560 video tokens** (no text tokens: Wan brings text in through
cross-attention). Every axis is a multiple of the Wan preset's tile (2, 8, 8), so its tile grid is
1 x 4 x 5 and a sparse step with window (3, 3, 3) tiles keeps 1 x 3/4 x 3/5 = 45% of the pairs,
with every block full (no token masks). H != W on purpose: a transposed axis shows up.

The weights are random until a trained reference pipeline is saved under
``ditaccel/pipelines/reference/`` (``WanPipeline.save_pretrained`` layout): :func:`load` then loads
that instead, and stays the single entry point either way.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

REFERENCE_DIR = Path(__file__).with_name("reference")
SEED = 0

DEFAULTS = dict(height=256, width=320, num_frames=5, num_inference_steps=8, guidance_scale=5.0,
                max_sequence_length=32)
"""Call arguments for the embedded pipeline (``pipe(prompt, **DEFAULTS)``). Prompts over :data:`VOCAB`
are short, so 32 text tokens (Wan's default is 512) keep text encoding and cross-attention small."""

DEFAULT_PROMPT = "a red square moving left"
DEFAULT_NEGATIVE_PROMPT = ""

SPECIAL_TOKENS = ("[PAD]", "</s>", "[UNK]")
VOCAB = tuple(SPECIAL_TOKENS) + tuple(
    # colours
    "red green blue yellow orange purple pink white black gray grey cyan magenta brown dark light bright "
    # shapes
    "square squares circle circles triangle triangles rectangle star ball disk dot ring cube box line shape shapes "
    # motion
    "moving moves move sliding slides bouncing bounces rotating rotates spinning spins turning growing grows "
    "shrinking shrinks falling falls rising rises drifting floating jumping static still stationary "
    "left right up down across around toward towards away from diagonally slowly quickly fast slow "
    # the rest
    "a an the and on in of to with over under at small large big tiny two three background frame "
    ", .".split()
)

TRANSFORMER_CONFIG = dict(
    patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=64, freq_dim=64, ffn_dim=256, num_layers=4, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=256,
)
VAE_CONFIG = dict(
    base_dim=16, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True],
    latents_mean=[0.0] * 16, latents_std=[1.0] * 16, scale_factor_temporal=4, scale_factor_spatial=8,
)
TEXT_ENCODER_CONFIG = dict(
    d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=32,
    relative_attention_max_distance=64, dropout_rate=0.0, feed_forward_proj="gated-gelu",
    pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)


def build_tokenizer():
    """Word-level tokenizer over :data:`VOCAB`, lower-cased, ``</s>`` appended, as a fast tokenizer."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(dict.fromkeys(VOCAB))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]",
                                   model_max_length=512, padding_side="right")


def build(seed: int = SEED):
    """A fresh embedded ``WanPipeline`` with seeded random weights (float32, CPU)."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**TRANSFORMER_CONFIG)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**VAE_CONFIG)
        torch.manual_seed(seed + 2)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG))
    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG)
    pipe = WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       transformer=transformer.eval(), scheduler=scheduler)
    return pipe


def load(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
    """The embedded default pipeline on ``device`` in ``dtype`` (the one entry point).

    Loads the trained reference under ``ditaccel/pipelines/reference/`` when one is shipped, else
    builds the seeded random-weight pipeline. Casting follows ``from_pretrained(torch_dtype=...)``:
    in float16 the modules a model keeps in float32 (``_keep_in_fp32_modules``) stay float32.
    """
    if (REFERENCE_DIR / "model_index.json").is_file():
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(REFERENCE_DIR, torch_dtype=dtype, local_files_only=True)
    else:
        pipe = build()
        for name in ("transformer", "vae", "text_encoder"):
            cast_model(getattr(pipe, name), dtype)
    pipe.to(device)
    return pipe


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


__all__ = ["DEFAULTS", "DEFAULT_PROMPT", "VOCAB", "build", "build_tokenizer", "cast_model", "load", "save"]
