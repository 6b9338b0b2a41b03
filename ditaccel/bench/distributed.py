"""``ditaccel bench`` under a distributed launch (``torchrun --nproc-per-node N -m ditaccel bench ...``,
``accelerate launch -m ditaccel bench ...``: both set WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT).

Two modes:

- **data parallel** (the default): the matrix cells are dealt round-robin over the ranks in matrix
  order (cell ``i`` runs on rank ``i % WORLD_SIZE``); each rank runs its share exactly as a
  1-process run would run those cells (same call, seed and prompt per cell, so the quality
  figures are the 1-process ones), and rank 0 gathers every record, block map and key frame and
  writes one results.json (and report) with the cells in matrix order. A cell's timing is that of
  the rank it ran on, while the other ranks ran their cells on the same machine.
- **context parallel** (``--cp ulysses=N``, ``--cp ring=N``): every transformer of every pipeline
  gets ``enable_parallelism(config=ContextParallelConfig(...))`` over the whole world and every rank
  runs every cell (dense and accelerated both under diffusers' context parallelism). After each
  cell the ranks exchange their outcome (one collective per cell, failed or not, so a cell that
  fails on one rank cannot leave the others waiting in the next cell's all-to-all) and their
  stats: call counts and paths merged by :func:`ditaccel.parallel.merged_stats`, densities and
  attention errors averaged over the ranks (each rank's plans cover its H/P heads). Timings are
  rank 0's wall time of the collective steps. If ditaccel refuses the mode on a model (the check
  ``accelerate`` makes before the first step), or the dense side cannot run under it (one untimed
  dense step of the first cell), the run stops with that reason before any cell. Under ring the
  dense side is ditaccel's ``dense`` method (exact attention, ditaccel's LSE ring): diffusers' ring
  needs a dense backend that returns the LSE, which its native one (the only one on CPU) does not.

Process group: gloo on CPU, nccl on CUDA; on CUDA each rank takes ``cuda:LOCAL_RANK``.
"""

from __future__ import annotations

import dataclasses
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .matrix import BenchMatrix, Cell, SizeSpec, now_utc
from .runner import BenchRun

