"""Spawning a small gloo world inside a test: a free port, the workers, a bound on their time."""

from __future__ import annotations

import os
import socket
import traceback
from contextlib import contextmanager


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, world: int, port: int) -> None:
    """Join the world from a spawned worker, as the context-parallel tests need it on a CPU-only build."""
    import warnings

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.accelerator.device_count = lambda: 1  # diffusers 0.42.1 divides a rank by it; 0 on a CPU-only build
    warnings.simplefilter("ignore")


def spawn(worker, world: int, timeout_s: float, *args) -> dict:
    """Run ``worker(rank, port, *args, results)`` in ``world`` spawned processes; their ``results`` dict.
    Fails the test (naming the bound) if one of them is still running after ``timeout_s``."""
    import torch.multiprocessing as mp

    port = free_port()
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        procs = [ctx.Process(target=worker, args=(r, port, *args, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        assert not alive, f"a spawned worker did not finish within {timeout_s} s"
        return dict(results)


@contextmanager
def reporting(rank: int, results):
    """The body of a spawned worker: an exception lands in ``results[rank]["error"]`` (as its traceback,
    for the parent to show), and the process group is torn down either way."""
    import torch.distributed as dist

    try:
        yield
    except BaseException:  # noqa: BLE001 - reported by the parent
        results[rank] = {"error": traceback.format_exc()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
