"""Context parallelism beyond Ulysses on Wan: Ulysses on joint-attention models (Flux: text before the
image, HunyuanVideo: text after the video, with a text-padding mask) and ring (KV chunks rotating round
the ring, merged by LSE), each x {Wan, Flux, HunyuanVideo} x {tile, topk}, 2 processes over gloo spawned
here (bounded in time), against the single-process sparse output, in both orders of accelerate and
enable_parallelism; a per-head table under both (Ulysses: global head indices). The refusals are fast tests in tests/test_parallel_refusals.py."""

from __future__ import annotations


import pytest
import torch
from gloo_spawn import init_gloo, reporting, spawn
from test_parallel import WORLD, _rel

FAMILIES = ("wan", "flux", "hunyuan_video")
METHODS = {  # sparse-size grids (3, 8, 16) / (1, 16, 24): 384 latent tokens, 6 blocks of 64 (+ a text block)
    "tile": dict(tile=(1, 8, 8), window=(1, 1, 1), block_size=64, dense_steps=1),
    "topk": dict(topk=0.5, block_size=64, dense_steps=1),
}
# head 0 dense, head 1 tile: under Ulysses rank 1 holds head 1 and must plan it as the model's head 1
TABLE = dict(rules=[{"use": "tile", "heads": [1], "knobs": {"tile": (1, 8, 8), "window": (1, 1, 1)}}],
             block_size=64, dense_steps=1)
MODES = ("ulysses", "ring")


def _enable(pipe, family, mode=None, **degrees):
    """enable_parallelism with ``{mode}_degree=WORLD`` (or the given degrees), HunyuanVideo with our cp_plan."""
    from diffusers import ContextParallelConfig

    config = ContextParallelConfig(**(degrees or {f"{mode}_degree": WORLD}))
    plan = None
    if family == "hunyuan_video":
        from ditaccel.pipelines.hunyuan_video import cp_plan

        plan = cp_plan()
    pipe.transformer.enable_parallelism(config=config, cp_plan=plan)


def accelerated_run(pipe, method, kw, run):
    """``run(pipe)`` under ``accelerate(pipe, method, **kw)``: (output, the (rows, heads, head offset) its
    plans saw, this rank's sparse calls, the account merged over the ranks)."""
    import ditaccel
    from ditaccel.parallel import merged_stats

    with ditaccel.accelerate(pipe, method, **kw) as handle:
        seen = set()
        handle.observe(lambda call, q, k, v: seen.add((q.shape[1], q.shape[2], call.head_offset)))
        got = run(pipe)
        return got, sorted(seen), handle.stats()["paths"]["sparse"], merged_stats(handle)["paths"]


def _worker(rank, port, results):
    with reporting(rank, results):
        init_gloo(rank, WORLD, port)
        from tiny_pipelines import FAMILIES as BUILDERS
        from tiny_pipelines import run_latents

        import ditaccel
        from ditaccel.parallel import merged_stats

        out = {}
        for family in FAMILIES:
            run = lambda pipe, family=family: run_latents(pipe, family, sparse_size=True, steps=2)
            pipes = {mode: BUILDERS[family](seed=0) for mode in MODES}  # enable_parallelism is once per model
            base = pipes["ulysses"]
            plain, single, single_calls = run(base), {}, {}
            configs = {**{name: (name, kw) for name, kw in METHODS.items()},
                       **({"table": ("table", TABLE)} if family == "wan" else {})}
            for name, (method, kw) in configs.items():
                with ditaccel.accelerate(base, method, **kw) as handle:
                    single[name] = run(base)
                    single_calls[name] = handle.stats()["paths"]["sparse"]
                out[(family, "single", name)] = _rel(single[name], plain)
            for mode, pipe in pipes.items():
                _enable(pipe, family, mode)
                for name, (method, kw) in configs.items():
                    got, seen, local_sparse, paths = accelerated_run(pipe, method, kw, run)
                    out[(family, mode, name)] = dict(
                        rel=_rel(got, single[name]), finite=bool(torch.isfinite(got).all()), seen=seen,
                        sparse=paths["sparse"], local_sparse=local_sparse, single_sparse=single_calls[name], fallback=paths["dense_by_fallback"],
                        density=paths["realised_density"])
            for mode in MODES:  # accelerate first, then enable_parallelism (the hooks stack the other way round)
                pipe = BUILDERS[family](seed=0)
                with ditaccel.accelerate(pipe, "tile", **METHODS["tile"]) as handle:
                    _enable(pipe, family, mode)
                    got = run(pipe)  # Flux: its plan splits the transformer's inputs before ditaccel's step hook
                    paths = merged_stats(handle)["paths"]
                out[(family, mode, "tile_after")] = dict(rel=_rel(got, single["tile"]), sparse=paths["sparse"],
                                                         fallback=paths["dense_by_fallback"])
        out.update(_qwen_image(rank))
        results[rank] = out


