"""The embedded default pipeline: built in code, real text in, enough tokens, saves and reloads offline."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import WanPipeline

from ditaccel.pipelines import embedded

SMALL = dict(height=64, width=96, num_frames=5, num_inference_steps=2, max_sequence_length=32)


@pytest.fixture(scope="module")
def pipe():
    return embedded.load()


def latents(pipe, prompt=embedded.DEFAULT_PROMPT, **kw):
    out = pipe(prompt=prompt, generator=torch.Generator().manual_seed(0), output_type="latent", **{**SMALL, **kw})
    return out.frames


def test_default_grid_has_at_least_2000_video_tokens(pipe):
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["hidden_states"].shape)), with_kwargs=True)
    try:
        kw = {k: v for k, v in embedded.DEFAULTS.items() if k != "num_inference_steps"}
        pipe(prompt=embedded.DEFAULT_PROMPT, num_inference_steps=1, output_type="latent",
             generator=torch.Generator().manual_seed(0), **kw)
    finally:
        handle.remove()
    _, _, F, H, W = seen[0]
    pt, ph, pw = pipe.transformer.config.patch_size
    tokens = (F // pt) * (H // ph) * (W // pw)
    assert tokens >= 2000
    d = embedded.DEFAULTS
    assert F == (d["num_frames"] - 1) // pipe.vae_scale_factor_temporal + 1
    assert tokens == F * d["height"] * d["width"] // (pipe.vae_scale_factor_spatial ** 2 * ph * pw)
    assert len(seen) == 2 * 1  # classifier-free guidance: two forwards per step at the default guidance


def test_tokenizer_is_word_level_with_eos_and_padding(pipe):
    tok = pipe.tokenizer
    enc = tok("A Red square moving left", padding="max_length", max_length=8)
    ids = enc.input_ids
    words = tok.convert_ids_to_tokens(ids)
    assert words[:6] == ["a", "red", "square", "moving", "left", "</s>"]
    assert words[6:] == ["[PAD]", "[PAD]"] and tok.pad_token_id == 0
    assert enc.attention_mask == [1] * 6 + [0] * 2
    assert tok.convert_ids_to_tokens(tok("a zebra").input_ids) == ["a", "[UNK]", "</s>"]
    assert len(tok) == len(set(embedded.VOCAB)) == pipe.text_encoder.config.vocab_size


def test_build_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b = embedded.build(), embedded.build()
    assert torch.equal(torch.random.get_rng_state(), state)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa), name
    c = embedded.build(seed=1)
    assert not torch.equal(c.transformer.proj_out.weight, a.transformer.proj_out.weight)


def test_prompt_reaches_the_model_and_video_comes_out(pipe):
    red = latents(pipe, "a red square moving left")
    blue = latents(pipe, "a blue circle moving right")
    assert torch.equal(red, latents(pipe, "a red square moving left"))  # seeded
    assert not torch.allclose(red, blue)
    video = pipe(prompt="a red square", generator=torch.Generator().manual_seed(0), **SMALL).frames
    assert video.shape == (1, SMALL["num_frames"], SMALL["height"], SMALL["width"], 3)
    assert video.min() >= 0.0 and video.max() <= 1.0 and math.isfinite(float(video.std())) and video.std() > 0


def test_dtypes():
    bf16 = embedded.load(dtype=torch.bfloat16)
    assert bf16.transformer.dtype == torch.bfloat16 and bf16.vae.dtype == torch.bfloat16
    fp16 = embedded.load(dtype=torch.float16)
    assert fp16.transformer.proj_out.weight.dtype == torch.float16
    keep = fp16.transformer._keep_in_fp32_modules
    assert keep and fp16.transformer.scale_shift_table.dtype == torch.float32


def test_save_and_load_offline(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = embedded.save(tmp_path / "embedded", pipe)
    assert (path / "model_index.json").is_file() and (path / "tokenizer").is_dir()
    loaded = WanPipeline.from_pretrained(path, local_files_only=True)
    assert type(loaded.transformer).__name__ == "WanTransformer3DModel"
    assert loaded.tokenizer("a red square").input_ids == pipe.tokenizer("a red square").input_ids
    ref, got = latents(pipe), latents(loaded)
    # Same weights; only memory alignment of the loaded tensors can change float rounding.
    assert torch.allclose(got, ref, rtol=0, atol=1e-4)


def test_the_embedded_pipeline_has_its_own_preset_and_other_wans_keep_the_family_one(pipe):
    import ditaccel
    from ditaccel.pipelines.wan import WanAdapter

    family = WanAdapter().preset()
    assert family != embedded.PRESET
    with ditaccel.accelerate(pipe) as handle:
        assert handle.config == embedded.PRESET
    with ditaccel.accelerate(pipe.transformer) as handle:  # no scheduler: the table's fractions as steps of 50
        assert handle.config == embedded.PRESET.at_step_count(WanAdapter.typical_steps)
        assert any("step ranges" in n for n in handle.stats()["notes"])
    other = embedded.build()
    other.transformer = type(pipe.transformer)(**{**embedded.TRANSFORMER_CONFIG, "num_layers": 2})
    assert not embedded.is_embedded_transformer(other.transformer)
    with ditaccel.accelerate(other) as handle:
        assert handle.config == family
    with ditaccel.accelerate(pipe, "tile") as handle:  # a named method is not replaced
        assert handle.config.method == "tile"
