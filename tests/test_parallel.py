"""diffusers' context parallelism (2 processes over gloo, spawned here, bounded in time): ditaccel does
not run under it yet, and says so before the first step in either order instead of running nothing."""

from __future__ import annotations

import os
import socket
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, results):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=WORLD)
        torch.set_num_threads(1)
        torch.accelerator.device_count = lambda: 1  # diffusers 0.42.1 divides a rank by it; 0 on a CPU-only build
        from diffusers import ContextParallelConfig
        from tiny_pipelines import pipe_for, run_latents

        import ditaccel

        out = {}
        pipe = pipe_for("wan")
        plain = run_latents(pipe, "wan", steps=2)
        # accelerate first, then context parallelism: diffusers refuses our backend (not CP-capable)
        handle = ditaccel.accelerate(pipe, "window", kernel_size=(1, 3, 3), block_size=64)
        try:
            pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
            out["after"] = "accepted"
        except ValueError as e:
            out["after"] = str(e)
        handle.remove()
        pipe.transformer._parallel_config = None  # diffusers records the config before it refuses
        for m in pipe.transformer.modules():
            if getattr(getattr(m, "processor", None), "_parallel_config", None) is not None:
                m.processor._parallel_config = None
        out["after_intact"] = bool(torch.equal(run_latents(pipe, "wan", steps=2), plain))
        # context parallelism first, then accelerate: refused by ditaccel before anything changes
        pipe.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD))
        try:
            ditaccel.accelerate(pipe, "window", kernel_size=(1, 3, 3), block_size=64)
            out["before"] = "accepted"
        except ValueError as e:
            out["before"] = str(e)
        out["before_hooks"] = sorted(n for m in pipe.transformer.modules()
                                     for n in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})
                                     if n.startswith("ditaccel"))
        results[rank] = out
    except BaseException:
        results[rank] = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes import torch + diffusers: ~30 s on a quiet 2-core machine, 2 min loaded
def test_context_parallelism_is_refused_in_either_order():
    port = _free_port()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=_worker, args=(r, port, results)) for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=240)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, "a context-parallel worker did not finish within 240 s"
        results = dict(results)
    for rank in range(WORLD):
        out = results[rank]
        assert "error" not in out, out.get("error")
        assert "does not support context parallelism" in out["after"]  # diffusers' refusal, before any step
        assert out["after_intact"]
        assert "context parallelism enabled (ulysses_degree=2, ring_degree=1)" in out["before"]
        assert out["before_hooks"] == []