def _qwen_model():
    from diffusers import QwenImageTransformer2DModel
    from tiny_families import HEAD_DIM, HEADS, TEXT_DIM, _finish
    from tiny_pipelines import _seeded

    with _seeded(0):
        model = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                            attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
                                            joint_attention_dim=TEXT_DIM, axes_dims_rope=(4, 6, 6))
    return _finish(model)


def _qwen_image(rank) -> dict:
    """Qwen-Image, a bare transformer (its own _cp_plan; its text mask is split per rank): two forwards at
    falling timesteps (step 0 dense, step 1 sparse), grid (1, 16, 24), 6 text tokens of which the last 2
    are padding (in rank 1's half)."""
    from diffusers import ContextParallelConfig
    from tiny_families import _TEXT_MASK, TEXT, TEXT_DIM

    import ditaccel

    g = torch.Generator().manual_seed(1)
    grid = (1, 16, 24)
    inputs = dict(hidden_states=torch.randn(1, 384, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, TEXT_DIM, generator=g),
                  encoder_hidden_states_mask=_TEXT_MASK.clone(), img_shapes=[[grid]], return_dict=False)

    def run(model):
        with torch.no_grad():
            return torch.cat([model(**inputs, timestep=torch.tensor([t]))[0] for t in (0.9, 0.5)])

    base = _qwen_model()
    plain, single = run(base), {}
    for name, kw in METHODS.items():
        with ditaccel.accelerate(base, name, **kw):
            single[name] = run(base)
    out = {}
    for mode in MODES:
        model = _qwen_model()
        model.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": WORLD}))
        for name, kw in METHODS.items():
            with ditaccel.accelerate(model, name, **kw) as handle:
                got = run(model)
                paths = handle.stats()["paths"]
            out[("qwen_image", mode, name)] = dict(rel=_rel(got, single[name]), sparse=paths["sparse"],
                                                   fallback=paths["dense_by_fallback"],
                                                   sparse_vs_dense=_rel(single[name], plain))
        model = _qwen_model()  # accelerate first, then enable_parallelism
        with ditaccel.accelerate(model, "tile", **METHODS["tile"]) as handle:
            model.enable_parallelism(config=ContextParallelConfig(**{f"{mode}_degree": WORLD}))
            got = run(model)
            paths = handle.stats()["paths"]
        out[("qwen_image", mode, "tile_after")] = dict(rel=_rel(got, single["tile"]), sparse=paths["sparse"],
                                                       fallback=paths["dense_by_fallback"],
                                                       sparse_vs_dense=_rel(got, plain))
    return out


@pytest.mark.slow  # two spawned processes, 3 families x 2 modes x 2 methods: minutes on a loaded 2-core machine
def test_ulysses_and_ring_match_single_process_sparse_on_joint_attention_models():
    results = spawn(_worker, WORLD, 840)
    heads = 2  # tiny pipelines: 2 heads; each rank plans the whole sequence for one of them
    for rank in range(WORLD):
        out = results[rank]
        assert "error" not in out, out.get("error")
        for family in FAMILIES:
            tokens = 384 + (8 if family != "wan" else 0)  # the latent grid, and the 8 text tokens of joint models
            for name in (*METHODS, *(("table",) if family == "wan" else ())):
                print(rank, family, "single process", name, "sparse vs dense", out[(family, "single", name)])
                assert out[(family, "single", name)] > 1e-3, (family, name)  # sparse, not dense
                for mode in MODES:
                    r = out[(family, mode, name)]
                    print(rank, family, mode, name, r)
                    assert r["rel"] < 1e-5, (family, mode, name, r["rel"])
                    assert r["finite"] and r["fallback"] == {}, (family, mode, name, r)
                    if name == "table" and mode == "ulysses":  # rank 1 holds head 1, the only sparse one
                        assert r["local_sparse"] == (r["single_sparse"] if rank == 1 else 0), r
                        assert r["sparse"] == r["single_sparse"] > 0, r
                    else:  # merged over ranks: each rank ran every call for its H/P heads (ring: its S/P rows)
                        assert r["sparse"] == WORLD * r["single_sparse"] > 0, (family, mode, name, r)
                    # Ulysses: the whole sequence of H/P heads from global head r * H/P; ring: S/P rows of every head
                    assert r["seen"] == ([(tokens, heads // WORLD, rank)] if mode == "ulysses"
                                         else [(tokens // WORLD, heads, 0)]), (family, mode, name, r["seen"])
            for mode in MODES:
                r = out[(family, mode, "tile_after")]
                print(rank, family, mode, "tile, accelerate then enable_parallelism", r)
                assert r["rel"] < 1e-5 and r["fallback"] == {} and r["sparse"] == WORLD * out[(family, mode, "tile")][
                    "single_sparse"], (family, mode, r)
        for mode in MODES:  # Qwen-Image (bare transformer): 2 layers x step 1 sparse on this rank's head
            for name in (*METHODS, "tile_after"):
                r = out[("qwen_image", mode, name)]
                print(rank, "qwen_image", mode, name, r)
                assert r["rel"] < 1e-5 and r["fallback"] == {} and r["sparse"] == 2, r
                assert r["sparse_vs_dense"] > 1e-3, r
