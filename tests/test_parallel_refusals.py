"""Context parallelism, fast (one process): the sequence mapping of joint-attention models against an
independent simulation of diffusers' split, and every combination ditaccel refuses, refused before
anything runs with the case named. The 2-process equality tests: test_parallel.py, test_parallel_joint.py."""

from __future__ import annotations

import pytest
import torch
from tiny_pipelines import ODD_GRID, SPARSE_SIZE, pipe_for, run_latents

import ditaccel
from ditaccel.parallel import unsupported, unsupported_forward
from ditaccel.parallel.attend import ring_attend
from ditaccel.parallel.order import SequenceMap, parallel_positions

TILE = dict(tile=(1, 8, 8), window=(1, 1, 1), block_size=64, dense_steps=1)


def _cp(ulysses=1, ring=1, **flags):  # what enable_parallelism records on the model (a ParallelConfig)
    cp = type("C", (), {"ulysses_degree": ulysses, "ring_degree": ring, "ulysses_anything": False,
                        "ring_anything": False, **flags})()
    return type("P", (), {"context_parallel_config": cp})()


def _simulated_parallel_sequence(x, text_len, text_position, degree):
    """What the ranks' pieces side by side hold, as diffusers splits each stream and the processor joins a
    rank's pieces: x is [S, ...] in the model's single-process order."""
    if text_position == "prefix":
        text, latent = x[:text_len], x[text_len:]
    else:
        latent, text = x[: x.shape[0] - text_len], x[x.shape[0] - text_len:]
    pieces = []
    for r in range(degree):
        t, lat = text.chunk(degree)[r], latent.chunk(degree)[r]
        pieces += [t, lat] if text_position == "prefix" else [lat, t]
    return torch.cat(pieces)


@pytest.mark.parametrize("text_position", ["prefix", "suffix"])
@pytest.mark.parametrize("degree,text_len,latent_len", [(2, 8, 384), (3, 6, 30), (4, 4, 64)])
def test_sequence_map_puts_the_parallel_sequence_back_in_model_order(text_position, degree, text_len, latent_len):
    S = text_len + latent_len
    model = torch.randn(S, 5)
    parallel = _simulated_parallel_sequence(model, text_len, text_position, degree)
    to_model, to_parallel = SequenceMap().get(S, text_len, text_position, degree, "cpu")
    assert torch.equal(parallel.index_select(0, to_model), model)
    assert torch.equal(model.index_select(0, to_parallel), parallel)
    assert not torch.equal(parallel, model)  # the orders do differ: the map is not the identity


def test_sequence_map_is_the_identity_without_text_and_refuses_uneven_streams():
    assert SequenceMap().get(64, 0, "prefix", 2, "cpu") is None
    assert SequenceMap().get(64, 8, "none", 2, "cpu") is None
    with pytest.raises(ValueError, match=r"7 text \+ 64 latent tokens does not split evenly over context-parallel "
                                         r"degree 2"):
        parallel_positions(71, 7, "suffix", 2)


@pytest.mark.parametrize("flags,expect", [
    (dict(ulysses=2, ulysses_anything=True), r"ulysses_anything=True \(ulysses_degree=2, ring_degree=1\) is not"),
    (dict(ring=2, ring_anything=True), r"ring_anything=True \(ulysses_degree=1, ring_degree=2\) is not"),
])
def test_unsupported_kinds_are_refused_at_accelerate_before_anything_changes(flags, expect):
    pipe = pipe_for("wan")
    pipe.transformer._parallel_config = _cp(**flags)
    try:
        with pytest.raises(ValueError, match=expect):
            ditaccel.accelerate(pipe, "tile", **TILE)
        assert not hasattr(pipe.transformer, "_diffusers_hook") or not pipe.transformer._diffusers_hook.hooks
    finally:
        del pipe.transformer._parallel_config


def test_text_in_self_attention_on_an_unverified_model_is_refused():
    # CogVideoX has text before the video in self-attention; how diffusers splits it is not verified
    pipe = pipe_for("cogvideox")
    pipe.transformer._parallel_config = _cp(ulysses=2)
    try:
        with pytest.raises(ValueError, match=r"text_position='prefix'.*has not been verified for it"):
            ditaccel.accelerate(pipe, "tile", **TILE)
    finally:
        del pipe.transformer._parallel_config
    assert unsupported(_cp(ring=2).context_parallel_config, "prefix", True) is None  # Flux, HunyuanVideo
    assert unsupported(_cp(ring=2).context_parallel_config, "none", False) is None  # Wan


def test_uneven_latent_grid_is_refused_at_the_first_forward_naming_model_and_degree():
    pipe = pipe_for("flux")
    with ditaccel.accelerate(pipe, "tile", **TILE) as handle:
        pipe.transformer._parallel_config = _cp(ring=2)
        try:
            with pytest.raises(ValueError, match=r"FluxTransformer2DModel under context parallelism \(ulysses_degree=1, "
                                                 r"ring_degree=2\): the latent grid \(1, 5, 7\) \(35 tokens\) does not "
                                                 r"split evenly over degree 2"):
                run_latents(pipe, "flux", **ODD_GRID["flux"]["size"], steps=1)
        finally:
            del pipe.transformer._parallel_config
        assert handle.stats()["calls"] == 0


def test_uneven_text_and_planning_token_orders_are_refused():
    cp = _cp(ulysses=2).context_parallel_config
    assert "the 7 text tokens do not split evenly over degree 2" in unsupported_forward(
        cp, "FluxTransformer2DModel", (1, 16, 24), 7, "prefix", None)
    assert "a planning token order" in unsupported_forward(
        cp, "FluxTransformer2DModel", (1, 16, 24), 16, "prefix", torch.arange(400))
    assert unsupported_forward(cp, "FluxTransformer2DModel", (1, 16, 24), 8, "prefix", None) is None
    assert unsupported_forward(None, "FluxTransformer2DModel", (1, 5, 7), 7, "prefix", None) is None
    assert SPARSE_SIZE["flux"]  # the sizes the 2-process tests run split evenly (1, 16, 24) + 8 text


def test_ring_with_a_per_query_mask_or_cross_attention_is_refused_before_any_exchange():
    site = type("Site", (), {"name": "transformer.blocks.0.attn1"})()
    q = torch.randn(1, 16, 3, 8)  # 3 heads over degree 2: the ring keeps every head, no divisibility needed
    per_query = torch.ones(1, 1, 16, 16, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"per-query attention mask \(shape \(1, 1, 16, 16\)\) is not supported"):
        ring_attend(site, q, q, q, per_query, None, _cp(ring=2))  # no process group: it must raise before one is used
    with pytest.raises(ValueError, match=r"needs self-attention \(queries of 16 tokens, keys of 8\)"):
        ring_attend(site, q, q[:, :8], q[:, :8], None, None, _cp(ring=2))
