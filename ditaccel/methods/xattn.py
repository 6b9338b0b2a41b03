"""xattn: dynamic block selection scored by strided anti-diagonals (XAttention).

Each (query block, key block) pair of video blocks is scored by the attention mass of its strided
anti-diagonals: with ``stride`` s, one s x s tile of q.k^T contributes the sum along its
anti-diagonal, a cheap estimate of the block's total that sees every query and every key. Each
query block's scores (over the video key blocks) are normalised to sum to 1, and key blocks are
kept, largest first, until the cumulative score reaches ``threshold``; the diagonal block and the
text blocks are kept on top of that (text rows and columns are always dense, never scored).
[XAttention: up to 13.5x attention speedup]
Scoring and selection are ``kernels.scoring``'s (a Triton kernel on CUDA, its torch twin elsewhere);
reuse across steps and skip propagation are ``dynamic.DynamicMethod``'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import knob
from ..kernels.scoring import antidiagonal_block_scores, select_blocks
from .dynamic import DynamicConfig, DynamicMethod, keep_from_lists


@dataclass(frozen=True)
class XAttnConfig(DynamicConfig):
    """Keep key blocks, largest anti-diagonal score first, until their cumulative score reaches ``threshold``."""

    method = "xattn"
    threshold: float = knob(0.9, "float", low=0.0, high=1.0, low_open=True,
                            help="cumulative normalised score the kept key blocks of a query block reach")
    stride: int = knob(8, "int", choices=(8, 16), help="anti-diagonal stride: one sample per stride x stride tile")


class XAttnMethod(DynamicMethod):
    name = "xattn"

    def block_scores(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return antidiagonal_block_scores(q, k, self.config.block_size, stride=self.config.stride)

    def select_video_blocks(self, scores: torch.Tensor) -> torch.Tensor:
        return keep_from_lists(*select_blocks(scores, cdf=self.config.threshold, keep_diagonal=True))
