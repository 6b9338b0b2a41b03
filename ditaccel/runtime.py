"""Per-call runtime: what the step hook knows, what each self-attention site does with it.

``TransformerRuntime`` holds the facts of the transformer forward in flight (latent grid, text
span, step, CFG branch), set by the step hook. ``AttentionSite`` is one self-attention module:
when its attention product is intercepted it asks the method for a plan, runs it through the
layout and the kernel (through the cross-step caches, ``caches.py``), and records density, calls,
attention time and, on request, the error against dense attention in ``Stats``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from .caches import CrossStepCaches
from .call import CallShape
from .kernels import select_executor
from .masks import MaskReading, read_mask
from .methods import AttentionMethod
from .state import CallContext, StateStore


@dataclass(frozen=True)
class ForwardInfo:
    """One transformer forward, as the step hook reads it: the token grid, text span, batch, step and
    CFG branch (each of its self-attention calls becomes a ``call.Call`` with its layer and heads)."""

    grid: tuple[int, int, int]
    text_len: int
    text_position: str
    batch: int
    step: int
    branch: str
    token_order: object = None  # model positions in planning order, or a function of the length (CallFacts)
    dense_reason: str = ""  # non-empty: the adapter cannot plan this forward (CallFacts)
    dense_steps: int | None = None  # this pipeline call's dense-step count (None: the config's own)
    total_steps: int | None = None  # this pipeline call's step count (None: unknown)


def with_text_len(call: ForwardInfo, seq_len: int) -> ForwardInfo:
    """``call`` with its text span known: where the adapter left it to the call (None), every token of
    the ``seq_len`` beyond the grid's."""
    if call.text_len is not None:
        return call
    T, H, W = call.grid
    return dataclasses.replace(call, text_len=max(seq_len - T * H * W, 0))


class StrictModeError(RuntimeError):
    """``accelerate(..., strict=True)``: a call fell back to the model's attention or bypassed ditaccel."""


