"""Seeded random block-sparse attention cases, shared by the executors' tests (Triton, grouped).

A case draws shapes, head dims, block sizes (square or not), tile sizes dividing them, ragged
lengths, text prefix/suffix spans, broadcast or per-(b, h) block lists, full/partial/empty block
patterns (both consistent with the mask and arbitrary), mask_mods of several families (windows,
causal, lookup tables, per-head, per-batch), input layouts (BHSD, a BSHD transpose view, strided
slices), fp16 and fp32; with the float64 dense-masked attention every executor must match.
"""

from __future__ import annotations

import random

import torch
from torch.nn.attention.flex_attention import BlockMask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def mask_mod_family(rng: random.Random, B, H, Sq, Skv, device):
    """A random mask_mod written with broadcasting tensor ops, and its description."""
    kind = rng.choice(["window", "causal", "anticausal", "table", "block_table", "per_head", "per_batch", "all", "none",
                       "noop"])
    if kind == "noop":  # BlockMask gets mask_mod=None (FlexAttention's noop_mask): partial blocks unmasked
        return None, "noop"
    if kind == "window":
        w = rng.randint(0, 120)
        ratio = Skv / Sq  # align the window's centre when lengths differ

        def base(b, h, q, kv):
            return ((q * ratio).floor() - kv).abs() <= w
    elif kind == "causal":
        def base(b, h, q, kv):
            return q >= kv
    elif kind == "anticausal":
        def base(b, h, q, kv):
            return kv >= q
    elif kind == "table":
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        table = (torch.rand(Sq, Skv, generator=g) < rng.uniform(0.05, 0.95)).to(device)

        def base(b, h, q, kv):  # indexes with the raw indices: the kernel must clamp them
            return table[q, kv]
    elif kind == "block_table":
        gran = rng.choice([16, 32, 48, 64])
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        table = (torch.rand(-(-Sq // gran), -(-Skv // gran), generator=g) < 0.5).to(device)

        def base(b, h, q, kv):
            return table[q // gran, kv // gran]
    elif kind == "per_head":
        widths = torch.tensor([rng.randint(0, 100) for _ in range(H)], device=device)

        def base(b, h, q, kv):
            return (q - kv).abs() <= widths[h]
    elif kind == "per_batch":
        lens = torch.tensor([rng.randint(0, Skv) for _ in range(B)], device=device)

        def base(b, h, q, kv):
            return kv < lens[b]
    elif kind == "all":
        def base(b, h, q, kv):
            return q >= 0
    else:
        def base(b, h, q, kv):
            return q < 0

    text = rng.choice(["none", "prefix", "suffix"])
    n_text = rng.randint(1, 40) if text != "none" else 0

    def mask_mod(b, h, q, kv):
        ok = base(b, h, q, kv)
        if text == "prefix":  # text rows and columns are dense
            ok = ok | (q < n_text) | (kv < n_text)
        elif text == "suffix":
            ok = ok | (q >= Sq - n_text) | (kv >= Skv - n_text)
        return ok

    return mask_mod, f"{kind}/text={text}:{n_text}"


def dense_token_mask(mask_mod, B, H, Sq, Skv, device):
    if mask_mod is None:
        return torch.ones(B, H, Sq, Skv, dtype=torch.bool, device=device)
    b = torch.arange(B, device=device).view(B, 1, 1, 1)
    h = torch.arange(H, device=device).view(1, H, 1, 1)
    q = torch.arange(Sq, device=device).view(1, 1, Sq, 1)
    kv = torch.arange(Skv, device=device).view(1, 1, 1, Skv)
    return torch.as_tensor(mask_mod(b, h, q, kv)).expand(B, H, Sq, Skv).to(torch.bool)


def lists_from_states(states: torch.Tensor, want: int, rng: random.Random, gen: torch.Generator):
    """[Bm, Hm, nq, nk] bool -> (num [Bm, Hm, nq], idx [Bm, Hm, nq, nk]) int32, shuffled, garbage-filled."""
    Bm, Hm, nq, nk = states.shape
    num = states.sum(-1).to(torch.int32)
    idx = torch.randint(0, nk, (Bm, Hm, nq, nk), generator=gen, dtype=torch.int32)  # garbage slots
    for bm in range(Bm):
        for hm in range(Hm):
            for i in range(nq):
                chosen = torch.nonzero(states[bm, hm, i]).flatten().tolist()
                rng.shuffle(chosen)  # the kernel must not depend on list order
                idx[bm, hm, i, : len(chosen)] = torch.tensor(chosen, dtype=torch.int32)
    return num, idx


def random_case(seed: int, device=DEVICE):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    B, H = rng.randint(1, 2), rng.randint(1, 3)
    D = rng.choice([64, 96, 128])
    BQ, BK = rng.choice([64, 128]), rng.choice([64, 128])
    even = rng.random() < 0.15  # mostly ragged lengths; sometimes exact multiples

    def length(bs):
        if even:
            return bs * rng.randint(1, max(1, 300 // bs))
        n = rng.randint(1, 300)
        return n + 1 if n % bs == 0 else n

    Sq, Skv = length(BQ), length(BK)
    # The interpreter pays per program and per tile: keep B * H * Sq * Skv moderate.
    while B * H * Sq * Skv > 2 * 300 * 300 and H > 1:
        H -= 1
    dtype = rng.choice([torch.float16, torch.float32])
    nq, nk = -(-Sq // BQ), -(-Skv // BK)

    mask_mod, desc = mask_mod_family(rng, B, H, Sq, Skv, device)
    token = dense_token_mask(mask_mod, B, H, Sq, Skv, device).cpu()
    Bm = rng.choice([1, B])
    Hm = rng.choice([1, H])

    # Block states: 0 empty, 1 partial, 2 full.
    mode = rng.choice(["consistent", "consistent", "random"])
    if mode == "consistent":
        padded = torch.zeros(B, H, nq * BQ, nk * BK, dtype=torch.int8)
        padded[:, :, :Sq, :Skv] = token.to(torch.int8)
        care = torch.zeros(nq * BQ, nk * BK, dtype=torch.bool)
        care[:Sq, :Skv] = True
        blocks = padded.view(B, H, nq, BQ, nk, BK)
        care_b = care.view(nq, BQ, nk, BK)
        any_ = (blocks.bool() & care_b).any(5).any(3)  # [B, H, nq, nk]
        all_ = (blocks.bool() | ~care_b).all(5).all(3)
        # Broadcast lists must be right for every (b, h) they stand for.
        any_ = any_.any(0, keepdim=True) if Bm == 1 else any_
        any_ = any_.any(1, keepdim=True) if Hm == 1 else any_
        all_ = all_.all(0, keepdim=True) if Bm == 1 else all_
        all_ = all_.all(1, keepdim=True) if Hm == 1 else all_
        states = torch.where(all_ & any_, 2, torch.where(any_, 1, 0))
        noise = torch.rand(states.shape, generator=gen)
        states = torch.where((states == 2) & (noise < 0.15), 1, states)  # full -> partial
        states = torch.where((states == 0) & (noise < 0.1), 1, states)  # empty -> partial (all masked)
        states = torch.where((states == 1) & (noise > 0.95), 0, states)  # drop a partial block
    else:
        r = torch.rand(Bm, Hm, nq, nk, generator=gen)
        states = torch.where(r < 0.3, 2, torch.where(r < 0.7, 1, 0))

    part_num, part_idx = lists_from_states(states == 1, nk, rng, gen)
    no_full_lists = not bool((states == 2).any()) and rng.random() < 0.5
    if no_full_lists:
        full_num = full_idx = None
    else:
        full_num, full_idx = lists_from_states(states == 2, nk, rng, gen)
    block_mask = BlockMask.from_kv_blocks(
        part_num.to(device), part_idx.to(device),
        None if full_num is None else full_num.to(device), None if full_idx is None else full_idx.to(device),
        BLOCK_SIZE=(BQ, BK), mask_mod=mask_mod, seq_lengths=(Sq, Skv),
    )

    # Effective mask: full blocks, plus partial blocks where mask_mod allows.
    def expand(s):
        s = s.expand(B, H, nq, nk)
        return s.repeat_interleave(BQ, 2).repeat_interleave(BK, 3)[:, :, :Sq, :Skv]

    allowed = expand(states == 2) | (expand(states == 1) & token)

    amp = rng.choice([1.0, 1.0, 3.0])  # sharper softmax now and then
    q = relayout((torch.randn(B, H, Sq, D, generator=gen) * amp).to(dtype), rng)
    k = relayout(torch.randn(B, H, Skv, D, generator=gen).to(dtype), rng)
    v = relayout(torch.randn(B, H, Skv, D, generator=gen).to(dtype), rng)
    tiles = dict(
        block_m=rng.choice([BQ, BQ // 2]), block_n=rng.choice([BK, BK // 2]),
        longest_first=rng.random() < 0.7,
    )
    desc = (f"seed={seed} B={B} H={H} Sq={Sq} Skv={Skv} D={D} BS=({BQ},{BK}) {dtype} mask={desc} "
            f"mode={mode} lists=({Bm},{Hm}) no_full={no_full_lists} tiles={tiles}")
    return q.to(device), k.to(device), v.to(device), block_mask, allowed.to(device), tiles, desc


def relayout(x: torch.Tensor, rng: random.Random) -> torch.Tensor:
    B, H, S, D = x.shape
    layout = rng.choice(["bhsd", "bshd", "strided"])
    if layout == "bshd":
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if layout == "strided":
        big = torch.zeros(B, H, S, 2 * D, dtype=x.dtype)
        big[..., ::2] = x
        return big[..., ::2]
    return x.contiguous()


def dense_reference(q, k, v, allowed, scale=None):
    """float64 softmax attention under a dense boolean mask; rows with nothing allowed -> 0."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    s = s.masked_fill(~allowed, float("-inf"))
    row_any = allowed.any(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(~row_any, 0.0), dim=-1) * row_any
    return torch.einsum("bhqk,bhkd->bhqd", p, v.double())


TOL = {torch.float16: 2e-3, torch.float32: 2e-5, torch.bfloat16: 1.6e-2}


def check_output(out, ref, allowed, dtype, desc):
    assert not torch.isnan(out).any(), f"NaN or unwritten (poisoned) elements: {desc}"
    assert torch.isfinite(out).all(), f"non-finite output: {desc}"
    # Rows with no allowed key are exactly zero.
    empty = ~allowed.any(-1)
    if empty.any():
        assert (out[empty] == 0).all(), f"rows with no allowed key are not zero: {desc}"
    err = (out.double() - ref).norm() / ref.norm().clamp_min(1e-12)
    tol = TOL[dtype]
    assert err <= tol, f"relative error {err:.2e} > {tol}: {desc}"
    max_err = (out.double() - ref).abs().max()
    assert max_err <= 10 * tol * ref.abs().max().clamp_min(1.0), f"max abs error {max_err:.2e}: {desc}"
