"""Adapters beyond the happy path: Wan's structure accepted under another class name, what is not
Wan-like refused, and calls an adapter cannot plan (a mask that is not key padding) running the
model's own attention."""

from __future__ import annotations

import pytest
import torch
from tiny_families import _WAN_KW, _finish, _seeded, _wan_inputs, build_cogview4

import ditaccel
from ditaccel.pipelines import find_adapter


def test_wan_structure_accepted_under_another_class_name():
    from diffusers import WanTransformer3DModel

    renamed = type("MyFineTunedWanTransformer", (WanTransformer3DModel,), {})
    with _seeded(0):
        model = _finish(renamed(**_WAN_KW))
    assert find_adapter(model).family == "wan_derived"
    kwargs = _wan_inputs()
    with torch.no_grad():
        ref = model(**kwargs)[0]
        with ditaccel.accelerate(model, "window", kernel_size=(1, 3, 3), block_size=64) as handle:
            out = model(**kwargs)[0]
            stats = handle.stats()
        again = model(**kwargs)[0]
    assert stats["calls"] == 2 and stats["dense_calls"] == 0
    assert torch.isfinite(out).all() and not torch.equal(out, ref)
    assert torch.equal(again, ref)


def test_blocks_without_wan_structure_are_not_taken_for_wan():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn1 = torch.nn.Linear(4, 4)

    class NotWan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList([Block()])

        def forward(self, hidden_states, timestep, encoder_hidden_states):
            return hidden_states

    with pytest.raises(ValueError, match="unsupported model NotWan.*ModelSpec"):
        find_adapter(NotWan())


def test_cogview4_float_mask_runs_the_models_attention():
    """CogView4 turns its text mask into a float 0/1 matrix (a bias, not a key-padding mask): the call
    falls back to the model's own attention, output unchanged."""
    case = build_cogview4()
    case.kwargs["attention_mask"] = torch.tensor([[1, 1, 1, 1, 0, 0]])
    ref = case.run()
    with pytest.warns(UserWarning, match="running the model.s own attention"):
        with ditaccel.accelerate(case.model, "window", kernel_size=(1, 3, 5), block_size=64) as handle:
            out = case.run()
            stats = handle.stats()
    assert stats["dense_calls"] == stats["calls"] > 0
    assert torch.equal(out, ref)
