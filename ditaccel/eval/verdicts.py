"""What the numbers mean: did anything run sparse, and how close is the output to dense.

Quality bands follow the field's usual reading of each metric against the dense output of the same
seed (Sparse VideoGen, Radial Attention, STA report PSNR in the high 20s to 30s as "close"):

========  ===================  ====================  ======================
metric    close to dense        noticeable            visibly different
========  ===================  ====================  ======================
PSNR      >= 30 dB              20 - 30 dB            < 20 dB
SSIM      >= 0.90               0.70 - 0.90           < 0.70
LPIPS     <= 0.10               0.10 - 0.30           > 0.30
========  ===================  ====================  ======================

The overall band is the worst band of the metrics that could be computed.
"""

from __future__ import annotations

BANDS = ("identical", "close", "noticeable", "visibly different")
PSNR_CLOSE, PSNR_DIFFERENT = 30.0, 20.0
SSIM_CLOSE, SSIM_DIFFERENT = 0.90, 0.70
LPIPS_CLOSE, LPIPS_DIFFERENT = 0.10, 0.30


def _band(value, close, different, higher_is_better: bool) -> str | None:
    if value is None:
        return None
    if higher_is_better:
        return "close" if value >= close else "visibly different" if value < different else "noticeable"
    return "close" if value <= close else "visibly different" if value > different else "noticeable"


def quality_verdict(quality: dict) -> dict:
    """``{"band", "per_metric": {metric: band}, "line", "warnings"}`` for a :func:`compare_media` result
    (``psnr`` None and ``identical`` True for outputs equal to dense)."""
    if quality.get("identical"):
        return {"band": "identical", "per_metric": {}, "warnings": [],
                "line": "identical to dense (every pixel equal: PSNR infinite)"}
    per = {"psnr": _band(quality.get("psnr"), PSNR_CLOSE, PSNR_DIFFERENT, True),
           "ssim": _band(quality.get("ssim"), SSIM_CLOSE, SSIM_DIFFERENT, True),
           "lpips": _band(quality.get("lpips"), LPIPS_CLOSE, LPIPS_DIFFERENT, False)}
    per = {k: v for k, v in per.items() if v is not None}
    band = max(per.values(), key=BANDS.index) if per else None
    reading = {"close": "close to dense", "noticeable": "noticeably different from dense",
               "visibly different": "visibly different from dense (another image)"}
    parts = []
    if quality.get("psnr") is not None:
        parts.append(f"PSNR {quality['psnr']:.1f} dB")
    if quality.get("ssim") is not None:
        parts.append(f"SSIM {quality['ssim']:.3f}")
    if quality.get("lpips") is not None:
        parts.append(f"LPIPS {quality['lpips']:.3f}")
    line = f"{reading[band]} ({', '.join(parts)}; close: PSNR >= {PSNR_CLOSE:g} dB, " \
           f"different: < {PSNR_DIFFERENT:g} dB)" if band else "no quality metric could be computed"
    warnings = []
    worst, mean = quality.get("psnr_min"), quality.get("psnr")
    per_frame = quality.get("psnr_per_frame") or []
    if worst is not None and mean is not None and len(per_frame) > 1:
        worst_band = _band(worst, PSNR_CLOSE, PSNR_DIFFERENT, True)
        mean_band = _band(mean, PSNR_CLOSE, PSNR_DIFFERENT, True)
        if BANDS.index(worst_band) > BANDS.index(mean_band):  # the mean hides a frame of a worse band
            frame = per_frame.index(worst) if worst in per_frame else None
            warnings.append(f"worst frame{'' if frame is None else f' ({frame})'} is {worst:.1f} dB "
                            f"({worst_band}) against a mean of {mean:.1f} dB: look at it before trusting the mean")
    return {"band": band, "per_metric": per, "line": line, "warnings": warnings}


def sparsity_verdict(stats: dict, config: dict | None = None) -> dict:
    """``{"ran_sparse": bool, "line", "reason"}`` from a handle's ``stats()``: nothing ran sparse when
    every call was dense (by schedule, dense layers or a plan that kept every block) or reused."""
    calls = stats.get("calls") or 0
    dense = stats.get("dense_calls") or 0
    reused = stats.get("reuse_calls") or 0
    density = stats.get("mean_density")
    config = config or stats.get("config") or {}
    if not calls:
        return {"ran_sparse": False, "reason": "no self-attention call was intercepted",
                "line": "nothing ran sparse: no self-attention call was intercepted"}
    sparse_calls = calls - dense - reused
    if sparse_calls <= 0 and not reused:
        why = "every call ran dense"
        if config.get("method") == "dense":
            why = "the method is 'dense' (the control: every block through our path)"
        elif config.get("dense_steps"):
            why = (f"every step was a dense step (dense_steps={config['dense_steps']} covers the call's steps) "
                   "or a dense layer")
        return {"ran_sparse": False, "reason": why, "line": f"nothing ran sparse: {why}"}
    if density is not None and density >= 1.0 - 1e-9 and not reused:
        why = ("every plan kept every block (the window or tile covers the whole grid at this size; "
               "try a smaller window or a larger size)")
        if config.get("method") == "dense":
            why = "the method is 'dense' (the control: every block through our path)"
        return {"ran_sparse": False, "reason": why, "line": f"nothing ran sparse: {why}"}
    parts = [f"{sparse_calls} of {calls} attention calls sparse"]
    if reused:
        parts.append(f"{reused} reused from a cache")
    if density is not None:
        parts.append(f"mean density {density:.3f}")
    return {"ran_sparse": True, "reason": None, "line": ", ".join(parts)}


__all__ = ["BANDS", "quality_verdict", "sparsity_verdict"]