CP_MODES = ("ulysses", "ring")
_CP_ITEM = re.compile(r"^\s*([a-z]+)\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class Launch:
    """This process's place in a distributed launch (from the launcher's environment variables)."""

    world_size: int
    rank: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_launch(env=None) -> Launch | None:
    """The launch described by WORLD_SIZE / RANK / LOCAL_RANK, or None outside a distributed launch
    (WORLD_SIZE unset or 1: a plain 1-process run)."""
    env = os.environ if env is None else env
    if env.get("WORLD_SIZE") in (None, ""):
        return None
    values = {}
    for name, minimum in (("WORLD_SIZE", 1), ("RANK", 0), ("LOCAL_RANK", 0)):
        raw = env.get(name, "0" if name == "LOCAL_RANK" else None)
        if raw is None or not raw.strip().isdigit() or int(raw) < minimum:
            raise ValueError(f"environment variable {name}={raw!r}: a distributed launch sets it to an int >= "
                             f"{minimum} (torchrun / accelerate launch set WORLD_SIZE, RANK and LOCAL_RANK)")
        values[name] = int(raw)
    if values["RANK"] >= values["WORLD_SIZE"]:
        raise ValueError(f"environment variable RANK={values['RANK']} must be < WORLD_SIZE={values['WORLD_SIZE']}")
    if values["WORLD_SIZE"] == 1:
        return None
    return Launch(values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"])


def parse_cp(text: str) -> dict[str, int]:
    """``"ulysses=2"`` / ``"ring=2"`` / ``"ulysses=2,ring=2"`` -> {mode: degree}."""
    allowed = f"MODE=DEGREE[,MODE=DEGREE] with MODE one of {CP_MODES} and DEGREE an int >= 2, e.g. ulysses=2"
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--cp {text!r}: expected {allowed}")
    cp: dict[str, int] = {}
    for item in text.split(","):
        m = _CP_ITEM.match(item)
        if not m:
            raise ValueError(f"--cp {text!r}: {item.strip()!r} is not MODE=DEGREE; expected {allowed}")
        mode, degree = m.group(1), int(m.group(2))
        if mode not in CP_MODES:
            raise ValueError(f"--cp {text!r}: unknown mode {mode!r}; allowed: {', '.join(CP_MODES)}")
        if mode in cp:
            raise ValueError(f"--cp {text!r}: {mode} is given twice; give each mode once")
        if degree < 2:
            raise ValueError(f"--cp {text!r}: {mode} degree {degree} must be an int >= 2 (1 = no {mode} parallelism)")
        cp[mode] = degree
    return cp


def format_cp(cp: dict[str, int]) -> str:
    return ",".join(f"{mode}={cp[mode]}" for mode in CP_MODES if mode in cp)


def check_cp(cp: dict[str, int] | None, launch: Launch | None) -> dict[str, int] | None:
    """``cp`` if it fits the launch: it needs a distributed launch, and its degrees' product must be the
    world size (diffusers builds a (ring, ulysses) device mesh over every rank)."""
    if cp is None:
        return None
    if launch is None:
        raise ValueError(f"--cp {format_cp(cp)} needs a distributed launch with WORLD_SIZE >= 2 (torchrun "
                         "--nproc-per-node N -m ditaccel bench ... or accelerate launch -m ditaccel bench ...); "
                         "WORLD_SIZE is not set (or is 1)")
    product = 1
    for degree in cp.values():
        product *= degree
    if product != launch.world_size:
        raise ValueError(f"--cp {format_cp(cp)}: the degrees multiply to {product}, but the world size is "
                         f"WORLD_SIZE={launch.world_size}; allowed: degrees whose product is {launch.world_size} "
                         f"(e.g. ulysses={launch.world_size})")
    return cp


def shard(n_cells: int, world_size: int, rank: int) -> list[int]:
    """Indices (in matrix order) of the cells ``rank`` runs in data-parallel mode: round-robin, so
    every rank gets a share within one cell of the others' and the assignment depends only on the matrix."""
    return list(range(rank, n_cells, world_size))


def rank_device(matrix: BenchMatrix, launch: Launch) -> torch.device:
    """The device this rank runs on: CPU stays CPU; CUDA (asked for, or the default with CUDA
    present) becomes ``cuda:LOCAL_RANK``."""
    name = matrix.device or ("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type != "cuda":
        return device
    if device.index is not None:
        raise ValueError(f"device {name!r} under a distributed launch: give 'cuda' (each rank takes "
                         "cuda:LOCAL_RANK) or 'cpu'")
    if launch.local_rank >= torch.cuda.device_count():
        raise ValueError(f"LOCAL_RANK={launch.local_rank} but only {torch.cuda.device_count()} CUDA device(s) "
                         "are visible; launch at most that many processes per node")
    return torch.device("cuda", launch.local_rank)


@contextmanager
def process_group(launch: Launch, device: torch.device):
    """The default process group for the run (gloo on CPU, nccl on CUDA), destroyed afterwards."""
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)  # object collectives over nccl use the current device
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend, rank=launch.rank, world_size=launch.world_size)
    try:
        yield backend
    finally:
        if owned and dist.is_initialized():
            dist.destroy_process_group()


@contextmanager
def _cpu_device_count():
    """diffusers 0.42.1's ``enable_parallelism`` picks its device as ``rank %
    torch.accelerator.device_count()``, which is 0 on a CPU-only torch build (ZeroDivisionError):
    count one device while it runs, and only then."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is None or accelerator.device_count() > 0:
        yield
        return
    original = accelerator.device_count
    accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        accelerator.device_count = original


def enable_context_parallel(pipe, cp: dict[str, int], where: str = "--cp") -> None:
    """``enable_parallelism(config=ContextParallelConfig(...))`` on every transformer of ``pipe`` (the
    adapter knows which: Wan 2.2 has two), over the default process group."""
    from diffusers import ContextParallelConfig

    from ..pipelines import find_adapter

    for attr, transformer in find_adapter(pipe).transformers(pipe):
        config = ContextParallelConfig(ulysses_degree=cp.get("ulysses", 1), ring_degree=cp.get("ring", 1))
        try:
            with _cpu_device_count():
                transformer.enable_parallelism(config=config)
        except (ValueError, RuntimeError, NotImplementedError) as exc:
            raise ValueError(f"{where}: diffusers' enable_parallelism on .{attr} failed: {exc}") from None


def _mean_over_ranks(values):
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def merge_rank_stats(stats: list[dict], merged_counts: dict) -> dict:
    """One stats dict from every rank's ``handle.stats()`` under context parallelism: counts and paths
    from ``merged_counts`` (:func:`ditaccel.parallel.merged_stats`), densities and attention errors
    averaged over the ranks (each rank plans its H/P heads of the same calls); times are rank 0's."""
    merged = dict(merged_counts)
    merged["mean_density"] = _mean_over_ranks(s.get("mean_density") for s in stats)
    for group in ("layers", "steps"):
        out = {}
        for key, entry in (stats[0].get(group) or {}).items():
            same = [s[group][key] for s in stats if key in (s.get(group) or {})]
            out[key] = dict(entry, density=_mean_over_ranks(e.get("density") for e in same),
                            **{k: sum(e[k] for e in same) for k in ("calls", "dense_calls", "reuse_calls")})
        merged[group] = out
    entries = []
    for i, entry in enumerate(stats[0].get("per_layer_step") or []):
        same = [s["per_layer_step"][i] for s in stats if i < len(s.get("per_layer_step") or [])]
        entries.append(dict(entry, density=_mean_over_ranks(e.get("density") for e in same)))
    merged["per_layer_step"] = entries
    errors = [s.get("attention_error") or {} for s in stats]
    if errors[0]:
        merged["attention_error"] = dict(
            errors[0], mean=_mean_over_ranks(e.get("mean") for e in errors),
            per_layer={k: _mean_over_ranks(e.get("per_layer", {}).get(k) for e in errors)
                       for k in errors[0].get("per_layer", {})})
    return merged


class _StatsOf:
    """What :func:`ditaccel.parallel.merged_stats` reads from a handle: ``stats()``."""

    def __init__(self, stats: dict):
        self._stats = stats

    def stats(self) -> dict:
        return self._stats


class DistributedBenchRun(BenchRun):
    """A bench run on one rank of a distributed launch (see the module doc); rank 0 writes the files."""

    def __init__(self, matrix: BenchMatrix, out: Path, launch: Launch, device: torch.device, *,
                 cp: dict[str, int] | None = None, backend: str = "gloo", progress: bool = True):
        super().__init__(matrix, out, progress=progress and launch.is_main, write=launch.is_main)
        self.launch, self.device, self.cp = launch, device, cp
        mode = "context-parallel" if cp else "data-parallel"
        timing = ("every rank runs every step together; a cell's times are rank 0's wall time of the collective "
                  "steps" if cp else
                  "each cell is timed on the rank that ran it, while the other ranks ran their own cells on "
                  "their devices (on one machine's CPU they share its cores)")
        self.results["distributed"] = {"world_size": launch.world_size, "mode": mode,
                                       "cp": format_cp(cp) if cp else None, "backend": backend,
                                       "assignment": None if cp else "round-robin: cell i on rank i % world_size",
                                       "timing": timing, "ranks": None}
        if cp:
            self.merge = self._merge_cell
        if cp and "ring" in cp:
            # diffusers' ring needs a dense attention that returns its LSE, which its native backend
            # (the only one on CPU) does not: the dense side runs ditaccel's dense method, whose
            # attention under ring is ditaccel's exact dense ring (parallel/ring.py).
            self.dense_side = _ditaccel_dense
            self.results["distributed"]["dense_reference"] = (
                "ditaccel's 'dense' method: exact attention over the KV chunks rotating round the ring, merged by "
                "LSE (diffusers' native attention cannot run under ring: it returns no LSE)")

    def _cells(self) -> list[Cell]:
        cells = self.matrix.cells()
        if self.cp:
            return cells
        return [cells[i] for i in shard(len(cells), self.launch.world_size, self.launch.rank)]

    def _device(self) -> torch.device:
        return self.device

    def _load(self, model: str, device, dtype):
        """Under --cp, one collective: a model that failed to load on some rank fails on every rank
        (its cells are recorded failed everywhere, and no rank waits for the others' all-to-all)."""
        try:
            loaded, error = super()._load(model, device, dtype), None
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks know
            loaded, error = None, exc
        if self.cp:
            import torch.distributed as dist

            gathered = [None] * self.launch.world_size
            dist.all_gather_object(gathered, None if error is None else f"{type(error).__name__}: {error}")
            failed = [(rank, e) for rank, e in enumerate(gathered) if e is not None]
            if failed and error is None:
                ranks = ", ".join(str(r) for r, _ in failed)
                raise RuntimeError(f"on rank(s) {ranks} of {len(gathered)}: {failed[0][1]}")
        if error is not None:
            raise error
        return loaded

    def _prepare(self, model: str, pipe, first_call) -> None:
        if not self.cp:
            return
        import ditaccel

        from ..eval.runs import warm_up

        where = f"--cp {format_cp(self.cp)} on model {model!r} ({type(pipe).__name__})"
        enable_context_parallel(pipe, self.cp, where)
        try:  # the refusal accelerate makes before the first step, made here before any cell
            ditaccel.accelerate(pipe, "dense").remove()
        except (ValueError, NotImplementedError) as exc:
            raise ValueError(f"{where}: ditaccel refuses to run under it: {exc}") from None
        # The dense side of every cell is the pipeline's own attention under diffusers' context
        # parallelism: one untimed step of the first cell's call shows whether diffusers can run it.
        try:
            call, seed = first_call()
            with self.dense_side(pipe):
                warm_up(pipe, call, seed=seed, steps=1)
        except Exception as exc:  # noqa: BLE001 - re-raised as bad input, with what to do
            hint = ("; diffusers' ring attention needs an attention backend that returns the LSE (flash, "
                    "_native_cudnn, sage: CUDA only), and the bench runs the pipeline's own backend, which here "
                    "does not (ditaccel's own side runs under ring: its LSE ring; benchmarks/cp_step_time.py --cp ring "
                    "times it against ditaccel's exact dense ring); use --cp ulysses=N" if "lse" in str(exc).lower() else "")
            raise ValueError(f"{where}: the dense reference (the pipeline's own attention under diffusers' context "
                             f"parallelism) fails before ditaccel runs: {type(exc).__name__}: {exc}{hint}") from None

    def _merge_cell(self, comparison, error):
        """A collective: every rank calls it once per cell, whatever happened in the cell."""
        import torch.distributed as dist

        from ..parallel import merged_stats

        gathered = [None] * self.launch.world_size
        dist.all_gather_object(gathered, (error, None if comparison is None else comparison.stats))
        failed = [(rank, e) for rank, (e, _) in enumerate(gathered) if e is not None]
        if failed:
            if len(failed) == len(gathered) and len({e[0] for _, e in failed}) == 1:
                return None, failed[0][1]  # the same failure everywhere: the 1-process message
            _, (message, tb) = failed[0]
            ranks = ", ".join(str(r) for r, _ in failed)
            return None, (f"on rank(s) {ranks} of {len(gathered)}: {message}", tb)
        stats = [s for _, s in gathered]
        counts = merged_stats(_StatsOf(comparison.stats))  # a second collective, reached by every rank
        return dataclasses.replace(comparison, stats=merge_rank_stats(stats, counts)), None

    def run(self) -> dict:
        super().run()
        self._gather()
        return self.results

    def _gather(self) -> None:
        """Rank 0 ends with every rank's cells (data parallel) and the per-rank account."""
        import torch.distributed as dist

        mine = {"rank": self.launch.rank, "device": str(self.device), "complete": self.results["complete"],
                "cells": self.results["cells"] if not self.cp else [c["key"] for c in self.results["cells"]],
                "block_maps": self.block_maps if not self.cp else {},
                "key_frames": self.key_frames if not self.cp else {}}
        gathered = [None] * self.launch.world_size if self.launch.is_main else None
        dist.gather_object(mine, gathered, dst=0)
        if not self.launch.is_main:
            return
        self.results["distributed"]["ranks"] = [
            {"rank": g["rank"], "device": g["device"], "cells": len(g["cells"]), "complete": g["complete"]}
            for g in gathered]
        if not self.cp:
            self._merge_shares(gathered)
        self.results.update(complete=all(g["complete"] for g in gathered), finished=now_utc())
        self.save()

    def _merge_shares(self, gathered: list[dict]) -> None:
        order = {cell.key: i for i, cell in enumerate(self.matrix.cells())}
        records = []
        for g in gathered:
            for record in g["cells"]:
                records.append(dict(record, rank=g["rank"]))
        records.sort(key=lambda r: order[r["key"]])
        self.results["cells"] = records
        # One block map / key frame per (model, method, size), as a 1-process run keeps: the one of the
        # first cell in matrix order that produced it.
        first: dict[tuple, tuple[int, dict, str]] = {}
        for g in gathered:
            for what in ("block_maps", "key_frames"):
                for key, value in g[what].items():
                    index = min(order[r["key"]] for r in g["cells"] if _group(r) == key and
                                (("block_map" in r) if what == "block_maps" else r["status"] == "ok"))
                    if (what, key) not in first or index < first[(what, key)][0]:
                        first[(what, key)] = (index, value)
        self.block_maps = {key: v for (what, key), (_, v) in sorted(first.items(), key=lambda kv: kv[1][0])
                           if what == "block_maps"}
        self.key_frames = {key: v for (what, key), (_, v) in sorted(first.items(), key=lambda kv: kv[1][0])
                           if what == "key_frames"}


def _ditaccel_dense(pipe):
    import ditaccel

    return ditaccel.accelerate(pipe, "dense")


def _group(record: dict) -> tuple:
    return record["model"], record["label"], SizeSpec(**record["size"]).label


__all__ = ["CP_MODES", "DistributedBenchRun", "Launch", "check_cp", "detect_launch", "enable_context_parallel",
           "format_cp", "merge_rank_stats",
           "parse_cp", "process_group", "rank_device", "shard"]
