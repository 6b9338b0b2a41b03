"""Architecture of the reference pipeline: a small ``diffusers.WanPipeline`` built from configs.

- ``transformer``: ``WanTransformer3DModel``, 4 layers, 4 heads x 32 dims (width 128), patch (1, 1, 1);
- ``vae``: ``AutoencoderKLWan`` with Wan 2.1's layout (8x spatial, 4x temporal, 16 latent channels)
  at base width 16, one res-block per level; its ``latents_mean`` / ``latents_std`` are set by the
  trainer from the encoded training clips, so the transformer works on unit-scale latents;
- ``text_encoder``: a 2-layer ``UMT5EncoderModel`` of width 64 with seeded random weights, kept
  frozen: captions come from a 26-word template language, so the encoder only has to map different
  captions to different, position-aware embeddings, which a random relative-position encoder does;
  everything that has to *understand* them is the transformer's cross-attention and text embedder,
  trained end to end. (Training the encoder too would cost CPU time and let it collapse nothing we need.)
- ``tokenizer``: word-level over the captions' vocabulary (:func:`.data.caption_words`), ``[PAD]`` 0,
  ``</s>`` 1, ``[UNK]`` 2 as in T5, built with ``tokenizers``;
- ``scheduler``: ``FlowMatchEulerDiscreteScheduler`` with ``shift=3``.
"""

from __future__ import annotations

import torch

from .data import caption_words

SPECIAL_TOKENS = ("[PAD]", "</s>", "[UNK]")
MAX_SEQUENCE_LENGTH = 16  # the longest caption is 11 words + </s>

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


def vocabulary() -> tuple[str, ...]:
    return tuple(dict.fromkeys(SPECIAL_TOKENS + tuple(caption_words())))


def build_tokenizer():
    """Word-level tokenizer over the caption vocabulary, lower-cased, ``</s>`` appended."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", vocab["</s>"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>", unk_token="[UNK]",
                                   model_max_length=512, padding_side="right")


def build(seed: int = 0, transformer_config: dict | None = None, vae_config: dict | None = None):
    """A fresh reference ``WanPipeline`` with seeded random weights (float32, CPU), global RNG untouched."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = build_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = WanTransformer3DModel(**(transformer_config or TRANSFORMER_CONFIG))
        torch.manual_seed(seed + 1)
        vae = AutoencoderKLWan(**(vae_config or VAE_CONFIG))
        torch.manual_seed(seed + 2)
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TEXT_ENCODER_CONFIG))
    text_encoder.requires_grad_(False)
    return WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder.eval(), vae=vae.eval(),
                       transformer=transformer.eval(), scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG))
