"""Block scoring for dynamic methods: Triton kernels vs torch reference vs brute-force Python.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1 set per test).
"""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch.nn.attention.flex_attention import BlockMask

from ditaccel.kernels import scoring
from ditaccel.kernels.scoring import (
    antidiagonal_block_scores, antidiagonal_block_scores_reference, antidiagonal_block_select,
    antidiagonal_block_select_reference, mean_pool_block_scores, mean_pool_block_scores_reference,
    mean_pool_block_select, mean_pool_block_select_reference, select_blocks,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _triton_mode(monkeypatch):
    if DEVICE == "cpu":
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def _kept_sets(num: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(num [B, H, nq], idx [B, H, nq, nk]) -> [B, H, nq, nk] bool of kept blocks."""
    nk = idx.shape[-1]
    slot_used = torch.arange(nk, device=idx.device) < num[..., None]
    keep = torch.zeros(idx.shape, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, idx.long(), slot_used)
    return keep


def _check_format(num, idx, B, H, nq, nk):
    assert num.dtype == torch.int32 and idx.dtype == torch.int32
    assert num.shape == (B, H, nq) and idx.shape == (B, H, nq, nk)
    # Every row is a permutation of the key blocks: kept ones first, ascending.
    assert (idx.sort(-1).values == torch.arange(nk, device=idx.device, dtype=torch.int32)).all()
    assert ((num >= 1) & (num <= nk)).all()
    for row_idx, n in zip(idx.reshape(-1, nk).tolist(), num.flatten().tolist()):
        assert row_idx[:n] == sorted(row_idx[:n]) and row_idx[n:] == sorted(row_idx[n:])


def _decisive_rows(scores: torch.Tensor, *, topk=None, cdf=None, margin=1e-5) -> torch.Tensor:
    """Rows whose selection cannot flip under score perturbations below ``margin``."""
    nk = scores.shape[-1]
    ranked = scores.sort(-1, descending=True).values
    if topk is not None:
        n = min(nk, max(1, math.ceil(topk * nk)))
        if n == nk:
            return torch.ones(scores.shape[:-1], dtype=torch.bool, device=scores.device)
        return (ranked[..., n - 1] - ranked[..., n]) > margin
    before = torch.cumsum(ranked, -1) - ranked
    gaps = ranked[..., :-1] - ranked[..., 1:]
    return ((before - cdf).abs() > margin).all(-1) & (gaps > margin).all(-1) | (cdf >= 1.0)


def _assert_same_selection(got, want, scores, desc, **rule):
    keep_got, keep_want = _kept_sets(*got), _kept_sets(*want)
    decisive = _decisive_rows(scores, **rule)
    assert decisive.float().mean() > 0.5, f"too many near-ties to compare: {desc}"
    same = (keep_got == keep_want).all(-1)
    assert same[decisive].all(), f"selections differ on decisive rows: {desc}"


# ----------------------------------------------------------------------------------------------
# Triton vs reference
# ----------------------------------------------------------------------------------------------


def _random_qk(rng: random.Random, gen: torch.Generator):
    B, H = rng.randint(1, 2), rng.randint(1, 3)
    D = rng.choice([64, 96, 128])
    bs = rng.choice([64, 128])
    Sq, Skv = rng.randint(1, 330), rng.randint(1, 330)
    dtype = rng.choice([torch.float16, torch.float32])
    q = torch.randn(B, H, Sq, D, generator=gen).to(dtype)
    k = torch.randn(B, Skv, H, D, generator=gen).to(dtype).transpose(1, 2)  # a BSHD view too
    # Structure so that pooled scores are not all alike: drifts along the sequence.
    q = q + 2 * (torch.randn(B, H, 1, D, generator=gen) * torch.linspace(-1, 1, Sq)[:, None]).to(dtype)
    k = k + 2 * (torch.randn(B, H, 1, D, generator=gen) * torch.linspace(1, -1, Skv)[:, None]).to(dtype)
    return q.to(DEVICE), k.to(DEVICE), bs, f"B={B} H={H} Sq={Sq} Skv={Skv} D={D} bs={bs} {dtype}"


@pytest.mark.parametrize("seed", range(10))
def test_mean_pool_triton_matches_reference(seed):
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    q, k, bs, desc = _random_qk(rng, gen)
    got = mean_pool_block_scores(q, k, bs)
    want = mean_pool_block_scores_reference(q, k, bs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    nk = want.shape[-1]
    text = torch.tensor([nk - 1]) if rng.random() < 0.5 else None
    for rule in (dict(topk=rng.choice([0.1, 0.3, 0.5])), dict(cdf=rng.choice([0.5, 0.8, 0.95]))):
        a = mean_pool_block_select(q, k, bs, **rule, always_keep_kv_blocks=text)
        b = mean_pool_block_select_reference(q, k, bs, **rule, always_keep_kv_blocks=text)
        _check_format(*a, *want.shape)
        _assert_same_selection(a, b, want, f"{desc} {rule}", **rule)


@pytest.mark.parametrize("seed", range(8))
def test_antidiagonal_triton_matches_reference(seed):
    rng, gen = random.Random(100 + seed), torch.Generator().manual_seed(100 + seed)
    q, k, bs, desc = _random_qk(rng, gen)
    stride = rng.choice([8, 16])
    got = antidiagonal_block_scores(q, k, bs, stride=stride)
    want = antidiagonal_block_scores_reference(q, k, bs, stride=stride)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    threshold = rng.choice([0.5, 0.9, 0.95])
    a = antidiagonal_block_select(q, k, bs, stride=stride, threshold=threshold)
    b = antidiagonal_block_select_reference(q, k, bs, stride=stride, threshold=threshold)
    _check_format(*a, *want.shape)
    _assert_same_selection(a, b, want, f"{desc} stride={stride} threshold={threshold}", cdf=threshold)


# ----------------------------------------------------------------------------------------------
# Reference vs brute force (pure Python loops, float64) on tiny inputs
# ----------------------------------------------------------------------------------------------


def _brute_select(rows, *, topk=None, cdf=None, keep_diagonal=True, always=()):
    """rows: per query block, a list of scores over key blocks -> per query block, a set of kept blocks."""
    kept = []
    for i, row in enumerate(rows):
        nk = len(row)
        order = sorted(range(nk), key=lambda j: (-row[j], j))
        if topk is not None:
            chosen = set(order[: min(nk, max(1, math.ceil(topk * nk)))])
        else:
            chosen, total = set(), 0.0
            for j in order:
                if total < cdf or cdf >= 1.0:
                    chosen.add(j)
                total += row[j]
        if keep_diagonal and i < nk:
            chosen.add(i)
        chosen |= set(always)
        kept.append(chosen)
    return kept


def _brute_mean_pool_scores(q, k, bs):
    S_q, S_k, D = len(q), len(k), len(q[0])

    def pool(x, S):
        out = []
        for start in range(0, S, bs):
            toks = x[start : min(S, start + bs)]
            out.append([sum(t[d] for t in toks) / len(toks) for d in range(D)])
        return out

    pq, pk = pool(q, S_q), pool(k, S_k)
    rows = []
    for a in pq:
        logits = [sum(x * y for x, y in zip(a, c)) / math.sqrt(D) for c in pk]
        m = max(logits)
        e = [math.exp(v - m) for v in logits]
        rows.append([v / sum(e) for v in e])
    return rows


def _brute_antidiagonal_scores(q, k, bs, stride):
    S_q, S_k, D = len(q), len(k), len(q[0])
    nq, nk = -(-S_q // bs), -(-S_k // bs)
    rpb = bs // stride
    sums = [[0.0] * nk for _ in range(nq)]
    for r in range(nq * rpb):
        if r * stride >= S_q:  # strided query row wholly past the end
            continue
        logits = {}
        for c in range(nk * rpb):
            if c * stride >= S_k:  # strided key wholly past the end
                continue
            total = 0.0
            for i in range(stride):  # anti-diagonal of the stride x stride tile
                qi, kj = r * stride + stride - 1 - i, c * stride + i
                if qi < S_q and kj < S_k:
                    assert (qi + kj) % stride == stride - 1
                    total += sum(x * y for x, y in zip(q[qi], k[kj]))
            logits[c] = total / math.sqrt(D) / stride
        m = max(logits.values())
        z = sum(math.exp(v - m) for v in logits.values())
        for c, v in logits.items():
            sums[r // rpb][c // rpb] += math.exp(v - m) / z
    return [[v / sum(row) for v in row] for row in sums]


def _as_sets(num, idx, b, h):
    return [set(idx[b, h, i, : num[b, h, i]].tolist()) for i in range(num.shape[2])]


@pytest.mark.parametrize("seed", range(4))
def test_mean_pool_reference_matches_brute_force(seed):
    rng, gen = random.Random(200 + seed), torch.Generator().manual_seed(200 + seed)
    Sq, Skv, D, bs = rng.randint(17, 90), rng.randint(17, 90), 16, 16
    q = torch.randn(1, 2, Sq, D, generator=gen, dtype=torch.float64).float()
    k = torch.randn(1, 2, Skv, D, generator=gen, dtype=torch.float64).float()
    always = [0]
    scores = mean_pool_block_scores_reference(q, k, bs)
    rows = [_brute_mean_pool_scores(q[0, h].tolist(), k[0, h].tolist(), bs) for h in range(2)]
    for h in range(2):
        torch.testing.assert_close(scores[0, h].double(), torch.tensor(rows[h], dtype=torch.float64),
                                   rtol=1e-5, atol=1e-6)
    for rule in (dict(topk=0.3), dict(topk=0.01), dict(cdf=0.6), dict(cdf=0.9)):
        for keep_diagonal in (True, False):
            num, idx = mean_pool_block_select_reference(
                q, k, bs, **rule, keep_diagonal=keep_diagonal, always_keep_kv_blocks=torch.tensor(always))
            for h in range(2):
                want = _brute_select(rows[h], **rule, keep_diagonal=keep_diagonal, always=always)
                assert _as_sets(num, idx, 0, h) == want, f"seed={seed} {rule} diag={keep_diagonal} h={h}"


@pytest.mark.parametrize("seed", range(4))
def test_antidiagonal_reference_matches_brute_force(seed):
    rng, gen = random.Random(300 + seed), torch.Generator().manual_seed(300 + seed)
    Sq, Skv, D, bs = rng.randint(17, 70), rng.randint(17, 70), 8, 16
    stride = rng.choice([4, 8])
    q = torch.randn(1, 1, Sq, D, generator=gen, dtype=torch.float64).float()
    k = torch.randn(1, 1, Skv, D, generator=gen, dtype=torch.float64).float()
    rows = _brute_antidiagonal_scores(q[0, 0].tolist(), k[0, 0].tolist(), bs, stride)
    scores = antidiagonal_block_scores_reference(q, k, bs, stride=stride)
    torch.testing.assert_close(scores[0, 0].double(), torch.tensor(rows, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    # The Triton twin agrees on the same tiny, odd-sized inputs (block 16, head dim 8).
    torch.testing.assert_close(antidiagonal_block_scores(q.to(DEVICE), k.to(DEVICE), bs, stride=stride).cpu(),
                               scores, rtol=1e-5, atol=1e-6)
    for threshold in (0.3, 0.7, 0.95):
        num, idx = antidiagonal_block_select_reference(q, k, bs, stride=stride, threshold=threshold)
        assert _as_sets(num, idx, 0, 0) == _brute_select(rows, cdf=threshold), f"seed={seed} t={threshold}"


# ----------------------------------------------------------------------------------------------
# Edge rules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("select, kw", [
    (mean_pool_block_select, dict(topk=1.0)),
    (mean_pool_block_select, dict(cdf=1.0)),
    (antidiagonal_block_select, dict(threshold=1.0)),
    (mean_pool_block_select_reference, dict(topk=1.0)),
    (mean_pool_block_select_reference, dict(cdf=1.0)),
    (antidiagonal_block_select_reference, dict(threshold=1.0)),
])
def test_fraction_one_keeps_everything(select, kw):
    torch.manual_seed(5)
    # A peaked input: most blocks carry ~0 probability, so only the "keep all" rule keeps them.
    q = torch.randn(1, 2, 300, 64, device=DEVICE) * 4
    k = torch.randn(1, 2, 300, 64, device=DEVICE) * 4
    num, idx = select(q, k, 64, keep_diagonal=False, **kw)
    assert (num == 5).all()
    assert (idx == torch.arange(5, device=DEVICE, dtype=torch.int32)).all()


def test_small_budgets_still_keep_diagonal_and_listed_blocks():
    torch.manual_seed(6)
    q, k = torch.randn(2, 2, 500, 64, device=DEVICE), torch.randn(2, 2, 520, 64, device=DEVICE)
    text = torch.tensor([8], device=DEVICE)  # e.g. the text block at the end of the keys
    for num, idx in (
        mean_pool_block_select(q, k, 64, topk=0.01, always_keep_kv_blocks=text),
        mean_pool_block_select(q, k, 64, cdf=0.01, always_keep_kv_blocks=text),
        antidiagonal_block_select(q, k, 64, threshold=0.01, always_keep_kv_blocks=text),
    ):
        keep = _kept_sets(num, idx)
        nq = keep.shape[2]
        diag = torch.arange(nq)
        assert keep[:, :, diag, diag].all() and keep[..., 8].all()
        # Besides the forced blocks, exactly one more at most (the single top block).
        assert (num <= 3).all()
    # Without forcing, topk=0.01 keeps exactly one block per row.
    num, _ = mean_pool_block_select(q, k, 64, topk=0.01, keep_diagonal=False)
    assert (num == 1).all()


def test_cdf_keeps_the_smallest_prefix_reaching_the_target():
    scores = torch.tensor([[[[0.1, 0.5, 0.15, 0.25], [0.7, 0.1, 0.1, 0.1]]]])
    num, idx = select_blocks(scores, cdf=0.65, keep_diagonal=False)
    assert _as_sets(num, idx, 0, 0) == [{1, 3}, {0}]
    num, idx = select_blocks(scores, cdf=0.75, keep_diagonal=False)
    assert _as_sets(num, idx, 0, 0) == [{1, 3}, {0, 1}]  # tie between 1, 2, 3: lower index first
    num, idx = select_blocks(scores, topk=0.5, keep_diagonal=True)
    row0, row1 = _as_sets(num, idx, 0, 0)
    assert row0 == {0, 1, 3}  # top two plus the diagonal
    assert {0, 1} <= row1 and len(row1) <= 3  # top one + one of a three-way tie, plus the diagonal


def test_selection_runs_in_our_kernel_as_full_blocks():
    """The lists plug into a BlockMask as full blocks; the kernel then equals dense masked attention."""
    torch.manual_seed(7)
    B, H, S, D, bs = 1, 2, 200, 64, 64
    q, k, v = (torch.randn(B, H, S, D, dtype=torch.float16, device=DEVICE) for _ in range(3))
    num, idx = mean_pool_block_select(q, k, bs, cdf=0.5)
    empty = torch.zeros_like(num)
    bm = BlockMask.from_kv_blocks(empty, idx, num, idx, BLOCK_SIZE=bs, seq_lengths=(S, S))
    from ditaccel.kernels.triton_attention import triton_block_sparse_attention

    out = triton_block_sparse_attention(q, k, v, bm)
    keep = _kept_sets(num, idx).repeat_interleave(bs, 2).repeat_interleave(bs, 3)[:, :, :S, :S]
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / math.sqrt(D)
    ref = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s.masked_fill(~keep, float("-inf")), -1), v.double())
    assert ((out.double() - ref).norm() / ref.norm()) < 2e-3


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------


_q = lambda *shape, dtype=torch.float32: torch.randn(*shape, dtype=dtype, device=DEVICE)  # noqa: E731


@pytest.mark.parametrize("call, match", [
    (lambda: mean_pool_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64), r"exactly one of topk and cdf"),
    (lambda: mean_pool_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64, topk=0.5, cdf=0.5),
     r"exactly one of topk and cdf"),
    (lambda: mean_pool_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64, topk=0.0), r"topk=0.0 is not allowed"),
    (lambda: mean_pool_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64, cdf=1.5), r"cdf=1.5 is not allowed"),
    (lambda: antidiagonal_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64, threshold=-1),
     r"threshold=-1 is not allowed"),
    (lambda: antidiagonal_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64, stride=3), r"stride=3 is not allowed"),
    (lambda: antidiagonal_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64, stride=128),
     r"stride=128 is not allowed"),
    (lambda: mean_pool_block_select(_q(1, 64, 64), _q(1, 1, 64, 64), 64, topk=0.5), r"q must be \[B, H, S, D\]"),
    (lambda: mean_pool_block_select(_q(1, 2, 64, 64), _q(1, 1, 64, 64), 64, topk=0.5),
     r"same batch and head counts"),
    (lambda: mean_pool_block_select(_q(1, 1, 64, 64, dtype=torch.float64), _q(1, 1, 64, 64, dtype=torch.float64),
                                    64, topk=0.5), r"q.dtype=torch.float64 is not allowed"),
    (lambda: mean_pool_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 48, topk=0.5), r"block_size=48 is not allowed"),
    (lambda: mean_pool_block_select(_q(1, 1, 64, 64), _q(1, 1, 64, 64), 64, topk=0.5,
                                    always_keep_kv_blocks=torch.tensor([0.5])), r"always_keep_kv_blocks must be"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(DEVICE != "cpu", reason="checks the CPU path without the interpreter")
def test_cpu_without_interpreter_uses_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    called = []
    real = scoring.mean_pool_block_scores_reference
    monkeypatch.setattr(scoring, "mean_pool_block_scores_reference",
                        lambda *a, **kw: called.append(1) or real(*a, **kw))
    q, k = torch.randn(1, 1, 100, 64), torch.randn(1, 1, 100, 64)
    mean_pool_block_scores(q, k, 64)
    assert called


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_selection_has_no_host_sync():
    q = torch.randn(1, 4, 4000, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(1, 4, 4000, 128, dtype=torch.bfloat16, device="cuda")
    text = torch.tensor([0, 1], device="cuda")
    mean_pool_block_select(q, k, 128, cdf=0.9, always_keep_kv_blocks=text)  # compile / warm up
    antidiagonal_block_select(q, k, 128, threshold=0.9, always_keep_kv_blocks=text)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        mean_pool_block_select(q, k, 128, cdf=0.9, always_keep_kv_blocks=text)
        mean_pool_block_select(q, k, 128, topk=0.2, always_keep_kv_blocks=text)
        antidiagonal_block_select(q, k, 128, threshold=0.9, always_keep_kv_blocks=text)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    a = antidiagonal_block_scores(q, k, 128)
    b = antidiagonal_block_scores_reference(q, k, 128)
    torch.testing.assert_close(a, b, rtol=2e-3, atol=1e-5)
