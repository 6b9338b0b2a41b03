"""table: per-(layer, head, step range) methods in one plan per call (``TableConfig``).

Per self-attention call the method asks the table which rule each head falls under
(``TableConfig.rule_for``), runs each distinct rule's method once on the heads it covers (their
q, k, v sliced out: a dynamic method scores only its own heads, with its cross-step state kept
under the rule's own name in the layer's state), and stacks the per-head block maps into one
``[B|1, H, nq, nk]`` BlockMask on the layout the rules share (``table_config.check_layouts``
guarantees there is one). Dense heads keep every block of it. Token-level masks of partial blocks
are chosen per head inside ``mask_mod``. When every head of the call is dense, the model's own
attention runs (None). Output share and cfg share rules are the caches' (``caches.py`` asks
``TableConfig.shares_output_at`` / ``shares_cfg_at``); a head that falls under a share rule while
other heads of its layer compute runs dense (a note says so). Rules with a ``residual`` plan like
any other; the caches add or refresh the residual per head (``residual_heads``).
"""

from __future__ import annotations

import dataclasses
import warnings

import torch

from ..layout import build_layout
from ..plan import SparsePlan, build_block_plan, build_plan, plan_from_blocks
from .base import AttentionMethod, ShapeCache
from .table_config import TableConfig


class _RuleState:
    """The layer's state seen through one rule's name, so two rules' dynamic methods never share
    a stored selection."""

    def __init__(self, state, prefix: str):
        self._state, self._prefix = state, prefix

    def get(self, name, default=None):
        return self._state.get(self._prefix + name, default)

    def __contains__(self, name):
        return self._prefix + name in self._state

    def put(self, name, value):
        return self._state.put(self._prefix + name, value)

    def pop(self, name, default=None):
        return self._state.pop(self._prefix + name, default)


@dataclasses.dataclass(frozen=True)
class HeadwisePlan(SparsePlan):
    """A plan whose token-level mask differs per head: ``head_allowed(b, h, q, kv)``; ``slot_allowed``
    is the union over heads (what a head-free caller may assume at most)."""

    head_allowed: object = None


def _as4(x: torch.Tensor) -> torch.Tensor:
    while x.dim() < 4:
        x = x.unsqueeze(0)
    return x


def _same_layout(a, b) -> bool:
    return (a.grid == b.grid and a.text_len == b.text_len and a.block_size == b.block_size
            and a.src.shape == b.src.shape and bool(torch.equal(a.src.cpu(), b.src.cpu())))


