"""The comparison record as a terminal table: the header, step times, figures and verdicts."""

from __future__ import annotations

from .timing import describe_ratio


def _fmt(x, spec: str = ".3f", none: str = "n/a") -> str:
    return none if x is None else format(x, spec)


def effective_knobs(config) -> dict:
    """The config's fields with the values that act: a ``None`` that stands for a default rule
    (topk's ``topk=None`` with no ``cdf`` acts as 0.25) shows that value."""
    knobs = config.to_dict()
    rule = getattr(config, "selection_rule", None)
    if callable(rule):
        knobs.update(rule())
    return knobs


def header(model: str, pipeline: str, device: str, dtype: str, shape: dict, method: str, config: dict) -> list[str]:
    """What will run, printed before the first (long) run (``config``: :func:`effective_knobs`)."""
    size = " x ".join(str(shape[k]) for k in ("frames", "height", "width") if shape.get(k) is not None)
    knobs = ", ".join(f"{k}={v}" for k, v in config.items() if k != "method")
    return [f"ditaccel compare: {pipeline} ({model}) on {device}, {dtype}; {size or 'default size'}, "
            f"{shape.get('steps') or 'default'} steps",
            f"method {method}: {knobs}"]


def large_grid_warning(device: str, shape: dict, reference_pixels: int) -> str | None:
    """A CPU run far above the embedded pipeline's size takes minutes per step: say so up front."""
    if device != "cpu" or not shape.get("height") or not shape.get("width"):
        return None
    pixels = shape["height"] * shape["width"] * (shape.get("frames") or 1)
    if pixels <= 4 * reference_pixels:
        return None
    return (f"warning: {pixels / reference_pixels:.0f}x the embedded pipeline's pixels on a CPU — each run may take "
            "many minutes; pass --height/--width/--frames/--steps to try a smaller call first")


def format_report(record: dict) -> str:
    """``Comparison.to_dict()`` -> the table ``ditaccel compare`` prints."""
    t, q, dens = record["timing"], record["quality"], record["density"]
    method = record["method"]
    lines = ["", f"{'step':>6} {'dense ms':>10} {method + ' ms':>12} {'density':>8}"]
    for i, (dm, am) in enumerate(zip(t["dense_step_ms"], t["accel_step_ms"])):
        ds = dens["per_step"][i] if i < len(dens["per_step"]) else None
        lines.append(f"{i:>6} {dm:>10.1f} {am:>12.1f} {_fmt(ds):>8}")
    repeats = t["repeats"]
    lines.append(f"{'loop':>6} {_fmt(t['dense_median_ms'], '.0f'):>10} {_fmt(t['accel_median_ms'], '.0f'):>12}"
                 f"   (median of {repeats} interleaved repeat{'s' if repeats != 1 else ''}; per step: median)")
    rng = t.get("speedup_range")
    spread = f", repeats {rng[0]:.2f}-{rng[1]:.2f}" if rng else ""
    lpips = _fmt(q.get("lpips"), ".4f", none=f"n/a ({q.get('lpips_note')})")
    psnr = "inf (identical)" if q.get("identical") else f"{_fmt(q.get('psnr'), '.2f')} dB"
    load = t.get("other_load_cores")
    lines += [
        "",
        f"speedup         {describe_ratio(t['speedup'])} (dense ÷ accelerated over the denoising loop, "
        f">1 = faster{spread}); sparse steps only: {describe_ratio(t['speedup_sparse_steps'])}",
        f"noise           dense spread {_fmt(t['dense_spread'], '.0%')}, accelerated spread "
        f"{_fmt(t['accel_spread'], '.0%')}, dense drift {_fmt(t['drift'], '+.0%')}, other load "
        f"{_fmt(load, '.1f')} of {t['cores']} cores",
        f"mean density    {_fmt(dens['mean'])}  ({dens['calls']} attention calls, {dens['dense_calls']} dense, "
        f"{dens['reuse_calls']} reused)",
        f"PSNR            {psnr} (worst frame {_fmt(q.get('psnr_min'), '.2f')} dB)",
        f"SSIM            {_fmt(q.get('ssim'), '.4f')}",
        f"LPIPS           {lpips}",
        f"latent rel-L2   {_fmt(q.get('latent_rel_l2'), '.4g')}",
        f"wall time       {record['wall_s']:.1f} s",
        "",
    ]
    lines += record["verdicts"]
    if record.get("files"):
        lines += ["", f"wrote           {', '.join(record['files'].values())}"]
    return "\n".join(lines)


__all__ = ["format_report", "header", "large_grid_warning"]
