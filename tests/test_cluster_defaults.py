"""cluster's default sizes follow the sequence (capped), given values are honoured, and at a small
image's size the k-means work of the defaults is a small fraction of dense attention's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_plan_properties import _context

from ditaccel.methods import CallShape, ClusterConfig, make_method


@pytest.mark.parametrize("n_video,expected", [
    (384, (2, 6)),  # a 16 x 24 image
    (2160, (9, 34)),  # the embedded pipeline's 5 x 18 x 24 video
    (32760, (128, 512)),  # Wan 480p: the caps (the former fixed defaults)
    (10**6, (128, 512)),
    (20, (1, 1)),
])
def test_default_counts_follow_the_sequence_and_are_capped(n_video, expected):
    assert ClusterConfig().cluster_counts(n_video) == expected


def test_given_counts_are_honoured_and_capped_only_by_the_tokens():
    cfg = ClusterConfig(q_clusters=128, k_clusters=512, iters_first=50)
    assert cfg.cluster_counts(384) == (128, 384)
    assert cfg.cluster_counts(10**6) == (128, 512)
    assert cfg.cold_iters(6) == 50
    assert ClusterConfig(q_clusters=3).cluster_counts(384) == (3, 6)  # the other one still scales


def test_default_cold_iterations_follow_the_key_clusters():
    cfg = ClusterConfig()
    assert [cfg.cold_iters(k) for k in (1, 6, 34, 128, 512)] == [10, 10, 10, 16, 50]


def test_small_image_at_defaults_runs_little_kmeans():
    """A 384-token image (1 x 16 x 24), 2 steps: the defaults run 2 + 6 clusters and 10 cold / 2 warm
    iterations; their k-means work (token x cluster x feature products) stays under a tenth of dense
    attention's, where the former 128 / 512 x 50 cost more than dense attention itself."""
    grid, B, H, D = (1, 16, 24), 1, 4, 32
    n = 384
    gen = torch.Generator().manual_seed(0)
    method = make_method(ClusterConfig(block_size=64))
    ctx = _context(CallShape(grid, 0, "none"), B, H, None)
    for step in range(2):
        ctx = dataclasses.replace(ctx, step=step)
        q, k = (torch.randn(B, n, H, D, generator=gen) for _ in range(2))
        plan = method.decide(ctx, q, k)
        assert plan is not None and torch.isfinite(plan.density)
    assert ctx.reports["cluster.clusters"]["t.0.cond"] == (2, 6)
    iters = {step: ctx.counters[("kmeans_iters", "t", step)] for step in range(2)}
    assert iters == {0: 2 * 10, 1: 2 * 2}
    kmeans_work = sum(iters.values()) / 2 * n * (2 + 6) * H * B * D  # assign products, queries + keys
    dense_work = 2 * 2 * n * n * H * B * D  # two steps of q.k and p.v
    assert kmeans_work < 0.1 * dense_work
    former = 2 * 50 * n * (128 + 384) * H * B * D
    assert former > dense_work
