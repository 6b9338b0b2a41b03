"""The tiny test pipelines themselves: they build, run, honour cfg / batch / sizes, are deterministic,
and their self-attention matters."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_pipelines import (
    DEFAULT_SIZE,
    FAMILIES,
    ODD_GRID,
    SECOND_SIZE,
    SPARSE_SIZE,
    TEXT_LEN,
    build_wan,
    call_kwargs,
    pipe_for,
    token_grid,
)

FAMILY_NAMES = list(FAMILIES)

# Self-attention over the latent tokens (possibly joint with text), per family.
SELF_ATTENTION = {
    "wan": r"blocks\.\d+\.attn1",
    "wan22": r"blocks\.\d+\.attn1",
    "hunyuan_video": r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
    "cogvideox": r"transformer_blocks\.\d+\.attn1",
    "flux": r"(transformer_blocks|single_transformer_blocks)\.\d+\.attn",
}
SEPARATE_CFG = {"wan", "wan22", "hunyuan_video", "flux"}  # cfg = a second transformer call per step



@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops gain nothing from threads, and on a shared 2-core box thread contention costs 10-30x."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)





def frames(out):
    return torch.as_tensor(out.frames if hasattr(out, "frames") else out.images)


class Recorder:
    """Records every transformer forward: which transformer, batch, token grid, timestep, mask."""

    def __init__(self, pipe):
        self.calls = []
        self.handles = []
        for attr in ("transformer", "transformer_2"):
            model = getattr(pipe, attr, None)
            if model is not None:
                self.handles.append(model.register_forward_pre_hook(self._hook(attr, model), with_kwargs=True))

    def _hook(self, attr, model):
        def hook(module, args, kwargs):
            x = kwargs["hidden_states"]
            cfg = model.config
            if x.dim() == 5 and type(model).__name__ == "CogVideoXTransformer3DModel":  # [B, F, C, H, W]
                grid = (x.shape[1], x.shape[3] // cfg.patch_size, x.shape[4] // cfg.patch_size)
            elif x.dim() == 5:  # [B, C, F, H, W]
                pt, ph, pw = cfg.patch_size if isinstance(cfg.patch_size, (tuple, list)) else (
                    cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
                grid = (x.shape[2] // pt, x.shape[3] // ph, x.shape[4] // pw)
            else:  # Flux: packed [B, S, C]; grid from img_ids rows (0, row, col)
                ids = kwargs["img_ids"]
                grid = (1, int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1)
                assert grid[1] * grid[2] == x.shape[1]
            self.calls.append(dict(
                transformer=attr,
                batch=x.shape[0],
                grid=grid,
                timestep=kwargs["timestep"].clone(),
                text_len=kwargs["encoder_hidden_states"].shape[1],
                mask=kwargs.get("encoder_attention_mask"),
            ))
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", FAMILY_NAMES)
@pytest.mark.parametrize("batch_size", [1, 2])
@pytest.mark.parametrize("cfg", [True, False])
def test_builds_and_runs(family, batch_size, cfg):
    pipe = pipe_for(family)
    steps = 3
    with Recorder(pipe) as rec:
        out = frames(pipe(**call_kwargs(family, pipe, batch_size=batch_size, cfg=cfg, steps=steps)))
    size = DEFAULT_SIZE[family]
    if family == "flux":
        assert out.shape == (batch_size, size["height"], size["width"], 3)
    else:
        assert out.shape == (batch_size, size["num_frames"], size["height"], size["width"], 3)
    assert torch.isfinite(out).all()

    grid = token_grid(family)
    assert all(c["grid"] == grid for c in rec.calls)
    assert all(c["text_len"] == TEXT_LEN for c in rec.calls)
    if family in SEPARATE_CFG:
        assert len(rec.calls) == steps * (2 if cfg else 1)
        assert all(c["batch"] == batch_size for c in rec.calls)
    else:  # CogVideoX: one call per step on [uncond; cond]
        assert len(rec.calls) == steps
        assert all(c["batch"] == batch_size * (2 if cfg else 1) for c in rec.calls)
    if family == "hunyuan_video":  # text padding is masked, with lengths that differ per sample
        masks = [c["mask"] for c in rec.calls]
        assert all(m.shape == (batch_size, TEXT_LEN) for m in masks)
        assert all(float(m.sum(1).max()) < TEXT_LEN for m in masks)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_deterministic(family):
    a, b, c = FAMILIES[family](seed=0), FAMILIES[family](seed=0), FAMILIES[family](seed=1)
    for attr in ("transformer", "transformer_2", "vae"):
        ma, mb, mc = getattr(a, attr, None), getattr(b, attr, None), getattr(c, attr, None)
        if ma is None:
            continue
        sa, sb, sc = ma.state_dict(), mb.state_dict(), mc.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), attr
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), attr
    if family == "wan22":
        s1, s2 = a.transformer.state_dict(), a.transformer_2.state_dict()
        assert not all(torch.equal(s1[k], s2[k]) for k in s1)  # two different experts
    kw = dict(batch_size=2, cfg=True)
    first = frames(a(**call_kwargs(family, a, **kw)))
    assert torch.equal(first, frames(a(**call_kwargs(family, a, **kw))))
    assert torch.equal(first, frames(b(**call_kwargs(family, b, **kw))))
    assert not torch.equal(first, frames(a(**call_kwargs(family, a, seed=1, **kw))))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_resolutions_in_a_row(family):
    pipe = pipe_for(family)
    sizes = [{}, SECOND_SIZE[family], ODD_GRID[family]["size"], {}]
    outs = []
    for size in sizes:
        with Recorder(pipe) as rec:
            outs.append(frames(pipe(**call_kwargs(family, pipe, cfg=False, **size))))
        assert {c["grid"] for c in rec.calls} == {token_grid(family, **size)}
        assert outs[-1].shape[-3:-1] == (size.get("height", DEFAULT_SIZE[family]["height"]),
                                         size.get("width", DEFAULT_SIZE[family]["width"]))
    assert token_grid(family, **ODD_GRID[family]["size"]) == ODD_GRID[family]["grid"] == ODD_GRID[family]["kernel"]
    assert all(g % 2 == 1 for g in ODD_GRID[family]["grid"])
    assert outs[0].shape != outs[1].shape
    assert torch.equal(outs[0], outs[3])

    with Recorder(pipe) as rec:  # the larger grid for block-sparse tests (latent only: decoding is slow)
        pipe(**call_kwargs(family, pipe, cfg=False, output_type="latent", **SPARSE_SIZE[family]))
    grid = token_grid(family, **SPARSE_SIZE[family])
    assert {c["grid"] for c in rec.calls} == {grid}
    assert grid[1] % 8 == 0 and grid[2] % 8 == 0 and grid[1] * grid[2] >= 128


@pytest.mark.parametrize("steps", [3, 4])
def test_wan22_runs_both_experts(steps):
    pipe = pipe_for("wan22")
    with Recorder(pipe) as rec:
        pipe(**call_kwargs("wan22", pipe, cfg=True, steps=steps, output_type="latent"))
    order = [c["transformer"] for c in rec.calls]
    assert order[0] == "transformer" and order[-1] == "transformer_2"
    assert order == sorted(order, key=lambda t: t == "transformer_2")  # high-noise expert first, then low
    boundary = pipe.config.boundary_ratio * pipe.scheduler.config.num_train_timesteps
    for c in rec.calls:
        assert (float(c["timestep"][0]) >= boundary) == (c["transformer"] == "transformer")


def test_wan_per_token_timesteps():
    """expand_timesteps=True (Wan 2.2 TI2V style): timestep is [B, T*H*W], one value per token."""
    pipe = build_wan(seed=0, expand_timesteps=True)
    with Recorder(pipe) as rec:
        out = frames(pipe(**call_kwargs("wan", pipe, batch_size=2, cfg=False, output_type="latent")))
    assert torch.isfinite(out).all()
    T, H, W = token_grid("wan")
    assert all(c["timestep"].shape == (2, T * H * W) for c in rec.calls)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_self_attention_matters(family):
    """Zeroing the output of the self-attention modules changes the result a lot: attention is not
    a no-op in these tiny models. Also: every listed module is found, at least 2 per transformer."""
    pipe = pipe_for(family)
    kw = dict(cfg=False, output_type="latent")  # call_kwargs anew each run: it holds a fresh generator
    ref = frames(pipe(**call_kwargs(family, pipe, **kw))).double()
    pattern = re.compile(SELF_ATTENTION[family] + "$")

    def zero(module, args, output):
        if isinstance(output, tuple):
            return tuple(torch.zeros_like(o) if torch.is_tensor(o) else o for o in output)
        return torch.zeros_like(output)

    handles = []
    for attr in ("transformer", "transformer_2"):
        model = getattr(pipe, attr, None)
        if model is None:
            continue
        found = [m for n, m in model.named_modules() if pattern.match(n)]
        assert len(found) >= 2
        handles += [m.register_forward_hook(zero) for m in found]
    try:
        ablated = frames(pipe(**call_kwargs(family, pipe, **kw))).double()
    finally:
        for h in handles:
            h.remove()
    change = float((ablated - ref).norm() / ref.norm())
    assert change > 0.05, change
    assert torch.equal(frames(pipe(**call_kwargs(family, pipe, **kw))).double(), ref)  # hooks gone
