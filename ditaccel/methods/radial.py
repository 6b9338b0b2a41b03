"""radial: the static spatio-temporal energy-decay mask of Radial Attention (Li et al., 2025).

Attention energy in video DiTs falls with temporal distance, and the spatial spread that still
matters shrinks as it does. The mask, token-exact, for a query in latent frame i and a key in frame
j at temporal distance ``d = |i - j|`` (``n = H * W`` tokens per frame, ``p`` a token's raster index
inside its frame):

- **attention sink**: keys in the first ``sink_frames`` frames are seen by every query;
- **whole frames** at ``d <= 1`` (the frame itself and its neighbours);
- at ``d >= 2``, with ``g = floor(log2 d) + 1`` the distance's band (2-3: 2, 4-7: 3, ...):
  ``base = 2 ** bit_length(n) * decay ** g`` and the key is seen when
  ``|p_q - p_k| <= max(decay_factor * base, band_floor)``; where ``base < band_floor`` the band
  would be narrower than a block, and the frame pair is kept only when ``d`` is a multiple of
  ``int(band_floor / base)`` (fewer frames instead of thinner bands);
- text rows and columns are dense (every plan's rule).

Knobs against the published code (``radial_attn/attn_mask.py``, ``get_window_width`` and
``get_diagonal_split_mask``):

- ``decay_factor`` **is** the paper's ``decay_factor`` (published: 0.2 on Wan 2.1, 0.8 on Wan 2.2,
  0.95 on HunyuanVideo, see the family presets); it scales the band at every distance >= 2;
- ``decay`` is ours, not the paper's: the factor the band shrinks by per doubling of distance.
  The paper halves it: ``decay=0.5`` (the default) is the published rule;
- ``band_floor`` is the reference's block size (128) in its two roles: the narrowest band and
  the threshold under which frame pairs are subsampled;
- ``sink_frames=1`` is the reference's sink (key frame 0);
- ``dense_steps`` / ``dense_layers`` are the paper's ``dense_timestep`` / ``dense_block``.

Two differences, both stated: the reference's ``model_type="wan"`` halves the band at ``d == 1``;
we keep whole frames at ``d <= 1`` for every model (its ``"hunyuan"`` rule, and the paper's). And
the reference ANDs its frame subsampling into ``d <= 1`` too, which drops neighbouring frames once
a frame has fewer than 128 tokens (only on toy grids); we never drop them. The reference then
coarsens the mask to 128-token blocks (a block is kept when most of it is); we run the mask
token-exact: blocks on the band's edge are partial and masked inside the kernel. ``order="raster"``
(the default) is the reference's token order, where each band is a diagonal strip of blocks.
Built once per shape and cached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..block_geometry import RadialRule
from ..config import ORDERS, AttentionConfig, check_block_tile, knob
from .base import AttentionMethod


@dataclass(frozen=True)
class RadialConfig(AttentionConfig):
    """Radial attention: a band over each frame's tokens that narrows with temporal distance, plus sink frames."""

    method = "radial"
    decay_factor: float = knob(1.0, "float", low=0.0, high=1.0, low_open=True,
                               help="the paper's decay_factor: scales the band at every distance >= 2")
    decay: float = knob(0.5, "float", low=0.0, high=1.0, low_open=True,
                        help="band factor per doubling of temporal distance (0.5: the paper's halving; 1: no decay)")
    sink_frames: int = knob(1, "int", low=0, help="leading frames every query sees (attention sink)")
    band_floor: int = knob(128, "int", low=1, help="narrowest band in tokens; narrower bands keep fewer frame "
                                                   "pairs instead (the reference's block size, 128)")
    tile: tuple[int, ...] | None = knob(None, "optional_axes", help="token tile for order='tile' (as in TileConfig)")
    order: str = knob("raster", "choice", choices=ORDERS,
                      help="token order of the kernel's blocks (raster: the reference's)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tile is not None:
            object.__setattr__(self, "tile", check_block_tile(self, self.tile, self.block_size))


def radial_bands(num_frames: int, tokens_per_frame: int, decay: float, decay_factor: float,
                 band_floor: int) -> list[int]:
    """Per temporal distance d in [0, num_frames): the band ``|p_q - p_k| <= band`` in tokens, or -1
    where the frame pair is left out (sink frames aside)."""
    n = tokens_per_frame
    span = 2 ** n.bit_length()
    bands = []
    for d in range(num_frames):
        if d <= 1:
            bands.append(n)
            continue
        base = span * decay ** d.bit_length()
        if base < band_floor and d % max(1, int(band_floor / base)) != 0:
            bands.append(-1)
            continue
        bands.append(min(n, math.floor(max(decay_factor * base, band_floor))))
    return bands


class RadialMethod(AttentionMethod):
    name = "radial"

    def order(self) -> str:
        return self.config.order

    def bands(self, grid) -> list[int]:
        T, H, W = grid
        cfg = self.config
        return radial_bands(T, H * W, cfg.decay, cfg.decay_factor, cfg.band_floor)

    def box_rule(self, grid) -> RadialRule:
        return RadialRule(grid, self.bands(grid), self.config.sink_frames)

    def video_predicate(self, grid):
        T, H, W = grid
        cfg = self.config
        bands = torch.tensor(self.bands(grid))
        sink = cfg.sink_frames

        def allowed(qc: torch.Tensor, kc: torch.Tensor) -> torch.Tensor:
            d = (qc[..., 0] - kc[..., 0]).abs()
            band = bands.to(qc.device)[d.clamp(min=0, max=T - 1)]
            dp = ((qc[..., 1] - kc[..., 1]) * W + (qc[..., 2] - kc[..., 2])).abs()
            return (kc[..., 0] < sink) | (dp <= band)

        return allowed
