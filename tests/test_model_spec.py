"""The escape hatch: ``ditaccel.ModelSpec`` for a transformer no adapter knows, the unsupported-model
error that names it, the refusal of linear-attention models, and the spec's validation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from tiny_families import brute_force_mask

import ditaccel
from ditaccel.runtime import AttentionSite

TEXT = 5


class PlainSelfAttention(torch.nn.Module):
    """Self-attention that calls SDPA itself (no diffusers processor)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.out = torch.nn.Linear(dim, dim)

    def forward(self, x):
        B, S, C = x.shape
        q, k, v = self.qkv(x).view(B, S, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, S, C))


class ToyDiT(torch.nn.Module):
    """A transformer class no adapter knows: [text, video] joint self-attention (text prefix) over
    latents [B, C, T, H, W] patched 1 x 2 x 2; ``diffusers_attention`` picks a diffusers
    ``Attention`` module (its default SDPA processor) instead of the plain module."""

    def __init__(self, diffusers_attention: bool, dim=32, heads=2, channels=4, layers=2):
        super().__init__()
        self.patch = torch.nn.Conv3d(channels, dim, (1, 2, 2), (1, 2, 2))
        self.text_proj = torch.nn.Linear(16, dim)
        make = (lambda: Attention(dim, heads=heads, dim_head=dim // heads)) if diffusers_attention else \
            (lambda: PlainSelfAttention(dim, heads))
        self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict({"attn": make(), "mlp": torch.nn.Linear(dim, dim)})
                                          for _ in range(layers))
        self.head = torch.nn.Linear(dim, channels * 4)

    def forward(self, hidden_states, encoder_hidden_states, timestep=None):
        x = self.patch(hidden_states).flatten(2).transpose(1, 2)
        x = torch.cat([self.text_proj(encoder_hidden_states), x], dim=1)
        for block in self.blocks:
            x = x + block["attn"](x)
            x = x + torch.tanh(block["mlp"](x))
        return self.head(x[:, encoder_hidden_states.shape[1]:])


def toy(diffusers_attention=False):
    torch.manual_seed(0)
    model = ToyDiT(diffusers_attention).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    kwargs = dict(hidden_states=torch.randn(1, 4, 3, 10, 14, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g), timestep=torch.tensor([500.0]))
    return model, kwargs


def grid_of(hidden_states, **_):
    _, _, T, H, W = hidden_states.shape
    return (T, H // 2, W // 2)


def spec(**overrides):
    fields = dict(attention="blocks.*.attn", grid=grid_of, text="prefix",
                  text_len=lambda encoder_hidden_states, **_: encoder_hidden_states.shape[1])
    return ditaccel.ModelSpec(**{**fields, **overrides})


def test_unsupported_model_error_names_the_escape_hatch():
    model, kwargs = toy()
    ref = model(**kwargs)
    with pytest.raises(ValueError) as err:
        ditaccel.accelerate(model, "window")
    message = str(err.value)
    assert "ToyDiT" in message and "ModelSpec" in message and "model=" in message
    assert "WanTransformer3DModel" in message and "QwenImageTransformer2DModel" in message
    assert "forward" not in model.__dict__ and not hasattr(model, "_diffusers_hook")
    assert torch.equal(model(**kwargs), ref)


def test_linear_attention_model_is_refused_with_the_reason():
    sana = type("SanaTransformer2DModel", (torch.nn.Module,), {})()
    with pytest.raises(ValueError, match="linear attention"):
        ditaccel.accelerate(sana)


def test_wan_animate2_is_refused_with_the_reason():
    from diffusers import WanAnimate2Transformer3DModel

    model = WanAnimate2Transformer3DModel(num_layers=1, num_heads=2, dim=32, ffn_dim=64, freq_dim=32, text_dim=16,
                                          in_dim=4, out_dim=4)
    with pytest.raises(ValueError, match="WanAnimate2Transformer3DModel: its generation pass already runs "
                                         "block-sparse attention of its own"):
        ditaccel.accelerate(model, "tile")
    assert not hasattr(model, "_diffusers_hook")


@pytest.mark.parametrize("diffusers_attention", [False, True])
@pytest.mark.parametrize("fixed_grid", [False, True])
def test_spec_runs_the_plan_and_removes(diffusers_attention, fixed_grid, monkeypatch):
    model, kwargs = toy(diffusers_attention)
    ref = model(**kwargs)
    grid = (3, 5, 7) if fixed_grid else grid_of
    with ditaccel.accelerate(model, "dense", model=spec(grid=grid)) as handle:
        assert (model(**kwargs) - ref).norm() <= 1e-5 * ref.norm()
        assert handle.stats()["calls"] == 2
    calls = []
    original = AttentionSite.attend

    def recording(self, q, k, v, attn_mask, scale, dense):
        out = original(self, q, k, v, attn_mask, scale, dense)
        calls.append((q, k, v, out))
        return out

    monkeypatch.setattr(AttentionSite, "attend", recording)
    kernel = (1, 3, 3)
    handle = ditaccel.accelerate(model, "window", model=spec(grid=grid), kernel_size=kernel, block_size=64)
    assert handle.adapter.family == "custom"
    out = model(**kwargs)
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert len(calls) == 2
    mask = brute_force_mask((3, 5, 7), [("dense", TEXT), ("video", 105)], kernel)
    for q, k, v, got in calls:
        expected = F.scaled_dot_product_attention(*(x.double().transpose(1, 2) for x in (q, k, v)), attn_mask=mask)
        assert (got.double().transpose(1, 2) - expected).abs().max() <= 1e-5
    handle.remove()
    monkeypatch.undo()
    with ditaccel.accelerate(model, "topk", model=spec(grid=grid), topk=0.5, block_size=64):
        assert torch.isfinite(model(**kwargs)).all()
    assert torch.equal(model(**kwargs), ref)


def test_spec_text_left_to_the_call():
    """text_len=None: whatever the attention call holds beyond the grid is the text span."""
    model, kwargs = toy()
    ref = model(**kwargs)
    with ditaccel.accelerate(model, "window", model=spec(text_len=None), kernel_size=(1, 3, 3), block_size=64) as h:
        out = model(**kwargs)
        stats = h.stats()
    assert stats["dense_calls"] == 0 and stats["calls"] == 2
    assert torch.isfinite(out).all() and not torch.equal(out, ref)


@pytest.mark.parametrize("fields,needle", [
    (dict(attention=""), "ModelSpec.attention"),
    (dict(attention=("blocks.*.attn", 3)), "ModelSpec.attention"),
    (dict(grid=(3, 0, 7)), "ModelSpec.grid"),
    (dict(grid=(3, 5)), "ModelSpec.grid"),
    (dict(grid="3x5x7"), "ModelSpec.grid"),
    (dict(text="middle"), "ModelSpec.text="),
    (dict(text_len=-1), "ModelSpec.text_len"),
    (dict(text_len=2.5), "ModelSpec.text_len"),
    (dict(text="none", text_len=4), "ModelSpec.text_len"),
    (dict(transformer_attrs="transformer"), "ModelSpec.transformer_attrs"),
    (dict(preset="tile"), "ModelSpec.preset"),
])
def test_bad_spec_fields_raise_value_errors(fields, needle):
    with pytest.raises(ValueError, match=needle):
        spec(**fields)


def test_spec_checked_at_accelerate_and_pipeline_untouched():
    model, kwargs = toy()
    ref = model(**kwargs)
    with pytest.raises(ValueError, match="matches no module"):
        ditaccel.accelerate(model, "window", model=spec(attention="layers.*.self_attn"))
    with pytest.raises(ValueError, match="ModelSpec"):
        ditaccel.accelerate(model, "window", model="blocks.*.attn")

    class Pipe:
        pass

    pipe = Pipe()
    pipe.unet = model
    with pytest.raises(ValueError, match="transformer_attrs"):
        ditaccel.accelerate(pipe, "window", model=spec())
    assert "forward" not in model.__dict__ and not hasattr(model, "_diffusers_hook")
    assert not any(hasattr(m, "_diffusers_hook") for m in model.modules())
    assert torch.equal(model(**kwargs), ref)
    with ditaccel.accelerate(pipe, "window", model=spec(transformer_attrs=("unet",)), kernel_size=(1, 3, 3)):
        assert not torch.equal(model(**kwargs), ref)
    assert torch.equal(model(**kwargs), ref)
