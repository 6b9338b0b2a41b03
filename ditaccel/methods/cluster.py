"""cluster: semantic reordering by k-means, block selection by centroid-pair scores (Sparse VideoGen2).

Tokens that attend to each other are often far apart on the grid but close in key space (the same
object in every frame). Per head, k-means groups the video keys into ``k_clusters`` clusters and
the video queries into ``q_clusters`` clusters; the head's video tokens are then permuted so each
key cluster is contiguous, and the blocks of that order are scored from the centroids alone:

* centroid-pair score: ``P[i, j] = size_j * exp(cq_i . ck_j * scale) / sum_j' size_j' * exp(...)``,
  the attention mass a query of cluster i puts on key cluster j if every key of a cluster were its
  centroid; one key of cluster j gets ``P[i, j] / size_j``;
* block score: query block ``a``, key block ``b``: the mean over the video queries of ``a`` of the
  mass they put on the video keys of ``b`` (from the cluster labels of both blocks); each video
  query block's row sums to 1 over the video key blocks;
* selection: per query block, key blocks largest first until their cumulative score reaches
  ``top_p`` (``select_blocks(cdf=top_p)``, the same rule ``topk``'s ``cdf`` uses); the diagonal
  block is always kept, text rows and columns are dense (``plan_from_blocks``).

**One permutation per head, from the key clusters.** Our layout gives q and k one shared slot order
per head (``per_head_layout``), where SVG2 permutes queries and keys separately. We sort each head's
video tokens by (key cluster, query cluster, raster index): key blocks are as pure as k-means makes
them (a cluster larger than a block fills whole blocks of its own), and inside a key cluster the
tokens of one query cluster sit together, so query blocks are as pure as the key order allows. The
query clusters are still used for scoring, at block granularity (the per-block cluster histogram
above), so a query block that mixes clusters is scored as the mixture it is. Selection is always over
the real blocks of the real order, so sharing costs at most density, never correctness; on the
embedded Wan pipeline an oracle selection (true block masses) with separate q / k orders was no
better than with the shared one (density within 0.02 at the same top_p, same output error).

**Batch.** The permutation is per head, shared by the batch (CFG-batched calls, several prompts):
k-means runs on each token's vectors of every batch element side by side ([N, B * D] per head), so
a token's label is shared by the batch, and a centroid's slice b is the mean over its members of
batch element b. Scores and the selection are per batch element (plan ``[B, H, nq, nk]``).

**Sizes.** By default (``0``) the cluster counts and the cold-start iterations follow the sequence
(``ClusterConfig.cluster_counts``, ``cold_iters``): one key cluster per 64 video tokens and one query
cluster per 256, capped at 512 / 128 (reached at video sizes), so a small image does not pay for a
video's k-means; given values are used as they are (capped at the number of video tokens).

**Across steps.** Centroids are kept per (transformer, layer, CFG branch) in ``ctx.state``: the
first sparse step runs ``iters_first`` Lloyd iterations from a seeded k-means++ pick of tokens, later
steps ``iters_step`` iterations from the stored centroids (SVG2's warm start: k-means is cheap once
the centroids are close). A new pipeline call or shape drops them (``StateStore``); when the memory
budget refuses them the next step starts cold again. A plan asked for at a dense step (renormalise
measuring the mass a plan keeps) clusters and stores too, so the first sparse step then starts warm.
``ctx.count("kmeans")`` counts k-means runs
(two per call: queries, keys) and ``ctx.count("kmeans_iters", n)`` their Lloyd iterations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AttentionConfig, knob
from ..kernels.scoring import select_blocks
from ..layout import TokenLayout, build_layout, per_head_layout
from ..plan import SparsePlan, plan_from_blocks
from .base import AttentionMethod
from .dynamic import keep_from_lists

_INIT_SEED = 0  # the seeded pick of initial centroids: the same tokens on every call
_CHUNK_ELEMENTS = 2**26  # [heads, tokens, clusters] scores evaluated per chunk of tokens
_SEED_POOL = 16  # k-means++ draws its seeds among this many random tokens per cluster

# Default cluster counts follow the sequence: k-means costs tokens x clusters per iteration, and a key
# cluster much smaller than a kernel block only mixes blocks. At video sizes (~32k tokens) the caps
# are reached (SVG2's regime); a 384-token image gets 6 key and 2 query clusters and costs about
# what dense attention does.
TOKENS_PER_K_CLUSTER, MAX_AUTO_K_CLUSTERS = 64, 512
TOKENS_PER_Q_CLUSTER, MAX_AUTO_Q_CLUSTERS = 256, 128
# Cold-start Lloyd iterations follow the key clusters likewise (few clusters settle in a few passes);
# at the caps this is 50, the count SVG2 uses.
KEY_CLUSTERS_PER_ITER, MIN_AUTO_ITERS, MAX_AUTO_ITERS = 8, 10, 50


@dataclass(frozen=True)
class ClusterConfig(AttentionConfig):
    """k-means reordering per head; block pairs kept by cumulative centroid-pair score ``top_p``.

    SVG2's public configs use 300-400 query and 1000 key clusters for its variable-size blocks; with
    fixed kernel blocks, a key cluster smaller than a block only mixes blocks, hence fewer by default,
    and by default as many as the sequence needs (``cluster_counts``)."""

    method = "cluster"
    q_clusters: int = knob(0, "int", low=0, help=f"k-means clusters over each head's video queries (0: one per "
                                                  f"{TOKENS_PER_Q_CLUSTER} video tokens, at most {MAX_AUTO_Q_CLUSTERS}; "
                                                  f"always capped at the number of video tokens)")
    k_clusters: int = knob(0, "int", low=0, help=f"k-means clusters over each head's video keys; their order makes "
                                                  f"the blocks (0: one per {TOKENS_PER_K_CLUSTER} video tokens, at most "
                                                  f"{MAX_AUTO_K_CLUSTERS}; always capped at the number of video tokens)")
    top_p: float = knob(0.9, "float", low=0.0, high=1.0, low_open=True,
                        help="keep key blocks per query block until their cumulative score reaches this (1 = dense)")
    # Bounded: k-means converges in tens of iterations (SVG2 runs 50 cold, 2 warm); more only costs time.
    iters_first: int = knob(0, "int", low=0, high=200,
                            help=f"Lloyd iterations at a layer's first sparse step (cold start; 0: one per "
                                 f"{KEY_CLUSTERS_PER_ITER} key clusters, between {MIN_AUTO_ITERS} and {MAX_AUTO_ITERS})")
    iters_step: int = knob(2, "int", low=0, high=200, help="Lloyd iterations at later steps, from the stored centroids")

    def cluster_counts(self, n_video: int) -> tuple[int, int]:
        """(query clusters, key clusters) for ``n_video`` video tokens: the given counts, or with 0 the
        sequence-scaled defaults; never more than there are tokens."""
        def count(given: int, per: int, cap: int) -> int:
            wanted = given if given else min(cap, -(-n_video // per))
            return max(1, min(wanted, n_video))

        return (count(self.q_clusters, TOKENS_PER_Q_CLUSTER, MAX_AUTO_Q_CLUSTERS),
                count(self.k_clusters, TOKENS_PER_K_CLUSTER, MAX_AUTO_K_CLUSTERS))

    def cold_iters(self, k_clusters: int) -> int:
        """Lloyd iterations of a cold start with ``k_clusters`` key clusters: ``iters_first``, or with 0
        the scaled default."""
        if self.iters_first:
            return self.iters_first
        return min(MAX_AUTO_ITERS, max(MIN_AUTO_ITERS, -(-k_clusters // KEY_CLUSTERS_PER_ITER)))


# --- k-means, batched over heads ------------------------------------------------------------

def _token_chunk(heads: int, clusters: int, features: int) -> int:
    return max(1, _CHUNK_ELEMENTS // (heads * max(clusters, features)))


def assign(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid (squared L2) of every point: x [H, N, F], centroids [H, K, F] -> [H, N] int64.

    ``argmin |x - c|^2 = argmax (2 x.c - |c|^2)``, a chunk of tokens at a time so the [H, N, K] scores
    never exist whole. The products run in x's dtype (tensor cores on bf16 models: a near-tie may go
    either way, which only moves a token between two equally good clusters), the rest in float32."""
    c_sq = (centroids.float() ** 2).sum(-1)[:, None, :]
    c_t = centroids.to(x.dtype).transpose(1, 2)
    H, N, F = x.shape
    step = _token_chunk(H, centroids.shape[1], F)
    labels = torch.empty(H, N, dtype=torch.long, device=x.device)
    for n0 in range(0, N, step):
        labels[:, n0:n0 + step] = (2 * torch.bmm(x[:, n0:n0 + step], c_t).float() - c_sq).argmax(-1)
    return labels


