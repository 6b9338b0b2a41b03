"""Per-call runtime: what the step hook knows, what each self-attention site does with it.

``TransformerRuntime`` holds the facts of the transformer forward in flight (latent grid, text
span, step, CFG branch), set by the step hook. ``AttentionSite`` is one self-attention module:
when its attention product is intercepted it asks the method for a plan, runs it through the
layout and the kernel, and records density and calls in ``Stats``.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch

from .kernels import run_plan
from .methods import AttentionMethod, CallShape


@dataclass(frozen=True)
class CallInfo:
    """One transformer forward: the token grid, text span, batch, step and CFG branch."""

    grid: tuple[int, int, int]
    text_len: int
    text_position: str
    batch: int
    step: int
    branch: str

    @property
    def seq_len(self) -> int:
        T, H, W = self.grid
        return T * H * W + self.text_len


class Stats:
    """Density and call counts per (transformer, layer, step, branch); CUDA attention time."""

    def __init__(self):
        self.cells = defaultdict(lambda: {"calls": 0, "dense_calls": 0, "density_flops": 0.0, "flops": 0.0})
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._time_ms = 0.0

    def record(self, transformer: str, layer: int, step: int, branch: str, density: float, flops: float,
               dense: bool) -> None:
        cell = self.cells[(transformer, layer, step, branch)]
        cell["calls"] += 1
        cell["dense_calls"] += int(dense)
        cell["density_flops"] += density * flops
        cell["flops"] += flops

    def add_events(self, start, end) -> None:
        self._events.append((start, end))

    def attention_time_ms(self) -> float | None:
        if not self._events and not self._time_ms:
            return None
        if self._events:
            torch.cuda.synchronize()
            self._time_ms += sum(s.elapsed_time(e) for s, e in self._events)
            self._events.clear()
        return self._time_ms

    def clear(self) -> None:
        self.cells.clear()
        self._events.clear()
        self._time_ms = 0.0

    def summary(self) -> dict:
        def mean(cells):
            flops = sum(c["flops"] for c in cells)
            return sum(c["density_flops"] for c in cells) / flops if flops else None

        def group(key_fn):
            groups = defaultdict(list)
            for key, cell in self.cells.items():
                groups[key_fn(key)].append(cell)
            return {k: {"calls": sum(c["calls"] for c in v), "dense_calls": sum(c["dense_calls"] for c in v),
                        "density": mean(v)} for k, v in sorted(groups.items())}

        cells = list(self.cells.values())
        return {
            "calls": sum(c["calls"] for c in cells),
            "dense_calls": sum(c["dense_calls"] for c in cells),
            "mean_density": mean(cells),
            "layers": {f"{t}.{layer}": v for (t, layer), v in group(lambda k: (k[0], k[1])).items()},
            "steps": group(lambda k: k[2]),
            "per_layer_step": [
                {"transformer": t, "layer": layer, "step": s, "branch": b, "calls": c["calls"],
                 "dense_calls": c["dense_calls"], "density": c["density_flops"] / c["flops"] if c["flops"] else None}
                for (t, layer, s, b), c in sorted(self.cells.items())
            ],
            "attention_time_ms": self.attention_time_ms(),
        }


class TransformerRuntime:
    """Shared by the step hook and the attention sites of one transformer."""

    def __init__(self, name: str, method: AttentionMethod, stats: Stats):
        self.name = name
        self.method = method
        self.stats = stats
        self.current: CallInfo | None = None
        self._mask_cache: dict = {}

    def begin(self, call: CallInfo) -> None:
        self.current = call
        self._mask_cache = {}

    def end(self) -> None:
        self.current = None
        self._mask_cache = {}

    def key_padding(self, attn_mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor | None:
        """[B, S] key validity if ``attn_mask`` only masks keys (text padding), else None.

        The same mask tensor reaches every layer of one forward, so the verdict is cached for the
        forward's duration, keyed on the tensor object itself (held, so its identity stays unique).
        """
        cached = self._mask_cache.get(id(attn_mask))
        if cached is None or cached[0] is not attn_mask or cached[1] != attn_mask._version:
            cached = (attn_mask, attn_mask._version, _key_padding(attn_mask, batch, seq_len))
            self._mask_cache[id(attn_mask)] = cached
        return cached[2]


def _key_padding(attn_mask: torch.Tensor, batch: int, seq_len: int) -> torch.Tensor | None:
    m = attn_mask
    if m.dtype != torch.bool:
        # Additive masks: 0 keeps a key, a very negative value drops it; anything else is a bias.
        if not bool(((m == 0) | (m <= -1e4)).all()):
            return None
        m = m == 0
    while m.dim() < 4:
        m = m.unsqueeze(-2) if m.dim() == 2 else m.unsqueeze(1)
    if m.shape[-1] != seq_len:
        return None
    m = m.expand(batch, m.shape[1], m.shape[2], seq_len)
    key_valid = m.any(dim=2).any(dim=1)  # a key is valid if some query may see it
    # Rows that see anything must see exactly the valid keys (masked query rows are padding too).
    rows_any = m.any(dim=-1, keepdim=True)
    if not bool(((m == key_valid[:, None, None, :]) | ~rows_any).all()):
        return None
    return key_valid


class AttentionSite:
    """One self-attention module of one transformer."""

    def __init__(self, runtime: TransformerRuntime, layer: int, name: str, original_backend=None):
        self.runtime = runtime
        self.layer = layer
        self.name = name
        self.original_backend = original_backend
        self._warned: set[str] = set()

    def _warn_once(self, reason: str) -> None:
        if reason not in self._warned:
            self._warned.add(reason)
            warnings.warn(f"ditaccel: {self.name}: {reason}; running the model's own attention there", stacklevel=3)

    def attend(self, q, k, v, attn_mask, scale, dense):
        """q, k, v: [B, S, H, D]. ``dense()`` computes the model's own attention on the same inputs."""
        rt = self.runtime
        call = rt.current
        B, S, H, D = q.shape
        flops = 4.0 * B * H * S * k.shape[1] * D
        if call is None:
            self._warn_once("called outside a hooked transformer forward")
            return dense()
        if S != call.seq_len or k.shape[1] != S:
            self._warn_once(f"sequence of {S} tokens does not match the grid {call.grid} + {call.text_len} text")
            rt.stats.record(rt.name, self.layer, call.step, call.branch, 1.0, flops, True)
            return dense()
        key_valid = None
        if attn_mask is not None:
            key_valid = rt.key_padding(attn_mask, B, S)
            if key_valid is None:
                self._warn_once("attention mask is not a key-padding mask")
                rt.stats.record(rt.name, self.layer, call.step, call.branch, 1.0, flops, True)
                return dense()
            if bool(key_valid.all()):
                key_valid = None
        method = rt.method
        if method.is_dense(self.layer, call.step):
            rt.stats.record(rt.name, self.layer, call.step, call.branch, 1.0, flops, True)
            return dense()

        timing = q.is_cuda
        if timing:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        plan = method.plan(CallShape(call.grid, call.text_len, call.text_position), q.device)
        layout = plan.layout
        block_mask = plan.block_mask
        if key_valid is not None:
            block_mask = plan.with_key_padding(layout.to_slots(key_valid, dim=1))
        qs, ks, vs = (layout.to_slots(x, dim=1).transpose(1, 2) for x in (q, k, v))
        out = run_plan(method.config.backend, qs, ks, vs, block_mask, scale)
        out = layout.from_slots(out.transpose(1, 2), dim=1)
        if timing:
            end.record()
            rt.stats.add_events(start, end)
        rt.stats.record(rt.name, self.layer, call.step, call.branch, plan.density, flops, False)
        return out
