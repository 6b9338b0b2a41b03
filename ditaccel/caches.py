"""Across denoising steps: the caches every method composes with (knobs on ``AttentionConfig``).

Per self-attention call, in this order:

- **output share** [DiTFastAttn, attention sharing across timesteps]: at ``output_share_steps``
  (and ``output_share_layers``, empty = all), the output this (layer, branch) produced at its last
  computed step is returned outright;
- **cfg share** [DiTFastAttn, conditional redundancy]: at ``cfg_share_steps`` the ``"uncond"``
  branch returns the output the ``"cond"`` branch computed for the same layer at the same step
  (pipelines that run the two branches as separate calls: Wan, HunyuanVideo, Flux; a pipeline that
  stacks them in one batch, like CogVideoX, has nothing to share and runs as usual);
- otherwise the method decides: dense, or a sparse plan;
- **residual cache** [DiTFastAttn, window attention with residual sharing]: with
  ``residual_refresh = N``, every N-th sparse step (counted from the first) runs dense *and*
  sparse and stores ``dense - sparse``; the steps between return ``sparse + stored residual``.
  A table's rules may instead say it per head (``TableRule.residual``: ``refresh`` / ``reuse``,
  asked through the method's ``residual_heads``; ``_rule_residuals``);
- **renormalise** [Re-ttention]: at every dense step (and residual refresh step) the attention
  mass the method's plan would keep, ``rho = exp(lse_kept - lse_all)`` per (batch, query, head), is
  measured; sparse steps then return ``rho * sparse``: the kept keys get the weight they have
  under the full softmax instead of being renormalised to 1.

Stored tensors live in the call's ``LayerState`` (``ditaccel.state``), so they are per transformer,
layer and CFG branch, dropped at every new pipeline call and shape change, and bounded by
``cache_budget_mb``: a tensor over budget is not stored, and the step that needed it computes.
"""

from __future__ import annotations

import warnings

import torch

from .config import AttentionConfig
from .methods.base import resolved_dense_steps

COND, UNCOND = "cond", "uncond"


class CrossStepCaches:
    def __init__(self, config: AttentionConfig, method):
        self.config = config
        self.method = method
        self._warned = False

    def run(self, ctx, q, k, executor, dense):
        """(output [B, S, H, D], outcome "dense" | "sparse" | "reuse", density) for one call."""
        cfg = self.config
        shared, source = self._shared(ctx)
        if shared is not None:
            if source == "cfg":  # what this (layer, branch) produced at this step: a later output share reuses it
                self._remember(ctx, shared)
            return shared, "reuse", 0.0

        plan = self.method.decide(ctx, q, k)
        if plan is None:
            out = dense()
            if cfg.renormalise and not cfg.layer_is_dense(ctx.layer):
                self._measure_mass(ctx, executor, self.method.plan_for(ctx, q, k))
            outcome, density = "dense", 1.0
        elif cfg.residual_refresh and (ctx.step - resolved_dense_steps(cfg, ctx.dense_steps)) % cfg.residual_refresh == 0:
            out = dense()
            sparse = executor.run(plan)
            if cfg.renormalise:
                sparse = sparse * self._measure_mass(ctx, executor, plan)
            ctx.state.put("residual", out - sparse)
            ctx.count("residual_refresh")
            outcome, density = "dense", 1.0
        else:
            out = executor.run(plan)
            rho = ctx.state.get("kept_mass") if cfg.renormalise else None
            if rho is not None:
                out = out * rho
            residual = ctx.state.get("residual") if cfg.residual_refresh else None
            if residual is not None:
                out = out + residual
            outcome, density = "sparse", plan.density
            heads = self.method.residual_heads(ctx) if hasattr(self.method, "residual_heads") else None
            if heads:
                out, refreshed = self._rule_residuals(ctx, out, heads, dense)
                if refreshed:
                    outcome, density = "dense", 1.0
        self._remember(ctx, out)
        return out, outcome, density

    def _rule_residuals(self, ctx, out, heads: dict, dense):
        """Per head under a residual rule (``heads``: local head -> (mode, key)): ``reuse`` adds the
        head's stored residual; ``refresh`` -- or a ``reuse`` with none stored -- returns the dense
        output and stores ``dense - out`` for the head. Returns (output, whether dense was computed)."""
        out = out.clone()
        refresh = []
        for h, (mode, key) in sorted(heads.items()):
            name = f"rule_residual.{key}.{ctx.head_offset + h}"
            stored = ctx.state.get(name) if mode == "reuse" else None
            if stored is None:
                if mode == "reuse":
                    ctx.count("residual_missing")
                refresh.append((h, name))
            else:
                out[:, :, h] += stored
        if refresh:
            full = dense()
            for h, name in refresh:
                ctx.state.put(name, full[:, :, h] - out[:, :, h])
                out[:, :, h] = full[:, :, h]
            ctx.count("residual_refresh")
        return out, bool(refresh)

    # --- sharing ---------------------------------------------------------------------------------
    def _shared(self, ctx):
        """(the output to return instead of attention, "output" | "cfg"), or (None, None)."""
        cfg = self.config
        if cfg.shares_output_at(ctx.layer, ctx.step, ctx.total_steps):
            last = ctx.state.get("last_output")
            if last is not None:
                return last, "output"
        if cfg.shares_cfg_at(ctx.layer, ctx.step, ctx.total_steps):
            if ctx.branch not in (COND, UNCOND):
                self._warn_branch(ctx.branch)
            elif ctx.branch == UNCOND:
                cond = ctx.store.peek(ctx.transformer, ctx.layer, COND, ctx.shape_key)
                stored = cond.get("cfg_output") if cond is not None else None
                if stored is not None and stored[0] == ctx.step:
                    return stored[1], "cfg"
        return None, None

    def _remember(self, ctx, out) -> None:
        cfg = self.config
        if cfg.keeps_output_at(ctx.layer, ctx.step, ctx.total_steps):
            ctx.state.put("last_output", out)
        elif "last_output" in ctx.state:
            ctx.state.pop("last_output")
        if ctx.branch == COND and cfg.shares_cfg_at(ctx.layer, ctx.step, ctx.total_steps):
            ctx.state.put("cfg_output", (ctx.step, out))

    def _warn_branch(self, branch: str) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(f"ditaccel: cfg_share_steps is set but this pipeline runs CFG in one call (branch "
                          f"{branch!r}, not separate 'cond'/'uncond' calls): nothing is shared", stacklevel=4)

    # --- renormalise -----------------------------------------------------------------------------
    def _measure_mass(self, ctx, executor, plan) -> torch.Tensor:
        rho = executor.kept_mass(plan)
        ctx.state.put("kept_mass", rho)
        ctx.count("mass_measured")
        return rho


__all__ = ["CrossStepCaches"]
