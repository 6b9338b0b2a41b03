"""What an adapter tells ditaccel about one diffusers model family.

This is the only place that knows models. An adapter answers: which transformer(s) a pipeline
has, which of their modules are self-attention over the latent tokens (with their layer index),
where text tokens sit in that attention (none / prefix / suffix), and how a forward's arguments
give the token grid (T, H, W), the text length, the batch and the timestep. It also holds the
family's presets: the config ``method=None`` picks and per-method defaults tuned for the family.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

import torch

from ..config import AttentionConfig, resolve_count


@dataclass(frozen=True)
class CallFacts:
    """One transformer forward as its self-attention will see it.

    ``text_len``: the dense tokens beside the grid's (text, and extra tokens such as a context image
    or history latents); ``None`` leaves it to each attention call: every token beyond the grid's.
    ``text_position``: overrides the adapter's for this forward. ``token_order``: when the dense tokens
    are not one run before or after the grid's (e.g. [text, image, context image]), the model's
    sequence positions listed in the order ditaccel plans in (the dense run first for ``prefix``,
    last for ``suffix``); attention calls are permuted into it and back (a function of the call's
    length when a run's length is only known there). ``dense_reason``: why this forward must run the
    model's own attention (e.g. samples whose grids sit at different offsets).
    """

    grid: tuple[int, int, int]
    text_len: int | None
    batch: int
    timestep: float | None
    text_position: str | None = None
    token_order: torch.Tensor | None = None
    dense_reason: str = ""  # non-empty: this forward's layout cannot be planned; its attention runs dense


class ModelAdapter:
    family: str = ""
    transformer_classes: tuple[str, ...] = ()
    pipeline_attrs: tuple[str, ...] = ("transformer",)
    text_position: str = "none"
    preset_source: str = ""
    """Where the preset comes from (paper or repository and its configuration, or "not yet calibrated")."""
    attention_route: str = "dispatch"
    """How its self-attention product is intercepted, as ``intercept.processor_kind`` finds it:
    "dispatch" (our diffusers backend set on each processor), "dispatch-active" (the processor calls
    ``dispatch_attention_fn`` without a backend of its own: ours is made active around the module),
    "sdpa" (a TorchFunctionMode around ``F.scaled_dot_product_attention``)."""
    tokens_note: str = ""
    """What else shares the self-attention sequence besides the grid and the text, and how it is kept."""
    accepts_plain_modules: bool = False
    """Whether attention modules without a diffusers processor may be intercepted (SDPA route)."""
    typical_steps: int = 50
    """The step count of the family pipeline's default call: what a preset's dense fraction is
    counted against on a bare transformer, which has no scheduler to count the call's steps."""
    context_parallel_streams: bool = False
    """For a model with text in self-attention: whether diffusers' context parallelism is known to split its
    text and latent streams separately and its processor to join each rank's pieces in ``text_position``
    order ([text_r | latent_r] or [latent_r | text_r]), which ``parallel/order.py`` maps back onto the
    model's order (verified by tests/test_parallel_joint.py); False refuses context parallelism on it."""

    # --- finding things -------------------------------------------------------------------------
    def matches(self, transformer: torch.nn.Module) -> bool:
        return type(transformer).__name__ in self.transformer_classes

    def transformers(self, obj) -> list[tuple[str, torch.nn.Module]]:
        """(attribute name, transformer) pairs of a pipeline, or [("transformer", obj)] for a bare model."""
        if isinstance(obj, torch.nn.Module):
            return [("transformer", obj)]
        found = [(a, getattr(obj, a, None)) for a in self.pipeline_attrs]
        return [(a, m) for a, m in found if m is not None]

    def self_attention_modules(self, transformer) -> list[tuple[str, int, torch.nn.Module]]:
        """(module name, layer index, module) of every self-attention over the latent tokens."""
        raise NotImplementedError

    # --- reading a forward ----------------------------------------------------------------------
    def call_facts(self, transformer, args: tuple, kwargs: dict[str, Any]) -> CallFacts:
        raise NotImplementedError

    @staticmethod
    def bind(transformer, args, kwargs) -> dict[str, Any]:
        sig = _signature(type(transformer))
        return sig.bind(transformer, *args, **kwargs).arguments

    @staticmethod
    def scalar_timestep(timestep) -> float | None:
        if timestep is None:
            return None
        if isinstance(timestep, torch.Tensor):
            return float(timestep.detach().float().max().item()) if timestep.numel() else None
        return float(timestep)

    # --- presets --------------------------------------------------------------------------------
    def preset(self) -> AttentionConfig:
        raise NotImplementedError

    def preset_for(self, obj) -> AttentionConfig:
        """The preset for this pipeline (or bare transformer; None: no object): the family's, unless
        the adapter knows a better one for its architecture."""
        return self.preset()

    def method_defaults(self, method: str, target=None) -> dict[str, Any]:
        """Family-tuned field defaults for ``method`` on ``target`` (the pipeline or transformer; None:
        the family's), overridden by the user's fields."""
        return {}

    def for_target(self, config: AttentionConfig, target) -> tuple[AttentionConfig, str | None]:
        """A preset or family default fitted to what it is applied to: on a bare transformer (no
        scheduler counts the call's steps) a dense fraction becomes its count at the family pipeline's
        default step count, with a note saying so; anything else is returned as it is."""
        if not isinstance(target, torch.nn.Module):
            return config, None
        notes = []
        if isinstance(config.dense_steps, float):
            count = resolve_count(config.dense_steps, self.typical_steps)
            notes.append(f"dense_steps={config.dense_steps:g} (a fraction of the call's steps) on a bare transformer, "
                         f"which has no scheduler to count them: runs as {count}, its count at the {self.family} "
                         f"pipeline's default {self.typical_steps} steps")
            config = dataclasses.replace(config, dense_steps=count)
        from ..methods.table_config import TableConfig

        if isinstance(config, TableConfig) and config.fractional_rules:
            config = config.at_step_count(self.typical_steps)
            notes.append(f"the table's step ranges (fractions of the call's steps) on a bare transformer, which has no "
                         f"scheduler to count them: run as their steps at the {self.family} pipeline's default "
                         f"{self.typical_steps} steps")
        return config, ("; ".join(notes) or None)


_SIGNATURES: dict[type, inspect.Signature] = {}


def _signature(cls) -> inspect.Signature:
    if cls not in _SIGNATURES:
        _SIGNATURES[cls] = inspect.signature(cls.forward)
    return _SIGNATURES[cls]


def blocks(transformer, attr_paths: tuple[tuple[str, str], ...]) -> list[tuple[str, int, torch.nn.Module]]:
    """Self-attention modules found at ``<block list>.<i>.<attention attr>``, numbered in order."""
    found = []
    for list_name, attn_attr in attr_paths:
        for i, block in enumerate(getattr(transformer, list_name, None) or []):
            module = getattr(block, attn_attr, None)
            if module is not None:
                found.append((f"{list_name}.{i}.{attn_attr}", len(found), module))
    return found


CONSERVATIVE_DENSE_FRACTION = 0.2
CONSERVATIVE_TOPK = 0.3


def conservative_preset() -> AttentionConfig:
    """The preset of a family nobody has calibrated yet: ``topk`` keeping 30% of the key blocks (plan
    density >= 0.3; text and extra tokens stay dense on top) after the first 20% of the call's steps
    run dense (a fraction: it follows the step count of every call)."""
    from ..methods import TopKConfig

    return TopKConfig(topk=CONSERVATIVE_TOPK, dense_steps=CONSERVATIVE_DENSE_FRACTION)


def conservative_source(typical_steps: int) -> str:
    n = resolve_count(CONSERVATIVE_DENSE_FRACTION, typical_steps)
    return (f"not yet calibrated: conservative choice, topk={CONSERVATIVE_TOPK} (density >= 0.3), the first 20% of "
            f"the call's steps dense (dense_steps={CONSERVATIVE_DENSE_FRACTION}; {n} of the pipeline's default "
            f"{typical_steps}, the count a bare transformer runs)")


class UncalibratedPreset:
    """Mixin (first base) of an adapter whose family nobody has calibrated: the conservative preset,
    its source stated from the adapter's ``typical_steps`` (the one number it sets)."""

    @property
    def preset_source(self) -> str:
        return conservative_source(self.typical_steps)

    def preset(self) -> AttentionConfig:
        return conservative_preset()


def dense_runs_first(before: int, n_video: int, after: int) -> torch.Tensor:
    """Token order for a sequence [before, grid, after] with both dense runs planned as one prefix:
    the ``before`` tokens, then the ``after`` ones, then the grid's."""
    S = before + n_video + after
    return torch.cat([torch.arange(before), torch.arange(before + n_video, S), torch.arange(before, before + n_video)])


def dense_after_prefix(n_video: int, after: int):
    """Token order for [prefix of unknown length, grid, ``after`` tokens]: a function of the attention
    call's length (the prefix is what is left), planning both dense runs as one prefix."""
    def order(seq_len: int) -> torch.Tensor:
        return dense_runs_first(seq_len - n_video - after, n_video, after)

    return order