def update(x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The mean of each cluster's points; a cluster left empty keeps its centroid. float32 [H, K, F]."""
    H, N, F = x.shape
    K = centroids.shape[1]
    sums = torch.zeros(H, K, F, dtype=torch.float32, device=x.device)
    counts = torch.zeros(H, K, dtype=torch.float32, device=x.device)
    step = _token_chunk(H, 1, F)
    for n0 in range(0, N, step):
        lab = labels[:, n0:n0 + step]
        sums.scatter_add_(1, lab[..., None].expand(-1, -1, F), x[:, n0:n0 + step].float())
        counts.scatter_add_(1, lab, torch.ones(lab.shape, dtype=torch.float32, device=x.device))
    means = sums / counts.clamp(min=1)[..., None]
    return torch.where(counts[..., None] > 0, means, centroids.float())


def initial_centroids(x: torch.Tensor, clusters: int) -> torch.Tensor:
    """k-means++ seeding per head (Arthur & Vassilvitskii, 2007): the first centroid a random token,
    each next one a token drawn with probability proportional to its squared distance to the nearest
    centroid so far, so well-separated groups each get a centroid where a uniform pick often puts two
    in one group and none in another. The draws are among a seeded random pool of ``_SEED_POOL``
    tokens per cluster (all tokens when fewer): the K sequential draws then cost K passes over the
    pool, not over every token. Seeded on x's device, so every call draws the same tokens.
    Returns ``clusters`` distinct tokens per head (while the points differ), [H, K, F] float32."""
    H, N, F = x.shape
    gen = torch.Generator(device=x.device).manual_seed(_INIT_SEED)
    if N > _SEED_POOL * clusters:
        pool = torch.rand(H, N, generator=gen, device=x.device).topk(_SEED_POOL * clusters, dim=1).indices
        x = x.gather(1, pool[..., None].expand(-1, -1, F))
    points = x.float()
    M = points.shape[1]
    rows = torch.arange(H, device=x.device)
    pick = torch.empty(H, clusters, dtype=torch.long, device=x.device)
    pick[:, 0] = torch.randint(M, (H,), generator=gen, device=x.device)
    nearest = torch.full((H, M), float("inf"), device=x.device)
    for j in range(1, clusters):
        dist = ((points - points[rows, pick[:, j - 1]][:, None, :]) ** 2).sum(-1)
        nearest = torch.minimum(nearest, dist)
        nearest.scatter_(1, pick[:, :j], 0.0)  # a chosen token is never drawn again
        # A head whose remaining tokens all coincide with chosen ones draws uniformly.
        weights = torch.where(nearest.sum(-1, keepdim=True) > 0, nearest, torch.ones_like(nearest))
        pick[:, j] = torch.multinomial(weights, 1, generator=gen).squeeze(-1)
    return points.gather(1, pick[..., None].expand(-1, -1, F))


def kmeans(x: torch.Tensor, centroids: torch.Tensor, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``iters`` Lloyd iterations (assign, then move each centroid to its cluster's mean) from
    ``centroids``; returns (centroids [H, K, F] float32, labels [H, N]) with every label the nearest
    of the returned centroids."""
    c = centroids.float()
    for _ in range(iters):
        c = update(x, assign(x, c), c)
    return c, assign(x, c)


def cluster_counts(labels: torch.Tensor, clusters: int) -> torch.Tensor:
    """Members per cluster: labels [H, N] -> [H, K] float32."""
    counts = torch.zeros(labels.shape[0], clusters, dtype=torch.float32, device=labels.device)
    return counts.scatter_add_(1, labels, torch.ones(labels.shape, dtype=torch.float32, device=labels.device))


# --- order and scores -----------------------------------------------------------------------

def cluster_order(k_labels: torch.Tensor, q_labels: torch.Tensor, q_clusters: int) -> torch.Tensor:
    """Per head, raster video indices sorted by (key cluster, query cluster, raster index): [H, N]."""
    key = k_labels * q_clusters + q_labels
    return torch.sort(key, dim=1, stable=True).indices


def _block_histogram(layout: TokenLayout, video_orders: torch.Tensor, labels: torch.Tensor,
                     clusters: int) -> torch.Tensor:
    """Per head, the video tokens of each block of ``layout`` counted by cluster: [H, n_blocks, K]."""
    H = labels.shape[0]
    video_slots = layout.device_index("video_slots", labels.device)
    block = (video_slots // layout.block_size)[None, :]
    slot_labels = labels.gather(1, video_orders)  # label of the token in each video slot
    hist = torch.zeros(H, layout.num_blocks * clusters, dtype=torch.float32, device=labels.device)
    hist.scatter_add_(1, block * clusters + slot_labels, torch.ones(slot_labels.shape, device=labels.device))
    return hist.view(H, layout.num_blocks, clusters)


def block_scores(layout: TokenLayout, video_orders: torch.Tensor, q_labels: torch.Tensor,
                 k_labels: torch.Tensor, q_centroids: torch.Tensor, k_centroids: torch.Tensor,
                 scale: float) -> torch.Tensor:
    """Estimated attention mass per (query block, key block), from the centroids: [B, H, nb, nb].

    ``q_centroids`` [B, H, Kq, D], ``k_centroids`` [B, H, Kk, D]; labels [H, N]. Rows of video query
    blocks sum to 1 over video key blocks; text and empty blocks score 0 (text is kept anyway)."""
    Kq, Kk = q_centroids.shape[2], k_centroids.shape[2]
    k_size = cluster_counts(k_labels, Kk)[None]  # [1, H, Kk]
    logits = torch.einsum("bhid,bhjd->bhij", q_centroids.float(), k_centroids.float()) * scale
    logits = logits + torch.log(k_size)[:, :, None, :]  # an empty cluster: log 0 = -inf, no mass
    per_key = torch.softmax(logits, dim=-1) / k_size.clamp(min=1)[:, :, None, :]  # mass on one key of cluster j
    q_hist = _block_histogram(layout, video_orders, q_labels, Kq)
    q_share = q_hist / q_hist.sum(-1, keepdim=True).clamp(min=1)  # query cluster mix of each block
    k_hist = _block_histogram(layout, video_orders, k_labels, Kk)
    return torch.matmul(torch.matmul(q_share[None], per_key), k_hist.transpose(1, 2)[None])


def keep_from_scores(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """``select_blocks(cdf=top_p)``, diagonal kept, as a boolean keep map [B, H, nq, nk]."""
    return keep_from_lists(*select_blocks(scores, cdf=top_p, keep_diagonal=True))


# --- the method -----------------------------------------------------------------------------

def _per_head_features(x: torch.Tensor) -> torch.Tensor:
    """[B, N, H, D] -> [H, N, B * D]: each token's vectors of every batch element side by side."""
    B, N, H, D = x.shape
    return x.permute(2, 1, 0, 3).reshape(H, N, B * D)


def _split_batch(centroids: torch.Tensor, batch: int) -> torch.Tensor:
    """[H, K, B * D] -> [B, H, K, D]."""
    H, K, F = centroids.shape
    return centroids.view(H, K, batch, F // batch).permute(2, 0, 1, 3)


class ClusterMethod(AttentionMethod):
    kind = "dynamic"
    name = "cluster"

    def _clusters(self, ctx, x: torch.Tensor, clusters: int, name: str, cold_iters: int) -> tuple[torch.Tensor, torch.Tensor]:
        """k-means of one head-batched point set, warm-started from ``ctx.state[name]`` if it fits;
        returns (centroids [H, K, F] float32, labels [H, N])."""
        stored = ctx.state.get(name)
        expected = (x.shape[0], clusters, x.shape[2])
        if stored is not None and tuple(stored.shape) == expected and stored.device == x.device:
            start, iters = stored, self.config.iters_step
        else:
            start, iters = initial_centroids(x, clusters), cold_iters
        centroids, labels = kmeans(x, start, iters)
        # Stored in the activations' dtype (half the bytes on bf16 models); a refusal means a cold start.
        ctx.state.put(name, centroids.to(x.dtype))
        ctx.count("kmeans")
        ctx.count("kmeans_iters", iters)
        return centroids, labels

    def plan_for(self, ctx, q: torch.Tensor, k: torch.Tensor) -> SparsePlan:
        shape = ctx.shape
        layout = build_layout(shape.grid, shape.text_len, shape.text_position, "raster", (1, 1, 1),
                              self.config.block_size)
        n_video = layout.num_video
        offset = shape.text_len if shape.text_position == "prefix" else 0
        B, _, _, D = q.shape
        q_points = _per_head_features(q[:, offset:offset + n_video])
        k_points = _per_head_features(k[:, offset:offset + n_video])
        kq, kk = self.config.cluster_counts(n_video)
        ctx.report("cluster.clusters", (kq, kk))  # what ran: handle.stats()["reports"]["cluster.clusters"]
        cold = self.config.cold_iters(kk)
        q_centroids, q_labels = self._clusters(ctx, q_points, kq, "cluster.q_centroids", cold)
        k_centroids, k_labels = self._clusters(ctx, k_points, kk, "cluster.k_centroids", cold)

        video_orders = cluster_order(k_labels, q_labels, kq)
        scores = block_scores(layout, video_orders, q_labels, k_labels, _split_batch(q_centroids, B),
                              _split_batch(k_centroids, B), D ** -0.5)
        keep = keep_from_scores(scores, self.config.top_p)
        return plan_from_blocks(per_head_layout(layout, video_orders), keep)


__all__ = ["ClusterConfig", "ClusterMethod", "assign", "block_scores", "cluster_order", "initial_centroids",
           "keep_from_scores", "kmeans", "update"]