class Stats:
    """Per (transformer, layer, step, branch): calls (dense / sparse / reused), density, attention
    time; per call of interest, the error against dense attention; event counters; cache memory;
    the executors that really ran (``backends``: name -> kernel calls) and one-time ``notes``.

    ``summary()["paths"]`` accounts for every self-attention call: sparse, dense by schedule (the
    method's choice), dense by fallback (per reason), reused; module forwards that bypassed ditaccel
    (per reason) or ran no attention beneath it (another hook's cache); and the realised density,
    in which fallbacks count as dense."""

    def __init__(self):
        self.cells = defaultdict(lambda: {"calls": 0, "dense_calls": 0, "reuse_calls": 0, "fallback_calls": 0,
                                          "density_flops": 0.0, "flops": 0.0, "time_ms": 0.0, "errors": []})
        self.fallbacks: dict[str, int] = defaultdict(int)  # reason -> calls that ran the model's own attention
        self.fallback_flops = 0.0  # of those fallbacks that no cell records (no step known, ...)
        self.bypassed: dict[str, int] = defaultdict(int)  # reason -> module forwards that never reached ditaccel
        self.skipped = 0  # module forwards in which a hook beneath ditaccel's returned without attention
        self.forwards_without_attention = 0  # transformer forwards in which no self-attention reached ditaccel
        self.counters: dict = defaultdict(int)
        self.reports: dict = {}
        self.backends: dict[str, int] = defaultdict(int)  # executor that really ran -> kernel calls
        self.notes: dict[str, str] = {}  # one-time notes (e.g. why a call fell back to the model's attention)
        self.store: StateStore | None = None
        self._events: list[tuple[tuple, torch.cuda.Event, torch.cuda.Event]] = []

    def record(self, transformer: str, layer: int, step: int, branch: str, density, flops: float,
               outcome: str) -> None:
        """``density`` may be a 0-d tensor (dynamic plans): it is read on the host only in ``summary``."""
        cell = self.cells[(transformer, layer, step, branch)]
        cell["calls"] += 1
        cell["dense_calls"] += int(outcome in ("dense", "fallback"))
        cell["reuse_calls"] += int(outcome == "reuse")
        cell["fallback_calls"] += int(outcome == "fallback")
        cell["density_flops"] = cell["density_flops"] + density * flops
        cell["flops"] += flops

    def add_time(self, key: tuple, ms: float) -> None:
        self.cells[key]["time_ms"] += ms

    def add_events(self, key: tuple, start, end) -> None:
        self._events.append((key, start, end))

    def count_backend(self, name: str) -> None:
        self.backends[name] += 1

    def note(self, key: str, message: str) -> None:
        """Keep ``message`` once under ``key`` (``summary()["notes"]``)."""
        self.notes.setdefault(key, message)

    def record_fallback(self, reason: str, flops: float | None = None) -> None:
        """One call ran the model's attention for ``reason``; ``flops`` when no cell records the call."""
        self.fallbacks[reason] += 1
        if flops is not None:
            self.fallback_flops += flops

    def record_bypass(self, reason: str) -> None:
        self.bypassed[reason] += 1

    def add_error(self, key: tuple, rel_error: float) -> None:
        self.cells[key]["errors"].append(rel_error)

    def _drain_events(self) -> None:
        if self._events:
            torch.cuda.synchronize()
            for key, s, e in self._events:
                self.cells[key]["time_ms"] += s.elapsed_time(e)
            self._events.clear()

    def clear(self) -> None:
        self.cells.clear()
        self.counters.clear()
        self.reports.clear()
        self.backends.clear()
        self.notes.clear()
        self._events.clear()
        self.fallbacks.clear()
        self.bypassed.clear()
        self.fallback_flops = 0.0
        self.skipped = self.forwards_without_attention = 0

    def summary(self) -> dict:
        self._drain_events()

        def mean(cells):
            flops = sum(c["flops"] for c in cells)
            return float(sum(c["density_flops"] for c in cells)) / flops if flops else None

        def group(key_fn):
            groups = defaultdict(list)
            for key, cell in self.cells.items():
                groups[key_fn(key)].append(cell)
            return {k: {"calls": sum(c["calls"] for c in v), "dense_calls": sum(c["dense_calls"] for c in v),
                        "reuse_calls": sum(c["reuse_calls"] for c in v), "density": mean(v),
                        "time_ms": sum(c["time_ms"] for c in v)} for k, v in sorted(groups.items())}

        cells = list(self.cells.values())
        errors = [(key, e) for key, c in sorted(self.cells.items()) for e in c["errors"]]
        per_layer_err = defaultdict(list)
        for (t, layer, _, _), e in errors:
            per_layer_err[f"{t}.{layer}"].append(e)
        counters = defaultdict(dict)
        for (name, t, step), n in sorted(self.counters.items()):
            counters[name][step] = counters[name].get(step, 0) + n
        dense_calls = sum(c["dense_calls"] for c in cells)
        cell_fallbacks = sum(c["fallback_calls"] for c in cells)
        reuse_calls = sum(c["reuse_calls"] for c in cells)
        all_flops = sum(c["flops"] for c in cells) + self.fallback_flops
        paths = {
            "sparse": sum(c["calls"] for c in cells) - dense_calls - reuse_calls,
            "dense_by_schedule": dense_calls - cell_fallbacks,
            "dense_by_fallback": dict(self.fallbacks),
            "reused": reuse_calls,
            "bypassed": dict(self.bypassed),
            "skipped_by_other_hooks": self.skipped,
            "forwards_without_attention": self.forwards_without_attention,
            "realised_density": (float(sum(c["density_flops"] for c in cells)) + self.fallback_flops) / all_flops
            if all_flops else None,
        }
        return {
            "paths": paths,
            "calls": sum(c["calls"] for c in cells),
            "dense_calls": sum(c["dense_calls"] for c in cells),
            "reuse_calls": sum(c["reuse_calls"] for c in cells),
            "mean_density": mean(cells),
            "layers": {f"{t}.{layer}": v for (t, layer), v in group(lambda k: (k[0], k[1])).items()},
            "steps": group(lambda k: k[2]),
            "per_layer_step": [
                {"transformer": t, "layer": layer, "step": s, "branch": b, "calls": c["calls"],
                 "dense_calls": c["dense_calls"], "reuse_calls": c["reuse_calls"],
                 "density": float(c["density_flops"]) / c["flops"] if c["flops"] else None,
                 "time_ms": c["time_ms"]}
                for (t, layer, s, b), c in sorted(self.cells.items())
            ],
            "attention_time_ms": sum(c["time_ms"] for c in cells) if cells else None,
            "attention_error": {
                "mean": sum(e for _, e in errors) / len(errors) if errors else None,
                "per_layer": {k: sum(v) / len(v) for k, v in per_layer_err.items()},
                "per_layer_step": [{"transformer": t, "layer": layer, "step": s, "branch": b, "rel_error": e}
                                   for (t, layer, s, b), e in errors],
            },
            "counters": dict(counters),
            "reports": {k: dict(v) for k, v in self.reports.items()},
            "backends": dict(self.backends),
            "notes": list(self.notes.values()),
            "cache": self.store.summary() if self.store is not None else None,
        }


