"""What a ``SparsePlan`` says it computes, in float64 and model token order, from the plan's own block
maps (``full_blocks`` / ``any_blocks``) and token rule (``block_mask.mask_mod``) -- never from the
BlockMask's index lists, so an executor that drops or ignores those lists disagrees with it.

Shared by the plan property test and the backend tests.
"""

from __future__ import annotations

import torch

from ditaccel.layout import PAD, TEXT, VIDEO


def slot_token_mask(plan, B: int, H: int) -> torch.Tensor:
    """[B, H, n_slots, n_slots] bool: may query slot i see key slot j under ``plan``."""
    layout = plan.layout
    n, bs = layout.num_slots, layout.block_size
    full, anyb = plan.full_blocks, plan.any_blocks
    while full.dim() < 4:
        full, anyb = full.unsqueeze(0), anyb.unsqueeze(0)
    full = full.cpu().expand(B, H, -1, -1)
    anyb = anyb.cpu().expand(B, H, -1, -1)

    def tokens(blocks):
        return blocks.repeat_interleave(bs, -2).repeat_interleave(bs, -1)[..., :n, :n]

    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(H).view(1, H, 1, 1)
    qi = torch.arange(n).view(1, 1, n, 1)
    ki = torch.arange(n).view(1, 1, 1, n)
    mask_mod = plan.block_mask.mask_mod
    device = plan.full_blocks.device
    rule = torch.as_tensor(mask_mod(b.to(device), h.to(device), qi.to(device), ki.to(device))).cpu()
    rule = rule.expand(B, H, n, n)
    return tokens(full) | (tokens(anyb & ~full) & rule)


def model_token_mask(plan, B: int, H: int) -> torch.Tensor:
    """[B, H, S, S] bool in the model's token order (empty slots dropped)."""
    slots = slot_token_mask(plan, B, H)
    inverse = plan.layout.inverse.cpu()
    if inverse.dim() == 1:
        return slots[:, :, inverse][:, :, :, inverse]
    # Per-head layouts: q and k of head h both go through that head's own permutation.
    return torch.stack([slots[:, hh][:, inverse[hh]][:, :, inverse[hh]] for hh in range(H)], dim=1)


def masked_attention_float64(q, k, v, allowed, scale=None) -> torch.Tensor:
    """q, k, v [B, S, H, D]; allowed [B, H, S, S] -> [B, S, H, D] float64; rows seeing nothing give 0."""
    qd, kd, vd = (x.double().transpose(1, 2).cpu() for x in (q, k, v))
    scale = qd.shape[-1] ** -0.5 if scale is None else float(scale)
    logits = (qd @ kd.transpose(-1, -2)) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, -1).nan_to_num(0.0)
    return (probs @ vd).transpose(1, 2)


def plan_reference(plan, q, k, v, scale=None) -> torch.Tensor:
    """The float64 output ``plan`` describes for q, k, v [B, S, H, D] (model order)."""
    B, _, H, _ = q.shape
    return masked_attention_float64(q, k, v, model_token_mask(plan, B, H), scale)


def check_shared_rules(plan, B: int, H: int) -> None:
    """The rules every plan shares, token by token: no query sees an empty slot; text query rows
    see every real key; every real query sees every text key; each real query sees something."""
    layout = plan.layout
    slots = slot_token_mask(plan, B, H)
    kind = layout.kind
    real = kind != PAD
    assert not slots[..., ~real].any(), "a query attends to an empty slot"
    text = kind == TEXT
    if text.any():
        assert slots[:, :, text][..., real].all(), "a text query row is not dense"
        assert slots[:, :, real][..., text].all(), "a query does not see every text key"
    video = kind == VIDEO
    assert slots[:, :, video].any(-1).all(), "a video query sees no key"
