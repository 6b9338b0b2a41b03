"""The block map a method picks at one self-attention call, caught through ``handle.observe`` and
drawn after the run (bench figures, the demo's block-map panel)."""

from __future__ import annotations

import torch


class MaskProbe:
    """Keeps q and k of one self-attention call (a layer at a step) through ``handle.observe``, so
    the block map the method picks there can be drawn after the run."""

    def __init__(self, config, step: int, layer: int | None):
        self.config = config
        self.step = step
        self.layer = layer
        self.info: dict | None = None
        self.q = self.k = None

    def __call__(self, info: dict, q, k, v) -> None:
        if self.info is not None or info["step"] != self.step:
            return
        wanted = info["layer"] == self.layer if self.layer is not None else not self.config.layer_is_dense(info["layer"])
        if wanted:
            self.info, self.q, self.k = dict(info), q.detach().clone(), k.detach().clone()

    def block_map(self, head: int) -> dict:
        """``{"kind": "static"|"dynamic"|"dense"|"none", "map": [nq, nk] int8 (0 skipped, 1 partial,
        2 full) or None, "layer", "step", "head", "density", "note"}``."""
        result = {"kind": "none", "map": None, "layer": self.layer, "step": self.step, "head": head,
                  "density": None, "note": None}
        if self.info is None:
            result["note"] = "no sparse call was seen at this layer and step"
            return result
        from ..methods import AttentionMethod, CallShape, make_method

        info = self.info
        result["layer"] = info["layer"]
        shape = CallShape(tuple(info["grid"]), info["text_len"], info["text_position"])
        method = make_method(self.config)
        # Static methods keep the base plan_for (one plan per shape); the others choose per call.
        kind = "static" if type(method).plan_for is AttentionMethod.plan_for else "dynamic"
        try:
            # What the runtime asks: None = dense attention. Cross-step state starts empty here.
            plan = method.decide(_fresh_context(self.config, info, shape, self.q), self.q, self.k)
        except Exception as exc:  # noqa: BLE001 - a drawing aid; the cell itself ran fine
            result.update(kind=kind, note=f"not drawable here ({type(exc).__name__}: {exc})")
            return result
        if plan is None:
            result.update(kind="dense", note="the method runs dense attention for this call")
            return result
        any_b, full_b = _one_head(plan.any_blocks, head), _one_head(plan.full_blocks, head)
        block_map = any_b.to(torch.int8) + (full_b & any_b).to(torch.int8)
        result.update(kind=kind, map=block_map.cpu().numpy(), density=float(any_b.float().mean()),
                      note="selection of this call, scored afresh (no cross-step reuse)" if kind == "dynamic" else None)
        return result


def _one_head(blocks: torch.Tensor, head: int) -> torch.Tensor:
    """[nq, nk], or a per-call selection [B|1, H|1, nq, nk]: batch 0, ``head`` (clamped to what is there)."""
    if blocks.dim() == 4:
        blocks = blocks[0]
    if blocks.dim() == 3:
        blocks = blocks[min(head, blocks.shape[0] - 1)]
    return blocks


def _fresh_context(config, info: dict, shape, q):
    """A CallContext with empty cross-step state, for asking a dynamic method what it selects."""
    from ..state import CallContext, StateStore

    store = StateStore(getattr(config, "cache_budget_mb", 1024.0))
    B, _, H, _ = q.shape
    return CallContext(transformer=info["transformer"], layer=info["layer"], step=info["step"], branch=info["branch"],
                       shape=shape, batch=B, heads=H, state=store.state(info["transformer"], info["layer"],
                                                                         info["branch"], (shape, B, H)),
                       store=store)


__all__ = ["MaskProbe"]