class TransformerRuntime:
    """Shared by the step hook and the attention sites of one transformer."""

    def __init__(self, name: str, method: AttentionMethod, stats: Stats, store: StateStore,
                 caches: CrossStepCaches, clock=None):
        self.name = name
        self.clock = clock  # a schedule.PipelineClock: the call's step count and noise levels
        self.method = method
        self.stats = stats
        self.store = store
        self.caches = caches
        self.observer = None  # fn(call: Call, q, k, v), see AccelerationHandle.observe
        # Attention time per call (stats()["per_layer_step"][..]["time_ms"]): CUDA events / perf_counter
        # around each call; off under torch.compile tracing (see AttentionSite._attend) or on request.
        self.timing = True
        self.error_steps: frozenset[int] = frozenset()  # steps at which errors against dense are measured
        self.current: ForwardInfo | None = None
        self._mask_cache: dict = {}
        self.slot_validity: dict = {}  # per forward: see PlanExecutor.slot_validity
        self._orders: dict = {}  # per forward: see planning_order
        self._last_step = -1
        self.detached = False  # ditaccel (compose): set by handle.remove(); hooks pass through after
        self.strict = False  # accelerate(strict=True): any fallback or bypass raises StrictModeError
        self.reached = 0  # self-attention calls of the forward in flight that reached ditaccel

    def begin(self, call: ForwardInfo) -> None:
        # A step below the last one seen starts a new pipeline call: cross-step state is stale. (The
        # step hook's reset at the end of every pipeline call covers pipelines of a single step.)
        if call.step < self._last_step:
            self.store.reset(self.name)
        self._last_step = call.step
        self.reached = 0
        self.current = self._with_schedule(call)
        self._mask_cache = {}
        self.slot_validity = {}
        self._orders = {}

    def _with_schedule(self, call: ForwardInfo) -> ForwardInfo:
        """``call`` with the pipeline call's step count and its resolved dense-step count."""
        config = self.method.config
        if self.clock is None or not config.follows_call:
            return call
        total = self.clock.total_steps()
        noise = self.clock.noise_levels(total) if config.dense_above_noise is not None else None
        return dataclasses.replace(call, total_steps=total, dense_steps=config.dense_step_count(total, noise))

    def planning_order(self, order, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(order, inverse) on ``device`` for the adapter's token order of this forward (a tensor, or a
        function of the call's length), built once per forward: every layer sees the same order."""
        key = (id(order), seq_len, str(device))
        hit = self._orders.get(key)
        if hit is not None and hit[0] is order:
            return hit[1], hit[2]
        planned = (order(seq_len) if callable(order) else order).to(device)
        inverse = torch.empty_like(planned)
        inverse[planned] = torch.arange(planned.numel(), device=device)
        self._orders[key] = (order, planned, inverse)  # held: the id stays unique
        return planned, inverse

    def reset(self) -> None:
        """A pipeline call ended: drop this transformer's cross-step state."""
        self.store.reset(self.name)
        self._last_step = -1

    def end(self) -> None:
        self.current = None
        self._mask_cache = {}
        self.slot_validity = {}
        self._orders = {}

    def read_mask(self, attn_mask: torch.Tensor, batch: int, heads: int, seq_len: int) -> MaskReading:
        """What ``attn_mask`` does to this forward's calls (``masks.read_mask``).

        The same mask tensor reaches every layer of one forward, so the verdict is cached for the
        forward's duration, keyed on the tensor object itself (held, so its identity stays unique).
        """
        key = (id(attn_mask), batch, heads, seq_len)
        cached = self._mask_cache.get(key)
        if cached is None or cached[0] is not attn_mask or cached[1] != attn_mask._version:
            cached = (attn_mask, attn_mask._version, read_mask(attn_mask, batch, heads, seq_len))
            self._mask_cache[key] = cached
        return cached[2]


class AttentionSite:
    """One self-attention module of one transformer."""

    def __init__(self, runtime: TransformerRuntime, layer: int, name: str, original_backend=None):
        self.runtime = runtime
        self.layer = layer
        self.name = name
        self.original_backend = original_backend
        self._warned: set[str] = set()
        self.reached = 0  # calls that reached attend(), ever (compose: bypass detection)

    def _warn_once(self, reason: str, flops: float | None = None) -> None:
        """A fallback to the model's own attention: counted per reason (``flops``: for a call no cell
        records), warned once, an error under ``strict=True``."""
        self.runtime.stats.record_fallback(reason, flops)  # ditaccel (compose): the per-path account
        if self.runtime.strict:
            raise StrictModeError(f"ditaccel (strict=True): {self.name}: {reason}")
        if reason not in self._warned:
            self._warned.add(reason)
            message = f"ditaccel: {self.name}: {reason}; running the model's own attention there"
            self.runtime.stats.note(reason, message)  # once per reason in stats()["notes"]
            warnings.warn(message, stacklevel=3)

    def _forward_for(self, seq_len: int, flops: float) -> ForwardInfo | None:
        """The forward this call belongs to, its text span resolved for ``seq_len`` keys; None (after
        counting and warning the reason) when the call runs the model's own attention."""
        rt = self.runtime
        self.reached += 1  # ditaccel (compose): the attention hook's bypass check reads this
        rt.reached += 1
        call = rt.current
        if call is None:
            self._warn_once("called outside a hooked transformer forward", flops)
            return None
        if call.dense_reason:
            self._warn_once(call.dense_reason, flops)
            return None
        return with_text_len(call, seq_len)

    def attend(self, q, k, v, attn_mask, scale, dense, head_offset: int = 0):
        """q, k, v: [B, S, H, D]. ``dense()`` computes the model's own attention on the same inputs.
        ``head_offset``: the model's index of head 0 here (context parallelism: a rank holds H of them)."""
        rt = self.runtime
        S = q.shape[1]
        flops = 4.0 * q.shape[0] * q.shape[2] * S * k.shape[1] * q.shape[3]
        call = self._forward_for(S, flops)
        if call is None:
            return dense()
        order = call.token_order
        if callable(order) and S < call.grid[0] * call.grid[1] * call.grid[2]:
            order = None  # an order of the call's length, but too short for the grid: the checks go dense
        if order is None:
            return self._attend(call, q, k, v, attn_mask, scale, dense, head_offset)
        order, inverse = rt.planning_order(order, S, q.device)
        if order.numel() != S or k.shape[1] != S:
            self._warn_once(f"sequence of {S} tokens does not match the adapter's token order of {order.numel()}",
                            flops)
            return dense()
        # Extra dense tokens on both sides of the grid's: plan in the order that makes them one run.
        q, k, v = (x.index_select(1, order) for x in (q, k, v))
        if isinstance(attn_mask, torch.Tensor):
            attn_mask = _reorder_mask(attn_mask, order, S)
        out = self._attend(call, q, k, v, attn_mask, scale, lambda: dense().index_select(1, order), head_offset)
        return out.index_select(1, inverse)

    def attend_ring(self, ring, executor, head_offset: int = 0):
        """This rank's rows under ring context parallelism (``parallel/ring.py``): ``executor`` (a
        ``RingExecutor``) holds the call's q, k, v rows and runs plans, and dense attention, round the ring.
        ``head_offset``: the model's index of head 0 here (ring combined with Ulysses: a rank holds H/U)."""
        q = executor.q
        flops = 4.0 * q.shape[0] * q.shape[2] * q.shape[1] * ring.seq_len * q.shape[3]
        call = self._forward_for(ring.seq_len, flops)
        if call is None:
            return executor.dense()
        return self._attend(call, q, executor.k, executor.v, None, executor.scale, executor.dense, head_offset,
                            ring=executor)

    def _attend(self, forward: ForwardInfo, q, k, v, attn_mask, scale, dense, head_offset: int = 0, ring=None):
        rt = self.runtime
        B, S, H, D = q.shape
        S_k = k.shape[1] if ring is None else ring.ring.seq_len
        # The call's one value: everything below (observer, method, caches, stats) reads it.
        shape = CallShape(forward.grid, forward.text_len, forward.text_position)
        call = CallContext(
            transformer=rt.name, layer=self.layer, step=forward.step, branch=forward.branch, shape=shape, batch=B,
            heads=H, dense_steps=forward.dense_steps, total_steps=forward.total_steps, head_offset=head_offset,
            state=rt.store.state(rt.name, self.layer, forward.branch, (shape, B, H)), store=rt.store,
            counters=rt.stats.counters, reports=rt.stats.reports, values=v,
        )
        key = (rt.name, self.layer, call.step, call.branch)
        if rt.observer is not None:
            rt.observer(call, q, k, v)
        timer = _Timer(rt.stats, key, q.is_cuda) if rt.timing and not torch.compiler.is_compiling() else None
        if ring is None:
            out, outcome, density = self._compute(call, q, k, v, attn_mask, scale, dense)
        else:
            out, outcome, density = self._compute_ring(call, ring)
        if timer is not None:
            timer.stop()
        rt.stats.record(*key, density, 4.0 * B * H * S * S_k * D, outcome)
        if outcome in ("sparse", "reuse") and call.step in rt.error_steps:
            from .metrics import attention_rel_error

            rt.stats.add_error(key, attention_rel_error(dense(), out))
        return out

    def _compute(self, call: CallContext, q, k, v, attn_mask, scale, dense):
        rt = self.runtime
        B, S, H, _ = q.shape
        if S != call.shape.seq_len or k.shape[1] != S:
            self._warn_once(f"sequence of {S} tokens does not match the grid {call.grid} + {call.text_len} text")
            return dense(), "fallback", 1.0
        reading = MaskReading()
        if attn_mask is not None and not isinstance(attn_mask, torch.Tensor):  # e.g. a model's own BlockMask
            self._warn_once(f"attention mask is a {type(attn_mask).__name__}, not a tensor")
            return dense(), "fallback", 1.0
        if attn_mask is not None:
            reading = rt.read_mask(attn_mask, B, H, S)
            if reading.fallback is not None:
                self._warn_once(reading.fallback)
                return dense(), "fallback", 1.0
        executor = PlanExecutor(q, k, v, reading.key_valid, scale, rt.method.config.backend, rt.stats.count_backend,
                                row_live=reading.row_live, slot_validity=rt.slot_validity)
        return rt.caches.run(call, q, k, executor, dense)

    def _compute_ring(self, call: CallContext, executor):
        rt = self.runtime
        ring = executor.ring
        if ring.seq_len != call.shape.seq_len:
            self._warn_once(f"sequence of {ring.seq_len} tokens does not match the grid {call.grid} + "
                            f"{call.text_len} text")
            return executor.dense(), "fallback", 1.0
        q, k, v = executor.q, executor.k, executor.v
        if rt.method.kind != "static":  # it scores the whole sequence: plan on it, as one process does
            q, k, v = (ring.all_gather_model_order(x) for x in (q, k, v))
            call = dataclasses.replace(call, values=v)
        return rt.caches.run(call, q, k, executor, executor.dense)


def _reorder_mask(mask: torch.Tensor, order: torch.Tensor, seq_len: int) -> torch.Tensor:
    """An attention mask in the model's order -> in planning order (its key and query axes)."""
    if mask.shape[-1] == seq_len:
        mask = mask.index_select(-1, order)
    if mask.dim() >= 2 and mask.shape[-2] == seq_len:
        mask = mask.index_select(-2, order)
    return mask


class PlanExecutor:
    """Runs plans on one call's q, k, v ([B, S, H, D], model order): slots in, kernel, slots out.

    A plan's BlockMask is fixed (``SparsePlan.pattern_block_mask``: partial blocks only where the
    pattern cuts one); what is valid per key -- the plan's empty slots and the call's key padding --
    goes to the executor as ``key_valid`` (``SparsePlan.call_key_valid``), so a padded call builds no
    BlockMask and the executors' per-BlockMask caches hit on every call.
    """

    def __init__(self, q, k, v, key_valid, scale, backend: str, on_run=None, row_live=None, slot_validity=None):
        self.q, self.k, self.v = q, k, v
        self.key_valid = key_valid  # [B, Hm, S] bool (Hm 1 or H; a [B, S] one is read as [B, 1, S]) or None
        if key_valid is not None and key_valid.dim() == 2:
            self.key_valid = key_valid[:, None, :]
        self.row_live = row_live  # [B, Hm, S] bool or None: query rows the mask leaves any key (others give 0)
        self.scale = scale
        self.backend = backend
        self.on_run = on_run  # fn(name of the executor that really ran), once per kernel call
        # (plan, key padding) -> slot-order key validity, kept by the runtime for one forward: every
        # layer of a forward sees the same padding tensor.
        self.slot_validity = {} if slot_validity is None else slot_validity

    @staticmethod
    def block_mask(plan):
        return plan.pattern_block_mask if plan.pattern_full_blocks is not None else plan.block_mask

    def slot_key_valid(self, plan) -> torch.Tensor:
        """[B|1, Hm, n_slots] bool: the keys this call may attend to, in the plan's slot order."""
        key = (id(plan), id(self.key_valid))
        cached = self.slot_validity.get(key)
        if cached is not None and cached[0] is plan and cached[1] is self.key_valid:
            return cached[2]
        valid = plan.call_key_valid(self.key_valid)
        self.slot_validity[key] = (plan, self.key_valid, valid)  # held: the ids stay unique
        return valid

    def _execute(self, plan, return_lse: bool):
        layout = plan.layout
        qs, ks, vs = (layout.to_slots(x, dim=1).transpose(1, 2) for x in (self.q, self.k, self.v))
        block_mask = self.block_mask(plan)
        name, execute = select_executor(self.backend, qs, ks, vs, block_mask)
        result = execute(qs, ks, vs, block_mask, self.scale, key_valid=self.slot_key_valid(plan), return_lse=return_lse)
        if self.on_run is not None:
            self.on_run(name)
        return result

    def run(self, plan) -> torch.Tensor:
        return self.plan_output(self._execute(plan, False), plan)

    def plan_output(self, out_slots: torch.Tensor, plan) -> torch.Tensor:
        """An executor's [B, H, n_slots, D] output -> [B, S, H, D] in model order."""
        out = plan.layout.from_slots(out_slots.transpose(1, 2), dim=1)
        if self.row_live is not None:  # rows whose every key is masked: zeros, as SDPA gives them
            out = torch.where(self.row_live.transpose(1, 2)[..., None], out, 0.0)
        return out

    def kept_mass(self, plan) -> torch.Tensor:
        """Fraction of each query's softmax mass on the keys ``plan`` keeps: [B, S, H, 1] float32,
        from the executor's own log-sum-exp over the kept blocks (``return_lse``)."""
        _, lse_kept = self._execute(plan, True)  # [B, H, n_slots]
        lse_kept = plan.layout.from_slots(lse_kept.transpose(1, 2)[..., None], dim=1)  # [B, S, H, 1]
        lse_dense = self._dense_lse()
        # Rows that see no key at all (masked out) keep no mass: 0, not exp(-inf + inf).
        rho = torch.where(torch.isfinite(lse_dense), torch.exp(lse_kept - lse_dense), 0.0)
        return rho.to(self.q.dtype)

    def _dense_lse(self) -> torch.Tensor:
        q, k = self.q.transpose(1, 2).float(), self.k.transpose(1, 2).float()  # [B, H, S, D]
        scale = q.shape[-1] ** -0.5 if self.scale is None else float(self.scale)
        B, H, S, _ = q.shape
        lse = torch.empty(B, H, S, device=q.device)
        chunk = max(1, (64 * 2**20) // max(1, B * H * k.shape[2]))
        for c0 in range(0, S, chunk):
            logits = (q[:, :, c0 : c0 + chunk] @ k.transpose(-1, -2)) * scale
            if self.key_valid is not None:
                logits = logits.masked_fill(~self.key_valid[:, :, None, :], float("-inf"))
            lse[:, :, c0 : c0 + chunk] = torch.logsumexp(logits, -1)
        return lse.transpose(1, 2)[..., None]


class _Timer:
    """Wall time of one call: CUDA events on CUDA (read lazily), perf_counter elsewhere."""

    def __init__(self, stats: Stats, key: tuple, cuda: bool):
        self.stats, self.key, self.cuda = stats, key, cuda
        if cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
            self.stats.add_events(self.key, self.start, self.end)
        else:
            self.stats.add_time(self.key, (time.perf_counter() - self.t0) * 1e3)
