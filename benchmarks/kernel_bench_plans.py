"""Real plans from the methods, timed on a GPU (``kernel_bench.py --plans``; a benchmark, not a test).

For each shape (the real grids, ragged as they are) and each plan:

- static methods (``tile``, ``window``, ``radial`` at their default configs): the method's own plan
  (``make_method(config).plan``), its build seconds, its full/partial block counts;
- ``topk`` at the requested densities: mean-pool block scores of the call's q, k and
  ``select_blocks(topk=d)``, as the dynamic method selects (full blocks, no-op mask);

it times, with ``triton.testing.do_bench`` (median, warm-up first, random bf16 inputs):
``kernel`` (ours on the plan's BlockMask, slot order), ``path`` (permutation into slots + kernel +
inverse permutation: what the runtime adds around the kernel), ``flex`` (compiled ``flex_attention``
on the same BlockMask), ``sdpa`` (dense, default backend), the first call's seconds (tables +
autotune + compile) and host milliseconds per call (the launch path without waiting for the GPU).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def _counts(block_mask):
    full = block_mask.full_kv_num_blocks
    return dict(partial_blocks=int(block_mask.kv_num_blocks.sum()), full_blocks=int(full.sum()) if full is not None else 0)


def static_plans(shape, device, methods=("tile", "window", "radial")):
    """(name, plan, build seconds) of each static method's default plan for ``shape``."""
    from ditaccel.methods import config_class, make_method
    from ditaccel.methods.base import CallShape

    call = CallShape(shape.grid, shape.text, shape.text_where)
    for name in methods:
        t = time.perf_counter()
        plan = make_method(config_class(name)()).plan(call, device)
        _sync()
        yield name, plan, time.perf_counter() - t


def topk_block_mask(q, k, density: float, block_size: int = 128):
    """The BlockMask the topk method would select on q, k ([B, H, S, D]) at ``density``."""
    from torch.nn.attention.flex_attention import BlockMask

    from ditaccel.kernels import scoring

    S = q.shape[2]
    scores = scoring.mean_pool_block_scores(q, k, block_size)
    num, idx = scoring.select_blocks(scores, topk=density)
    return BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=block_size,
                                    seq_lengths=(S, S), compute_q_blocks=False)


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_ms(fn, n: int = 20) -> float:
    """Milliseconds per call on the host (launches queued, GPU not waited for), after a warm call."""
    fn()
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = (time.perf_counter() - t) / n
    _sync()
    return host * 1e3


def time_plan(name, block_mask, layout, q, k, v, bench, flex, key_valid=None) -> dict:
    """Kernel alone, whole path, flex, first-call and host cost of one plan. q, k, v: [B, S, H, D]."""
    from ditaccel.kernels.triton_attention import triton_block_sparse_attention

    if layout is not None:
        to = lambda x: layout.to_slots(x, dim=1).transpose(1, 2)  # noqa: E731
        back = lambda y: layout.from_slots(y.transpose(1, 2), dim=1)  # noqa: E731
    else:
        to = lambda x: x.transpose(1, 2)  # noqa: E731
        back = lambda y: y.transpose(1, 2)  # noqa: E731
    qs, ks, vs = to(q), to(k), to(v)
    t = time.perf_counter()
    triton_block_sparse_attention(qs, ks, vs, block_mask, key_valid=key_valid)
    _sync()
    first_s = time.perf_counter() - t
    kernel = lambda: triton_block_sparse_attention(qs, ks, vs, block_mask, key_valid=key_valid)  # noqa: E731
    path = lambda: back(triton_block_sparse_attention(to(q), to(k), to(v), block_mask, key_valid=key_valid))  # noqa: E731
    row = dict(plan=name, slots=qs.shape[2], first_call_s=round(first_s, 2), kernel_ms=round(bench(kernel), 3),
               path_ms=round(bench(path), 3), host_ms=round(host_ms(kernel), 3), **_counts(block_mask))
    if flex is not None and key_valid is None:
        flex(qs, ks, vs, block_mask=block_mask)  # compile
        row["flex_ms"] = round(bench(lambda: flex(qs, ks, vs, block_mask=block_mask)), 3)
    return row


def run_plans(shapes, densities, bench, use_flex=True, methods=("tile", "window", "radial"), log=print,
              device="cuda", time_left=lambda: float("inf")):
    """Rows for every shape x (static plans, topk at each density); ``bench(fn) -> ms``. Stops
    starting new plans when ``time_left()`` drops under 20 s (the GPU check's deadline)."""
    from torch.nn.attention.flex_attention import flex_attention

    device = torch.device(device)
    flex = None
    if use_flex:
        flex = torch.compile(flex_attention, dynamic=False) if device.type == "cuda" else flex_attention
    rows = []
    for shape in shapes:
        B, H, D = shape.batch, shape.heads, shape.head_dim
        S = shape.seq
        q, k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.bfloat16) for _ in range(3))
        dense_ms = bench(lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                                 v.transpose(1, 2)))
        base = dict(shape=shape.name, S=S, H=H, D=D, sdpa_ms=round(dense_ms, 3))
        for name, plan, build_s in static_plans(shape, device, methods):
            if time_left() < 20:
                break
            key_valid = getattr(plan, "key_valid", None)
            if key_valid is not None:  # [n_slots] bool from the plan: per batch for the kernel
                key_valid = key_valid.to(device).expand(B, -1)
            row = dict(base, **time_plan(name, plan.block_mask, plan.layout, q, k, v, bench, flex, key_valid),
                       density=round(float(plan.density), 3), plan_build_s=round(build_s, 2))
            row["sdpa_over_kernel"] = round(dense_ms / row["kernel_ms"], 2)
            rows.append(row)
            log(row)
        for d in densities:
            if time_left() < 20:
                break
            bm = topk_block_mask(q.transpose(1, 2), k.transpose(1, 2), d)
            row = dict(base, **time_plan(f"topk {d:.2f}", bm, None, q, k, v, bench, flex), density=d)
            row["sdpa_over_kernel"] = round(dense_ms / row["kernel_ms"], 2)
            rows.append(row)
            log(row)
        del q, k, v
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


__all__ = ["run_plans", "static_plans", "time_plan", "topk_block_mask"]
