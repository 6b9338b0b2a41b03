"""Host syncs on the per-call path: a TorchDispatchMode around a steady-state pipeline call counts
the sync-class ops (``_local_scalar_dense`` -- ``.item()``, ``bool(t)`` --, ``nonzero``, ``unique``,
``masked_select``; plus ``Tensor.tolist``, which reads CPU memory without dispatch) issued from
ditaccel's own code, and the tensors it makes from host data (``lift_fresh``).

Documented allowances (per transformer *forward*, never per attention call):
- the step hook reads the timestep (``pipelines/base.py`` ``scalar_timestep``) to count steps;
- a new attention-mask tensor is read once (``masks.py``: one ``tolist`` of its verdicts).
Dynamic methods: none per call, except ``heads`` at its profiling calls (the refresh steps only): the
profile's errors, stripes and costs read on the host to choose each head's pattern.
The CPU executors (``kernels/grouped.py``, ``kernels/reference.py``) plan their work on the host by
design and are not counted; the Triton launcher's own audit is in ``test_triton_attention.py``.
"""

from __future__ import annotations

import collections
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from tiny_pipelines import call_kwargs, pipe_for

import ditaccel

SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::_unique2", "aten::unique_dim", "aten::masked_select",
            "aten::lift_fresh"}
HOST_EXECUTORS = ("kernels/grouped.py", "kernels/reference.py")
PER_FORWARD = ("pipelines/base.py", "masks.py")


def _ours() -> str | None:
    """file:line of the innermost non-torch frame, if it is ditaccel's (and not a host executor's)."""
    frames = [f for f in traceback.extract_stack() if "/torch/" not in f.filename and "test_sync_audit" not in f.filename]
    where = frames[-1].filename.replace("\\", "/") if frames else ""
    if "/ditaccel/" not in where or where.endswith(HOST_EXECUTORS):
        return None
    return f"{where.split('/ditaccel/')[-1]}:{frames[-1].lineno}"


class SyncAudit(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.hits: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in SYNC_OPS:
            where = _ours()
            if where is not None:
                self.hits[(func._schema.name, where)] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        audit = self

        def tolist(t):
            where = _ours()
            if where is not None:
                audit.hits[("tolist", where)] += 1
            return audit._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


CONFIGS = {
    "tile": dict(tile=(1, 8, 8), window=(1, 1, 1), block_size=64),
    "window": dict(kernel_size=(1, 3, 3), block_size=64),
    "radial": dict(tile=(1, 8, 8), decay=0.25, sink_frames=0, block_size=64),
    "topk": dict(topk=0.5, block_size=64),
    "xattn": dict(threshold=0.9, block_size=64),
    "cluster": dict(block_size=64),
    "heads": dict(block_size=64, tile=(1, 8, 8), refresh=2, tolerance=1.0, sample_rows=32),
}
STATIC = ("tile", "window", "radial")


def _audit(family: str, method: str):
    pipe = pipe_for(family)
    with ditaccel.accelerate(pipe, method, dense_steps=0, **CONFIGS[method]) as handle:
        kw = lambda: call_kwargs(family, pipe, steps=3, output_type="latent", height=128, width=256, num_frames=5)  # noqa: E731
        pipe(**kw())  # first call of the shape: plans, device copies, masks' first reads
        handle.reset_stats()
        audit = SyncAudit()
        with audit:
            pipe(**kw())
        stats = handle.stats()
    forwards = sum(1 for _ in stats["steps"]) * (2 if family != "flux" else 1)
    return audit.hits, stats, forwards


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])  # no text / padded text with a key mask
@pytest.mark.parametrize("method", list(CONFIGS))
def test_steady_state_calls_do_not_sync(family, method):
    hits, stats, forwards = _audit(family, method)
    assert stats["calls"] > 0 and stats["calls"] > stats["dense_calls"]  # sparse calls ran
    per_call = {k: n for k, n in hits.items() if not k[1].startswith(PER_FORWARD)}
    per_forward = {k: n for k, n in hits.items() if k[1].startswith(PER_FORWARD)}
    # At most one read per forward of each allowed kind: the timestep, and a mask tensor's verdicts.
    assert all(n <= forwards for n in per_forward.values()), (per_forward, forwards)
    if method != "heads":
        assert per_call == {}, per_call
    else:  # its profile is read on the host once per profiling call (steps 0 and refresh), never between
        profiling = sum(stats["counters"].get("profiling", {}).values())
        assert 0 < profiling < stats["calls"]
        assert all(w.startswith("methods/heads.py") for _, w in per_call), per_call
        assert sum(n for (op, _), n in per_call.items() if op == "tolist") <= 3 * profiling, per_call
