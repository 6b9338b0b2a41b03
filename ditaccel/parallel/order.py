"""The sequence diffusers' context parallelism hands an attention backend, mapped onto the model's own order.

diffusers splits each stream of a joint-attention model (text, latent) separately along the sequence:
rank r holds text chunk r and latent chunk r, and the model's processor joins them as it joins the
whole streams in one process ([text_r | latent_r] for text 'prefix', [latent_r | text_r] for
'suffix'). Once every rank's pieces are put side by side (Ulysses' all-to-all, or ditaccel's own
exchange under ring), the sequence reads [text_0, latent_0, text_1, latent_1, ...], not the
[text | latent] the adapter and the plans describe. ``SequenceMap`` is the permutation between the
two, built once per (length, text span, degree, device).
"""

from __future__ import annotations

import torch


def parallel_positions(seq_len: int, text_len: int, text_position: str, degree: int) -> torch.Tensor | None:
    """[seq_len] long: for each position of the side-by-side parallel sequence, its position in the model's
    own single-process order; None when the two orders agree (no text in self-attention, or one rank)."""
    if degree == 1 or text_len == 0 or text_position == "none":
        return None
    if text_position not in ("prefix", "suffix"):
        raise ValueError(f"text_position must be 'none', 'prefix' or 'suffix' under context parallelism, "
                         f"got {text_position!r}")
    latent_len = seq_len - text_len
    first, second = (text_len, latent_len) if text_position == "prefix" else (latent_len, text_len)
    if first % degree or second % degree:
        raise ValueError(f"a sequence of {text_len} text + {latent_len} latent tokens does not split evenly "
                         f"over context-parallel degree {degree}")
    a, b = first // degree, second // degree
    rank = torch.arange(degree)[:, None]
    return torch.cat([rank * a + torch.arange(a), first + rank * b + torch.arange(b)], dim=1).flatten()


class SequenceMap:
    """Permutations between the parallel sequence and the model's order, cached per shape and device."""

    def __init__(self):
        self._cache: dict = {}

    def get(self, seq_len: int, text_len: int, text_position: str, degree: int, device):
        """(to_model, to_parallel) index tensors, or None if the orders agree: ``x.index_select(1, to_model)``
        puts a parallel-order sequence into model order, ``y.index_select(1, to_parallel)`` puts it back."""
        key = (seq_len, text_len, text_position, degree, str(device))
        if key not in self._cache:
            if len(self._cache) >= 64:  # a few shapes per pipeline; bound what a long-lived process keeps
                self._cache.clear()
            positions = parallel_positions(seq_len, text_len, text_position, degree)
            if positions is None:
                self._cache[key] = None
            else:
                to_model = torch.empty_like(positions)
                to_model[positions] = torch.arange(seq_len)
                self._cache[key] = (to_model.to(device), positions.to(device))
        return self._cache[key]


def reorder_mask(mask: torch.Tensor, index: torch.Tensor, seq_len: int) -> torch.Tensor:
    """An attention mask's key axis (its last) and query axis (its second to last, when that is the
    sequence too) permuted by ``index``."""
    if mask.shape[-1] == seq_len:
        mask = mask.index_select(-1, index)
    if mask.dim() >= 2 and mask.shape[-2] == seq_len:
        mask = mask.index_select(-2, index)
    return mask


__all__ = ["SequenceMap", "parallel_positions", "reorder_mask"]
