"""dense: every block, through ditaccel's whole path (layout, BlockMask, kernel, inverse order).

Its output matches the unwrapped model to float tolerance; it is the control for every other
method and the way to time our kernel's dense plan against the model's own attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import AttentionConfig
from .base import AttentionMethod


@dataclass(frozen=True)
class DenseConfig(AttentionConfig):
    method = "dense"


class DenseMethod(AttentionMethod):
    name = "dense"

    def is_dense(self, layer: int, step: int, dense_steps: int | None = None) -> bool:
        return False  # run the all-blocks plan even where other methods would fall back to dense

    def order(self) -> str:
        return "raster"

    def video_predicate(self, grid):
        return lambda qc, kc: torch.ones(torch.broadcast_shapes(qc.shape[:-1], kc.shape[:-1]), dtype=torch.bool,
                                         device=qc.device)