class TableMethod(AttentionMethod):
    name = "table"

    def __init__(self, config: TableConfig):
        super().__init__(config)
        from . import make_method

        self._methods = {}
        for i, rule in enumerate(config.rules):
            if rule.config is not None:
                method = make_method(rule.config)
                method.notes = self.notes
                self._methods[i] = method
        # Dynamic when any rule's method reads q and k (e.g. ring context parallelism gathers them then).
        self.kind = "dynamic" if any(m.kind != "static" for m in self._methods.values()) else "static"
        self._dense_plans = ShapeCache()
        self._packed_plans = ShapeCache()
        self._warned_grid = False
        self._stacked = ShapeCache(size=256)  # one per (shape, head assignment): a table has few
        self._residual_rules = any(rule.residual is not None for rule in config.rules)

    def head_rules(self, ctx) -> list[int | None]:
        """Per head: the index of the rule that decides it (None: dense)."""
        cfg: TableConfig = self.config
        out = []
        for h in range(ctx.heads):
            rule = cfg.rule_for(ctx.layer, ctx.head_offset + h, ctx.step, ctx.total_steps, ctx.branch)
            if rule is None or rule.config is None:
                if rule is not None and rule.use in ("share", "cfg_share"):
                    self.notes.add(f"table: layer {ctx.layer} step {ctx.step}: a '{rule.use}' rule covers some "
                                   f"heads while others compute; those heads run dense")
                out.append(None)
            else:
                out.append(cfg.rules.index(rule))
        return out

    def residual_heads(self, ctx) -> dict[int, tuple[str, str]]:
        """Heads of the call (local index) under a rule with a residual: head -> (mode, residual key).
        ``caches.py`` asks it for calls this method planned (``decide`` gave a plan)."""
        if not self._residual_rules:
            return {}
        cfg: TableConfig = self.config
        out = {}
        for h in range(ctx.heads):
            rule = cfg.rule_for(ctx.layer, ctx.head_offset + h, ctx.step, ctx.total_steps, ctx.branch)
            if rule is not None and rule.residual is not None:
                out[h] = (rule.residual, rule.residual_key)
        return out

    def decide(self, ctx, q, k):
        grid = self.config.calibrated_grid
        if grid is not None and tuple(ctx.shape.grid) != tuple(grid) and not self._warned_grid:
            self._warned_grid = True
            message = (f"table: calibrated at the token grid {tuple(grid)}, running on {tuple(ctx.shape.grid)} "
                       f"(another resolution or frame count): quality may differ from the calibrated figures")
            self.notes.add(message)
            warnings.warn(f"ditaccel: {message}", stacklevel=2)
        if self.is_dense(ctx.layer, ctx.step, ctx.dense_steps):
            return None
        rules = self.head_rules(ctx)
        if all(r is None for r in rules):
            return None
        return self._combine(ctx, q, k, rules)

    def plan_for(self, ctx, q, k):
        rules = self.head_rules(ctx)
        if all(r is None for r in rules):  # every head dense: the all-blocks plan of a tile layout
            return self._dense_plan(ctx.shape, q.device, None)
        return self._combine(ctx, q, k, rules)

    def _dense_plan(self, shape, device, layout):
        if layout is None:
            tile = self.tile_for(shape.grid)
            layout = build_layout(shape.grid, shape.text_len, shape.text_position, "tile", tile,
                                  self.config.block_size)
        key = (shape, layout.order, layout.tile, layout.num_slots)  # packed and tile-padded layouts differ
        return self._dense_plans.get(key, device, lambda: plan_from_blocks(
            layout, torch.ones(layout.num_blocks, layout.num_blocks, dtype=torch.bool, device=device)))

    def _packed(self, r: int, shape, device) -> SparsePlan:
        """Rule ``r``'s static plan on the packed tile layout. On a grid its tiles do not divide, a
        static method keeps whichever of the packed and the tile-padded layout costs it less kernel
        work (``AttentionMethod.build``), so two rules of one call may choose differently; one
        per-head BlockMask needs one layout, and the packed one is what every method can plan on."""
        method = self._methods[r]

        def build():
            grid = shape.grid
            layout = build_layout(grid, shape.text_len, shape.text_position, method.order(), method.tile_for(grid),
                                  self.config.block_size, False)
            rule, predicate = method.box_rule(grid), method.video_predicate(grid)
            return build_block_plan(layout, rule, predicate, device) if rule is not None else \
                build_plan(layout, predicate, device)

        return self._packed_plans.get((r, shape), device, build)

    def _combine(self, ctx, q, k, rules: list[int | None]) -> SparsePlan:
        static = all(type(self._methods[r]).plan_for is AttentionMethod.plan_for for r in rules if r is not None)
        if static:  # static rules only: the stacked plan depends on the shape and the head assignment alone
            key = (ctx.shape, ctx.heads, tuple(rules))
            return self._stacked.get(key, q.device, lambda: self._stack(ctx, q, k, rules))
        return self._stack(ctx, q, k, rules)

    def _stack(self, ctx, q, k, rules: list[int | None]) -> SparsePlan:
        H = ctx.heads
        groups: dict[int, list[int]] = {}
        for h, r in enumerate(rules):
            if r is not None:
                groups.setdefault(r, []).append(h)
        plans = {}
        for r, heads in groups.items():
            index = torch.tensor(heads, device=q.device)
            sub_ctx = dataclasses.replace(
                ctx, heads=len(heads), state=_RuleState(ctx.state, f"table.{r}."),
                values=None if ctx.values is None else ctx.values.index_select(2, index))
            plans[r] = self._methods[r].plan_for(sub_ctx, q.index_select(2, index), k.index_select(2, index))
        layout = next(iter(plans.values())).layout
        if any(not _same_layout(p.layout, layout) for p in plans.values()):
            plans = {r: self._packed(r, ctx.shape, q.device) if p.layout_choice == "padded" else p
                     for r, p in plans.items()}
            layout = next(iter(plans.values())).layout
        for r, p in plans.items():
            if not _same_layout(p.layout, layout):
                raise ValueError(f"TableConfig.rules[{r}] ({self.config.rules[r].use}) planned on a token layout "
                                 f"({p.layout.order}, tile {p.layout.tile}) other than the call's other heads' "
                                 f"({layout.order}, tile {layout.tile}); give its rule the same order/tile knobs")
        if len(plans) == 1 and len(groups[next(iter(plans))]) == H:
            return next(iter(plans.values()))  # one rule for every head: its plan as it is
        dense = self._dense_plan(ctx.shape, q.device, layout) if None in rules else None
        sources = {r: p for r, p in plans.items()}
        nb = layout.num_blocks
        batch = max([_as4(p.any_blocks).shape[0] for p in plans.values()] + [1])
        any_blocks = torch.empty(batch, H, nb, nb, dtype=torch.bool, device=q.device)
        full_blocks = torch.empty_like(any_blocks)
        owner = torch.empty(H, dtype=torch.long)  # which source decides head h's token mask
        local = torch.empty(H, dtype=torch.long)  # head h's index inside that source
        fns = []
        for r, heads in [*groups.items(), *([(None, [h for h, x in enumerate(rules) if x is None])] if dense else [])]:
            plan = sources[r] if r is not None else dense
            a4, f4 = _as4(plan.any_blocks), _as4(plan.full_blocks)
            for j, h in enumerate(heads):
                hj = j if a4.shape[1] > 1 else 0
                any_blocks[:, h] = a4[:, hj].expand(batch, nb, nb)
                full_blocks[:, h] = f4[:, hj].expand(batch, nb, nb)
                owner[h], local[h] = len(fns), hj
            fns.append(plan.block_mask.mask_mod)
        owner_d, local_d = owner.to(q.device), local.to(q.device)
        partial = any_blocks & ~full_blocks

        def head_allowed(b, h, q_idx, kv_idx):
            hh = h.clamp(0, H - 1) if isinstance(h, torch.Tensor) else h
            out = None
            for i, fn in enumerate(fns):
                value = torch.as_tensor(fn(b, local_d[hh], q_idx, kv_idx), device=q.device)
                out = value if out is None else torch.where(owner_d[hh] == i, value, out)
            return out

        def union_allowed(q_idx, kv_idx):
            return torch.stack(torch.broadcast_tensors(*[
                p.slot_allowed(q_idx, kv_idx) for p in [*plans.values(), *([dense] if dense else [])]])).any(0)

        from ..plan import _block_mask

        n = layout.num_slots
        return HeadwisePlan(
            layout=layout, block_mask=_block_mask(full_blocks, partial, head_allowed, layout.block_size, n),
            full_blocks=full_blocks, any_blocks=any_blocks, text_kv_blocks=next(iter(plans.values())).text_kv_blocks,
            slot_allowed=union_allowed, density=any_blocks.float().mean(), head_allowed=head_allowed)


__all__ = ["TableMethod", "HeadwisePlan"]
