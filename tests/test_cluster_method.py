"""cluster: k-means reordering per head with centroid-pair block selection (Sparse VideoGen2).

k-means, the cluster order, the block scores and the selection are checked against brute-force
versions written here with explicit loops in float64; the plan against attention under the
token-level mask its keep map stands for; warm starts and state against hand-driven contexts; and
the whole method end to end on the tiny pipelines of the four families.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from tiny_pipelines import SPARSE_SIZE, call_kwargs, pipe_for

import ditaccel
from ditaccel.layout import PAD, TEXT, VIDEO, build_layout
from ditaccel.methods import CallShape, make_method
from ditaccel.methods import cluster as cluster_module
from ditaccel.methods.cluster import (
    ClusterConfig,
    block_scores,
    cluster_order,
    initial_centroids,
    keep_from_scores,
    kmeans,
)
from ditaccel.state import CallContext, StateStore

BS = 64


def context(store, shape, batch, heads, step, layer=0, branch="cond"):
    state = store.state("transformer", layer, branch, (shape, batch, heads))
    return CallContext(transformer="transformer", layer=layer, step=step, branch=branch, shape=shape,
                       batch=batch, heads=heads, state=state, store=store)


def grouped_qk(grid, heads, dim, groups, text_len=0, text_position="none", batch=1, seed=0):
    """q, k [B, S, H, D] whose video tokens fall into ``groups`` semantic groups scattered over the
    grid (each group's queries and keys near one random direction): attention stays within a group."""
    gen = torch.Generator().manual_seed(seed)
    n = math.prod(grid)
    group = torch.stack([torch.randperm(n, generator=gen) % groups for _ in range(heads)])  # [H, n]
    centres = torch.randn(heads, groups, dim, generator=gen) * 3.0

    def tokens():
        video = centres.gather(1, group[..., None].expand(-1, -1, dim))  # [H, n, D]
        video = video[None] + 0.3 * torch.randn(batch, heads, n, dim, generator=gen)
        text = torch.randn(batch, heads, text_len, dim, generator=gen)
        parts = [text, video] if text_position == "prefix" else [video, text]
        return torch.cat(parts, dim=2).transpose(1, 2).contiguous()

    return tokens(), tokens(), group


# --------------------------------------------------------------------------------------------
# brute force
# --------------------------------------------------------------------------------------------
def brute_kmeans(x, centroids, iters):
    """Lloyd's algorithm with explicit loops over heads, points and clusters, float64."""
    x, c = x.double(), centroids.double().clone()
    H, N, _ = x.shape
    K = c.shape[1]

    def nearest(h):
        return [min(range(K), key=lambda j: float(((x[h, i] - c[h, j]) ** 2).sum())) for i in range(N)]

    for _ in range(iters):
        for h in range(H):
            labels = nearest(h)
            for j in range(K):
                members = [i for i in range(N) if labels[i] == j]
                if members:  # an empty cluster keeps its centroid
                    c[h, j] = x[h, members].mean(0)
    return c, torch.tensor([nearest(h) for h in range(H)])


def brute_block_scores(layout, order, q_labels, k_labels, q_cent, k_cent, scale):
    """Replace every video query by its query centroid and every video key by its key centroid,
    take the softmax over the video keys, and average each query block's mass per key block."""
    B, H = q_cent.shape[:2]
    bs, nb = layout.block_size, layout.num_blocks
    video_slots = torch.nonzero(layout.kind == VIDEO).squeeze(1).tolist()
    out = torch.zeros(B, H, nb, nb, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            tokens = order[h]  # the raster token in each video slot, in slot order
            q_tok = q_cent[b, h, q_labels[h, tokens]].double()  # every query replaced by its centroid
            k_tok = k_cent[b, h, k_labels[h, tokens]].double()
            attn = torch.softmax(q_tok @ k_tok.T * scale, dim=1)  # token-level, over the video keys
            for a in range(nb):
                rows = [i for i, s in enumerate(video_slots) if s // bs == a]
                for c in range(nb):
                    cols = [j for j, t in enumerate(video_slots) if t // bs == c]
                    if rows and cols:
                        out[b, h, a, c] = attn[rows][:, cols].sum() / len(rows)
    return out


def brute_keep(scores, top_p):
    """Per row: blocks largest first (ties: lower index) until the mass before reaches top_p; the diagonal."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    B, H, nq, nk = scores.shape
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                row = scores[b, h, i].tolist()
                mass = 0.0
                for j in sorted(range(nk), key=lambda j: (-row[j], j)):
                    if mass < top_p:
                        keep[b, h, i, j] = True
                    mass += row[j]
                if i < nk:
                    keep[b, h, i, i] = True
    return keep


# --------------------------------------------------------------------------------------------
# k-means, order, scores, selection
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iters", [0, 1, 6])
def test_kmeans_matches_brute_force(iters):
    gen = torch.Generator().manual_seed(iters)
    x = torch.randn(3, 40, 5, generator=gen)
    start = initial_centroids(x, 6)
    centroids, labels = kmeans(x, start, iters)
    ref_centroids, ref_labels = brute_kmeans(x, start, iters)
    assert torch.equal(labels, ref_labels)
    assert torch.allclose(centroids.double(), ref_centroids, atol=1e-5)
    # Every label is the nearest of the returned centroids.
    assert torch.equal(labels, torch.cdist(x.double(), centroids.double()).argmin(-1))


@pytest.mark.parametrize("tokens,clusters", [(30, 7), (200, 3)])  # (200, 3): drawn from a pool of 48
def test_initial_centroids_are_distinct_points_and_seeded(tokens, clusters):
    x = torch.randn(4, tokens, 3, generator=torch.Generator().manual_seed(1))
    c = initial_centroids(x, clusters)
    assert c.shape == (4, clusters, 3)
    for h in range(4):
        hits = [int(torch.nonzero((x[h] == c[h, j]).all(-1)).squeeze()) for j in range(clusters)]
        assert len(set(hits)) == clusters  # distinct tokens of head h
    assert torch.equal(initial_centroids(x, clusters), c)


def test_kmeans_plus_plus_seeds_every_separated_group():
    """Five tight, far-apart groups and five seeds: one seed per group (a uniform pick rarely manages)."""
    gen = torch.Generator().manual_seed(6)
    centres = 50 * torch.randn(3, 5, 4, generator=gen)
    group = torch.randint(0, 5, (3, 400), generator=gen)
    x = centres.gather(1, group[..., None].expand(-1, -1, 4)) + 0.1 * torch.randn(3, 400, 4, generator=gen)
    seeds = initial_centroids(x, 5)
    nearest_group = torch.cdist(seeds, centres).argmin(-1)
    assert all(sorted(row) == list(range(5)) for row in nearest_group.tolist())


def test_bfloat16_activations():
    grid, H = (3, 8, 16), 2
    q, k, _ = grouped_qk(grid, H, 16, groups=4)
    method = make_method(ClusterConfig(block_size=BS, q_clusters=4, k_clusters=6, top_p=0.9))
    ctx = context(StateStore(64), CallShape(grid, 0, "none"), 1, H, 0)
    plan = method.decide(ctx, q.bfloat16(), k.bfloat16())
    assert ctx.state.get("cluster.k_centroids").dtype == torch.bfloat16  # stored at half the bytes
    full = method.decide(context(StateStore(64), CallShape(grid, 0, "none"), 1, H, 0), q, k)
    assert float(plan.density) < 1.0 and abs(float(plan.density) - float(full.density)) < 0.1


def test_kmeans_chunking_does_not_change_the_result(monkeypatch):
    x = torch.randn(2, 60, 8, generator=torch.Generator().manual_seed(2))
    start = initial_centroids(x, 9)
    whole = kmeans(x, start, 4)
    monkeypatch.setattr(cluster_module, "_CHUNK_ELEMENTS", 2 * 9 * 7)  # 7 tokens per chunk
    chunked = kmeans(x, start, 4)
    assert torch.equal(whole[1], chunked[1]) and torch.allclose(whole[0], chunked[0], atol=1e-6)


def test_cluster_order_makes_clusters_contiguous():
    gen = torch.Generator().manual_seed(3)
    k_labels = torch.randint(0, 5, (3, 70), generator=gen)
    q_labels = torch.randint(0, 4, (3, 70), generator=gen)
    order = cluster_order(k_labels, q_labels, 4)
    for h in range(3):
        expected = sorted(range(70), key=lambda i: (int(k_labels[h, i]), int(q_labels[h, i]), i))
        assert order[h].tolist() == expected
        along = k_labels[h, order[h]].tolist()
        for c in set(along):  # each key cluster is one contiguous run of the order
            at = [i for i, lab in enumerate(along) if lab == c]
            assert at == list(range(at[0], at[0] + len(at)))


@pytest.mark.parametrize("grid,text_len,text_position,batch", [
    ((2, 5, 7), 0, "none", 1), ((3, 4, 5), 9, "prefix", 2), ((1, 6, 9), 5, "suffix", 1),
])
def test_block_scores_match_brute_force(grid, text_len, text_position, batch):
    gen = torch.Generator().manual_seed(4)
    H, D, Kq, Kk, bs = 2, 4, 3, 5, 16
    n = math.prod(grid)
    layout = build_layout(grid, text_len, text_position, "raster", (1, 1, 1), bs)
    q_labels = torch.randint(0, Kq, (H, n), generator=gen)
    k_labels = torch.randint(0, Kk, (H, n), generator=gen)
    k_labels[:, 0] = Kk - 1  # the last key cluster is not empty; cluster 1 is (empty clusters carry no mass)
    k_labels[k_labels == 1] = 0
    q_cent = torch.randn(batch, H, Kq, D, generator=gen)
    k_cent = torch.randn(batch, H, Kk, D, generator=gen)
    order = cluster_order(k_labels, q_labels, Kq)
    scores = block_scores(layout, order, q_labels, k_labels, q_cent, k_cent, 0.7)
    ref = brute_block_scores(layout, order, q_labels, k_labels, q_cent, k_cent, 0.7)
    assert torch.allclose(scores.double(), ref, atol=1e-5)
    video_rows = torch.zeros(layout.num_blocks, dtype=torch.bool)
    video_rows[torch.nonzero(layout.kind == VIDEO).squeeze(1) // bs] = True
    assert torch.allclose(scores.sum(-1)[..., video_rows], torch.ones(()), atol=1e-5)  # a distribution per video row


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95, 1.0])
def test_selection_matches_brute_force(top_p):
    gen = torch.Generator().manual_seed(5)
    scores = torch.softmax(3 * torch.randn(2, 3, 7, 7, generator=gen), -1)
    keep = keep_from_scores(scores, top_p)
    assert torch.equal(keep, brute_keep(scores.double(), top_p))
    if top_p == 1.0:
        assert keep.all()


# --------------------------------------------------------------------------------------------
# the plan
# --------------------------------------------------------------------------------------------
def token_mask(plan, batch, heads):
    """[B, H, S, S] the token-level attention the plan stands for, in model order: key blocks kept by
    ``any_blocks`` (per head, in that head's slot order), empty slots never attended."""
    layout = plan.layout
    bs = layout.block_size
    keep = plan.any_blocks.expand(batch, heads, -1, -1)
    S = layout.seq_len
    mask = torch.zeros(batch, heads, S, S, dtype=torch.bool)
    for h in range(heads):
        slot = layout.inverse[h]  # slot of every token
        blk = slot // bs
        mask[:, h] = keep[:, h][:, blk][:, :, blk]
    return mask


@pytest.mark.parametrize("text_len,text_position,batch", [(0, "none", 1), (10, "prefix", 2), (7, "suffix", 1)])
def test_plan_runs_the_attention_its_keep_map_says(text_len, text_position, batch):
    grid, H, D = (3, 8, 16), 2, 16
    shape = CallShape(grid, text_len, text_position)
    q, k, _ = grouped_qk(grid, H, D, groups=4, text_len=text_len, text_position=text_position, batch=batch)
    v = torch.randn(q.shape, generator=torch.Generator().manual_seed(9))
    method = make_method(ClusterConfig(block_size=BS, q_clusters=6, k_clusters=8, top_p=0.8, backend="reference"))
    plan = method.decide(context(StateStore(64), shape, batch, H, step=0), q, k)
    layout = plan.layout
    assert layout.per_head and plan.any_blocks.shape[:2] == (batch, H)
    assert float(plan.density) < 1.0

    # Text rows and columns are whole; the diagonal is kept.
    n_slots = layout.kind.numel()  # kind is shared by every head
    kind = torch.full((math.ceil(n_slots / BS) * BS,), PAD, dtype=layout.kind.dtype)
    kind[:n_slots] = layout.kind
    text_blocks = (kind.view(-1, BS) == TEXT).any(1)
    assert plan.any_blocks[..., text_blocks, :].all() and plan.any_blocks[..., :, text_blocks].all()
    assert plan.any_blocks.diagonal(dim1=-2, dim2=-1).all()

    # Every head's video tokens sit in slots, key cluster by key cluster.
    from ditaccel.kernels import run_plan

    qs, ks, vs = (layout.to_slots(x, dim=1).transpose(1, 2) for x in (q, k, v))
    out = layout.from_slots(run_plan("reference", qs, ks, vs, plan.block_mask, D**-0.5).transpose(1, 2), dim=1)
    mask = token_mask(plan, batch, H)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double(), attn_mask=mask
    ).transpose(1, 2)
    assert torch.allclose(out.double(), ref, atol=1e-5)


def test_clustered_tokens_are_found_and_top_p_mass_is_kept():
    """Four semantic groups scattered over the grid: raster blocks mix them all, cluster blocks are pure.
    The plan keeps at least ~top_p of the true attention mass of every query at a fraction of dense."""
    grid, H, D, groups = (4, 8, 16), 2, 16, 4  # 512 tokens: 128 per group, 8 blocks of 64
    shape = CallShape(grid, 0, "none")
    q, k, group = grouped_qk(grid, H, D, groups=groups)
    method = make_method(ClusterConfig(block_size=BS, q_clusters=4, k_clusters=4, top_p=0.9))
    plan = method.decide(context(StateStore(64), shape, 1, H, step=0), q, k)
    layout = plan.layout
    for h in range(H):  # the key clusters are the groups: every block holds one group's tokens
        blocks = group[h, layout.src[h]].view(-1, BS).tolist()
        assert all(len(set(block)) == 1 for block in blocks), [Counter(block) for block in blocks]
    mask = token_mask(plan, 1, H)
    attn = torch.softmax(q.transpose(1, 2) @ k.transpose(1, 2).transpose(-1, -2) * D**-0.5, -1)
    kept = (attn * mask).sum(-1)
    assert float(kept.min()) > 0.85
    assert float(plan.density) <= 0.3  # 2 of 8 key blocks per query block (its group's two)


# --------------------------------------------------------------------------------------------
# across steps: warm start, counts, budget
# --------------------------------------------------------------------------------------------
def test_warm_start_runs_iters_step_from_the_stored_centroids():
    grid, H, D = (3, 8, 16), 2, 16
    shape = CallShape(grid, 0, "none")
    cfg = ClusterConfig(block_size=BS, q_clusters=5, k_clusters=7, top_p=0.8, iters_first=9, iters_step=3,
                        dense_steps=1)
    method = make_method(cfg)
    store = StateStore(64)
    assert method.decide(context(store, shape, 1, H, step=0), *grouped_qk(grid, H, D, 4, seed=0)[:2]) is None
    ctx = context(store, shape, 1, H, step=1)
    q1, k1, _ = grouped_qk(grid, H, D, 4, seed=1)
    method.decide(ctx, q1, k1)
    assert ctx.counters[("kmeans", "transformer", 1)] == 2  # queries and keys
    assert ctx.counters[("kmeans_iters", "transformer", 1)] == 2 * cfg.iters_first
    stored_k = ctx.state.get("cluster.k_centroids").clone()
    stored_q = ctx.state.get("cluster.q_centroids").clone()
    feats_k1 = k1.permute(2, 1, 0, 3).reshape(H, -1, D)
    assert torch.equal(stored_k, kmeans(feats_k1, initial_centroids(feats_k1, 7), cfg.iters_first)[0])

    q2, k2, _ = grouped_qk(grid, H, D, 4, seed=2)
    ctx = context(store, shape, 1, H, step=2)
    method.decide(ctx, q2, k2)
    assert ctx.counters[("kmeans_iters", "transformer", 2)] == 2 * cfg.iters_step
    feats_k2 = k2.permute(2, 1, 0, 3).reshape(H, -1, D)
    feats_q2 = q2.permute(2, 1, 0, 3).reshape(H, -1, D)
    assert torch.equal(ctx.state.get("cluster.k_centroids"), kmeans(feats_k2, stored_k, cfg.iters_step)[0])
    assert torch.equal(ctx.state.get("cluster.q_centroids"), kmeans(feats_q2, stored_q, cfg.iters_step)[0])


def test_refused_centroids_mean_a_cold_start_every_step():
    grid, H = (3, 8, 16), 2
    shape = CallShape(grid, 0, "none")
    method = make_method(ClusterConfig(block_size=BS, q_clusters=4, k_clusters=4, iters_first=5, iters_step=1))
    store = StateStore(0.0)
    for step in range(3):
        ctx = context(store, shape, 1, H, step)
        method.decide(ctx, *grouped_qk(grid, H, 16, 4, seed=step)[:2])
        assert ctx.counters[("kmeans_iters", "transformer", step)] == 2 * 5
    assert store.refused >= 6 and store.bytes == 0


def test_a_new_shape_starts_cold():
    """Same heads, clusters and feature size at a transposed grid: stored centroids would fit, but the
    store drops them with the shape, so the first step at the new grid runs iters_first."""
    H = 2
    method = make_method(ClusterConfig(block_size=BS, q_clusters=4, k_clusters=4, iters_first=5, iters_step=1))
    store = StateStore(64)
    for step, grid in enumerate([(2, 8, 16), (2, 8, 16), (2, 16, 8)]):
        ctx = context(store, CallShape(grid, 0, "none"), 1, H, step)
        method.decide(ctx, *grouped_qk(grid, H, 16, 4, seed=step)[:2])
        assert ctx.counters[("kmeans_iters", "transformer", step)] == 2 * (1 if step == 1 else 5)


def test_more_clusters_than_tokens_are_capped():
    grid, H = (1, 4, 5), 2  # 20 video tokens
    method = make_method(ClusterConfig(block_size=BS, q_clusters=500, k_clusters=500, top_p=0.5))
    ctx = context(StateStore(64), CallShape(grid, 3, "prefix"), 1, H, 0)
    plan = method.decide(ctx, *grouped_qk(grid, H, 16, 4, text_len=3, text_position="prefix")[:2])
    assert ctx.state.get("cluster.k_centroids").shape == (H, 20, 16)
    assert plan.layout.per_head


# --------------------------------------------------------------------------------------------
# configs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field,value", [
    ("q_clusters", 0), ("k_clusters", -3), ("k_clusters", 2.5), ("top_p", 0.0), ("top_p", 1.01),
    ("top_p", "0.9"), ("iters_first", 0), ("iters_step", -1), ("block_size", 96),
])
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ClusterConfig\.{field}"):
        ClusterConfig(**{field: value})


def test_defaults_and_registry():
    cfg = ClusterConfig()
    assert (cfg.q_clusters, cfg.k_clusters, cfg.top_p, cfg.iters_first, cfg.iters_step) == (128, 512, 0.9, 50, 2)
    assert type(make_method(ClusterConfig(top_p=0.5))).__name__ == "ClusterMethod"


# --------------------------------------------------------------------------------------------
# end to end on the tiny pipelines
# --------------------------------------------------------------------------------------------
FOUR_FAMILIES = ["wan", "hunyuan_video", "cogvideox", "flux"]
SMALL = dict(block_size=BS, q_clusters=8, k_clusters=16, iters_first=10, iters_step=2)





def run(pipe, family, size=None, **kw):
    kw.setdefault("output_type", "latent")
    out = pipe(**call_kwargs(family, pipe, **(SPARSE_SIZE[family] if size is None else size), **kw))
    return torch.as_tensor(out.images if hasattr(out, "images") else out.frames)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("family", FOUR_FAMILIES)
def test_top_p_one_equals_dense_and_remove_is_bit_identical(family):
    pipe = pipe_for(family)
    ref = run(pipe, family, steps=2)  # the model's own attention (the "dense" method matches it: test_accelerate)
    with ditaccel.accelerate(pipe, "cluster", top_p=1.0, **SMALL) as handle:
        out = run(pipe, family, steps=2)
        stats = handle.stats()
    assert stats["mean_density"] == 1.0 and stats["dense_calls"] == 0
    assert sum(stats["counters"]["kmeans"].values()) == 2 * stats["calls"]  # queries and keys, every call
    assert rel_err(out, ref) < 1e-5

    handle = ditaccel.accelerate(pipe, "cluster", top_p=0.6, **SMALL)
    sparse = run(pipe, family, steps=2)
    density = handle.stats()["mean_density"]
    handle.remove()
    assert density < 1.0 and rel_err(sparse, ref) > 1e-3  # a real selection changes the result
    assert torch.equal(run(pipe, family, steps=2), ref)


def test_two_calls_in_a_row_are_identical_and_start_cold():
    pipe = pipe_for("cogvideox")  # CFG in one batch of 2: one permutation per head for both
    with ditaccel.accelerate(pipe, "cluster", top_p=0.7, dense_steps=1, **SMALL) as handle:
        first = run(pipe, "cogvideox", steps=3)
        stats = handle.stats()
        handle.reset_stats()
        second = run(pipe, "cogvideox", steps=3)
        stats_second = handle.stats()
    assert stats["mean_density"] < 1.0
    assert torch.equal(first, second)
    calls = {s: v["calls"] for s, v in stats["steps"].items() if s > 0}
    # A cold start at step 1 (iters_first, for queries and keys), warm at step 2; the same in the second call.
    assert stats["counters"]["kmeans_iters"] == {1: 2 * 10 * calls[1], 2: 2 * 2 * calls[2]}
    assert stats_second["counters"] == stats["counters"]


@pytest.mark.parametrize("family", ["wan"])
def test_new_resolution_uses_no_stale_centroids(family):
    """Size A then size B (same token count, transposed grid): A's centroids would fit B's shapes."""
    pipe = pipe_for(family)
    size_a = SPARSE_SIZE[family]
    size_b = dict(size_a, height=size_a["width"], width=size_a["height"])
    knobs = dict(top_p=0.7, **SMALL)
    with ditaccel.accelerate(pipe, "cluster", **knobs) as handle:
        run(pipe, family, size=size_a, steps=2)
        handle.reset_stats()
        second = run(pipe, family, size=size_b, steps=2)
        stats = handle.stats()
    calls = {s: v["calls"] for s, v in stats["steps"].items()}
    assert stats["counters"]["kmeans_iters"] == {0: 2 * 10 * calls[0], 1: 2 * 2 * calls[1]}
    with ditaccel.accelerate(pipe, "cluster", **knobs):
        fresh = run(pipe, family, size=size_b, steps=2)
    assert torch.equal(second, fresh)


def test_accelerate_rejects_bad_cluster_config_and_leaves_pipeline_untouched():
    pipe = pipe_for("wan")
    ref = run(pipe, "wan", steps=1)
    with pytest.raises(ValueError, match=r"ClusterConfig\.top_p"):
        ditaccel.accelerate(pipe, "cluster", top_p=0.0)
    with pytest.raises(ValueError, match=r"ClusterConfig\.k_clusters"):
        ditaccel.accelerate(pipe, "cluster", k_clusters=0)
    assert torch.equal(run(pipe, "wan", steps=1), ref)
