"""The reference pipeline: its data, the analysis that checks captions, the trainer, and what it learned."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import WanPipeline

from ditaccel.pipelines import embedded, reference
from ditaccel.pipelines.reference import analysis, data, model, train

# --- data -----------------------------------------------------------------------------------------


def test_clips_are_deterministic_from_their_seed():
    a, spec_a = data.sample_clip(7, 64, 96, 9)
    b, spec_b = data.sample_clip(7, 64, 96, 9)
    c, spec_c = data.sample_clip(8, 64, 96, 9)
    assert spec_a == spec_b and np.array_equal(a, b)
    assert spec_a != spec_c and not np.array_equal(a, c)
    assert a.shape == (9, 64, 96, 3) and a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1


def test_held_out_combinations_are_never_trained_but_every_word_is():
    held, trained = data.held_out_combos(), data.training_combos()
    assert len(held) == len(set(held)) == 16 and not set(held) & set(trained)
    assert len(trained) == len(data.COLOURS) * len(data.SHAPES) * len(data.DIRECTIONS) - 16
    for axis, names in enumerate((data.COLOURS, data.SHAPES, data.DIRECTIONS)):
        assert {c[axis] for c in trained} == set(names)
    rng = np.random.default_rng(0)
    drawn = {(s.colour, s.shape, s.direction) for s in (data.sample_spec(rng, 64, 64, 5) for _ in range(500))}
    assert drawn <= set(trained) and len(drawn) > 60


@pytest.mark.parametrize("height, width", [(144, 192), (64, 96)])
def test_analysis_reads_ground_truth_clips_as_captioned(height, width):
    specs = [data.sample_spec(np.random.default_rng(100 + i), height, width, 17, data.all_combos())
             for i in range(48)]
    videos = [data.render(s, height, width, 17) for s in specs]
    result = analysis.caption_agreement(videos, specs)
    assert result.colour == 1.0 and result.direction == 1.0, result.rows
    assert {s.colour for s in specs} == set(data.COLOURS) and {s.direction for s in specs} == set(data.DIRECTIONS)


def test_analysis_notices_wrong_colour_and_motion():
    video, spec = data.sample_clip(3, 144, 192, 17, [("red", "circle", "left")])
    assert analysis.dominant_colour(video) == "red" and analysis.motion_direction(video) == "left"
    assert analysis.dominant_colour(video[..., ::-1]) == "blue"  # RGB -> BGR
    assert analysis.motion_direction(video[::-1]) == "right"  # played backwards
    assert analysis.motion_direction(video.transpose(0, 2, 1, 3)) == "up"  # transposed: x becomes y
    still = np.repeat(video[:1], 17, axis=0)
    assert analysis.motion_direction(still) is None
    background_only = np.full_like(video, 0.3)
    assert analysis.dominant_colour(background_only) is None and analysis.motion_direction(background_only) is None


def test_every_caption_tokenizes_without_unknown_words():
    tok = model.build_tokenizer()
    longest = 0
    for colour, shape, direction in data.all_combos()[:12]:
        for background in data.BACKGROUNDS:
            for texture in data.TEXTURES:
                caption = data.Prompt(colour, shape, direction, background, texture).caption
                ids = tok(caption).input_ids
                assert tok.unk_token_id not in ids and ids[-1] == tok.eos_token_id
                longest = max(longest, len(ids))
    assert longest <= model.MAX_SEQUENCE_LENGTH


def test_bad_input_names_the_field():
    with pytest.raises(ValueError, match="height"):
        data.sample_clip(0, 16, 64, 5)
    with pytest.raises(ValueError, match="colour"):
        data.sample_spec(np.random.default_rng(0), 64, 64, 5, [("teal", "square", "left")])
    with pytest.raises(ValueError, match="count"):
        data.held_out_prompts(17)
    with pytest.raises(ValueError, match="full_fraction"):
        train.TrainConfig(full_fraction=1.5)
    with pytest.raises(ValueError, match="frames"):
        train.TrainConfig(frames=16)
    with pytest.raises(ValueError, match="stages"):
        train.TrainConfig(stages=("vae", "bogus"))


# --- attention locality ---------------------------------------------------------------------------


def test_tile_neighbourhood_matches_brute_force():
    grid, tile = (3, 6, 8), (1, 2, 4)
    near = analysis.tile_neighbourhood(grid, tile)
    coords = [(t, h, w) for t in range(grid[0]) for h in range(grid[1]) for w in range(grid[2])]
    for i in (0, 17, 100, len(coords) - 1):
        expect = [all(abs(a // s - b // s) <= 1 for a, b, s in zip(coords[i], c, tile)) for c in coords]
        assert near[i].tolist() == expect


def test_local_mass_of_peaked_and_flat_attention():
    grid, tile = (3, 8, 8), (1, 2, 2)
    near = analysis.tile_neighbourhood(grid, tile).float()
    S = near.shape[0]
    keys = torch.nn.functional.one_hot(torch.arange(S), S).float().view(1, S, 1, S) * 100.0
    assert analysis.local_mass(keys, keys, near).item() == pytest.approx(1.0, abs=1e-4)  # attends to itself
    flat = torch.zeros(1, S, 2, 4)
    assert analysis.local_mass(flat, flat, near).tolist() == pytest.approx(
        [analysis.uniform_locality(grid, tile)] * 2, abs=1e-5)


# --- the trainer ----------------------------------------------------------------------------------

TINY_TRANSFORMER = dict(model.TRANSFORMER_CONFIG, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                        ffn_dim=32)
TINY = ["--vae-steps", "2", "--vae-clip", "5", "32", "32", "--decoder-steps", "2", "--decoder-clip", "5", "32", "48",
        "--cooldown-steps", "2",
        "--full-clips", "2", "--small-clips", "2",
        "--frames", "5", "--height", "48", "--width", "64", "--small-canvas", "32", "48", "--crop", "4", "6",
        "--crop-batch", "2", "--full-batch", "1", "--checkpoint-every", "2", "--full-fraction", "0.5",
        "--threads", "0"]


def tiny_config(workdir, steps, **kw):
    cfg = train.parse_args([*TINY, "--workdir", str(workdir), "--dit-steps", str(steps), "--no-progress"])
    return train.TrainConfig(**{**vars(cfg), "transformer_config": TINY_TRANSFORMER, **kw})


def test_training_runs_exports_and_resumes_to_the_same_weights(tmp_path):
    straight = train.train(tiny_config(tmp_path / "a", 4))
    assert train.train(tiny_config(tmp_path / "b", 4, stop_at=2)) is None  # interrupted: no export yet
    state = torch.load(tmp_path / "b" / "transformer.pt", weights_only=False)
    assert state["step"] == 2 and not (tmp_path / "b" / "pipeline").exists()
    resumed = train.train(tiny_config(tmp_path / "b", 4))  # picks up at step 2, runs the 2 cool-down steps
    assert torch.load(tmp_path / "b" / "transformer.pt", weights_only=False)["step"] == 6

    a = WanPipeline.from_pretrained(straight, local_files_only=True)
    b = WanPipeline.from_pretrained(resumed, local_files_only=True)
    for name in ("transformer", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    fresh = model.build(0, TINY_TRANSFORMER).transformer.state_dict()
    assert not torch.equal(a.transformer.state_dict()["proj_out.weight"], fresh["proj_out.weight"])  # it trained
    assert a.vae.config.latents_std != [1.0] * 16  # normalisation measured on the cached latents
    assert not list(straight.rglob("*.bin")) and list(straight.rglob("*.safetensors"))


def test_stages_run_side_by_side_give_the_sequential_run(tmp_path):
    straight = train.train(tiny_config(tmp_path / "a", 2))
    with pytest.raises(ValueError, match="vae"):  # the transformer needs the finished VAE
        train.train(tiny_config(tmp_path / "b", 2, stages=("latents", "transformer")))
    assert train.train(tiny_config(tmp_path / "b", 2, stages=("vae", "decoder"))) is None
    assert train.train(tiny_config(tmp_path / "b", 2, stages=("vae", "latents", "transformer"))) is None
    parallel = train.train(tiny_config(tmp_path / "b", 2, stages=("export",)))
    a = WanPipeline.from_pretrained(straight, local_files_only=True)
    b = WanPipeline.from_pretrained(parallel, local_files_only=True)
    for name in ("transformer", "vae"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert a.vae.config.latents_std == b.vae.config.latents_std


# --- the shipped pipeline -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained():
    return reference.load()


@pytest.mark.reference_weights
def test_shipped_weights_load_offline_and_are_small(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert reference.is_available() and embedded.is_trained()
    files = [p for p in reference.WEIGHTS_DIR.rglob("*") if p.is_file()]
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert weights and all(p.suffix == ".safetensors" for p in weights)
    assert sum(p.stat().st_size for p in files) <= 30 * 2**20
    pipe = reference.load(dtype=torch.bfloat16)
    assert isinstance(pipe, WanPipeline) and pipe.transformer.dtype == torch.bfloat16
    index = json.loads((reference.WEIGHTS_DIR / "model_index.json").read_text())
    assert index["transformer"][1] == "WanTransformer3DModel" and index["vae"][1] == "AutoencoderKLWan"
    assert type(embedded.load().transformer).__name__ == "WanTransformer3DModel"


# --- what it learned ------------------------------------------------------------------------------
# The quick check generates a few held-out clips on a small canvas with few steps; the slow one is
# the check: all 16 held-out captions at the default size and step count.

QUICK = dict(height=64, width=96, num_frames=17, num_inference_steps=10, guidance_scale=5.0,
             max_sequence_length=model.MAX_SEQUENCE_LENGTH)


@pytest.mark.reference_weights
def test_quick_held_out_captions_are_followed(trained):
    result, videos = analysis.held_out_agreement(trained, count=6, **QUICK)
    assert len(videos) == 6 and videos[0].shape == (17, 64, 96, 3)
    # chance is 1/6 for the colour and 1/4 for the direction
    assert result.colour >= 4 / 6 and result.direction >= 4 / 6, result.rows


@pytest.mark.slow
@pytest.mark.reference_weights
def test_held_out_captions_are_followed_at_the_default_size(trained):
    result, _ = analysis.held_out_agreement(trained, count=16, **embedded.DEFAULTS)
    assert result.colour >= 0.80 and result.direction >= 0.75, result.rows


@pytest.mark.reference_weights
def test_trained_attention_is_more_local_than_random(trained):
    call = dict(embedded.DEFAULTS, num_inference_steps=3)
    prompt = data.held_out_prompts(1)[0].caption
    learned = analysis.attention_locality(trained, prompt, **call)
    random = analysis.attention_locality(model.build(0), prompt, **call)
    grid = (5, 18, 24)
    floor = analysis.uniform_locality(grid)
    assert len(learned) == len(random) == trained.transformer.config.num_layers
    assert sum(learned) / len(learned) > 1.5 * sum(random) / len(random)
    assert all(r < 3 * floor for r in random)  # random weights attend almost evenly


def test_latent_crops_hold_the_shapes_whole_path():
    rng = np.random.default_rng(0)
    for i in range(200):
        spec = data.sample_spec(np.random.default_rng(i), 144, 192, 17)
        top, left = train._crop_window(dataclasses.asdict(spec), (18, 24), (8, 12), rng, 17)
        assert 0 <= top <= 18 - 8 and 0 <= left <= 24 - 12
        ys, xs = zip(spec.centre(0), spec.centre(16))
        r = spec.size / 2
        if (max(ys) - min(ys) + 2 * r) / 8 <= 7 and (max(xs) - min(xs) + 2 * r) / 8 <= 11:  # fits with slack
            assert top * 8 <= min(ys) - r and max(ys) + r <= (top + 8) * 8, (i, spec)
            assert left * 8 <= min(xs) - r and max(xs) + r <= (left + 12) * 8, (i, spec)
