"""topk: dynamic block selection from mean-pooled q and k.

Each call's q and k are averaged over every block of video tokens (in the layout's slot order); a
query block's scores are the softmax over video key blocks of pooled-q . pooled-k / sqrt(D); it
keeps the ``topk`` fraction of the n video key blocks (``ceil(topk * n)``, at least 1) or, with
``cdf``, the smallest set, largest first, whose cumulative score reaches ``cdf``. The diagonal
block and the text blocks are kept on top of that (text blocks are never scored: text rows and
columns are always dense). [SpargeAttn, VSA coarse stage, AdaSpa, VMoBA, MInference]
Scoring and selection are ``kernels.scoring``'s (a Triton kernel on CUDA, its torch twin elsewhere);
reuse across steps and skip propagation are ``dynamic.DynamicMethod``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import knob
from ..kernels.scoring import mean_pool_block_scores, select_blocks
from .dynamic import DynamicConfig, DynamicMethod, keep_from_lists

DEFAULT_TOPK = 0.25  # the rule when neither topk nor cdf is given


@dataclass(frozen=True)
class TopKConfig(DynamicConfig):
    """Keep the ``topk`` fraction of key blocks per query block, or the smallest set reaching ``cdf``."""

    method = "topk"
    topk: float | None = knob(
        None, "optional_float", low=0.0, high=1.0, low_open=True,
        help=f"fraction of key blocks each query block keeps (None: {DEFAULT_TOPK} unless cdf is set)")
    cdf: float | None = knob(
        None, "optional_float", low=0.0, high=1.0, low_open=True,
        help="keep the fewest key blocks whose cumulative score reaches this instead (None: use topk)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.topk is not None and self.cdf is not None:
            raise ValueError(f"TopKConfig.topk={self.topk} and TopKConfig.cdf={self.cdf}: give at most one "
                             f"of them (set the other to None); with neither, topk={DEFAULT_TOPK}")

    def selection_rule(self) -> dict:
        """The keyword ``select_blocks`` takes: {"cdf": ...} or {"topk": ...}."""
        if self.cdf is not None:
            return {"cdf": self.cdf}
        return {"topk": DEFAULT_TOPK if self.topk is None else self.topk}


class TopKMethod(DynamicMethod):
    name = "topk"

    def block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return mean_pool_block_scores(q, k, self.config.block_size)

    def select_video_blocks(self, scores: torch.Tensor) -> torch.Tensor:
        return keep_from_lists(*select_blocks(scores, keep_diagonal=True, **self.config.selection_rule()))
