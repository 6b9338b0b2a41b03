"""Does a video show what its caption says? And how local is the model's attention?

Caption check (works on generated and on ground-truth clips alike; the tests run it on ground
truth to validate it): the foreground is every pixel that is saturated and bright (backgrounds in
:mod:`.data` are dark and desaturated); its colour is the majority vote of the nearest palette
colour over those pixels; its motion is the displacement of the foreground centroid between the
first and the last frames, named by its larger axis.

Attention locality: for every self-attention call of the transformer, the share of each query's
softmax mass that falls on keys within the ``3 x 3 x 3`` tiles around the query's own tile, averaged
over queries, heads and denoising steps, per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import COLOURS, DIRECTIONS

SATURATION_MIN = 0.30  # max - min channel
BRIGHTNESS_MIN = 0.50  # max channel
MIN_PIXELS = 4  # fewer foreground pixels than this in a frame: no shape found
MIN_MOTION_PX = 2.0


def _as_video(video) -> np.ndarray:
    video = np.asarray(video, dtype=np.float32)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"video must be [frames, height, width, 3], got shape {video.shape}")
    return video


def foreground_mask(video) -> np.ndarray:
    """Boolean ``[frames, height, width]``: saturated, bright pixels."""
    video = _as_video(video)
    top, bottom = video.max(-1), video.min(-1)
    return (top - bottom >= SATURATION_MIN) & (top >= BRIGHTNESS_MIN)


def dominant_colour(video) -> str | None:
    """The palette colour most foreground pixels are nearest to; None without a foreground."""
    video = _as_video(video)
    mask = foreground_mask(video)
    if mask.sum() < MIN_PIXELS:
        return None
    pixels = video[mask]
    palette = np.asarray(list(COLOURS.values()), dtype=np.float32)
    nearest = np.argmin(((pixels[:, None, :] - palette[None]) ** 2).sum(-1), axis=1)
    return list(COLOURS)[int(np.bincount(nearest, minlength=len(palette)).argmax())]


def centroid(mask: np.ndarray) -> tuple[float, float] | None:
    if mask.sum() < MIN_PIXELS:
        return None
    ys, xs = np.nonzero(mask)
    return float(ys.mean()), float(xs.mean())


def motion_direction(video) -> str | None:
    """Direction of the foreground centroid from the first to the last frame; None if unclear."""
    mask = foreground_mask(video)
    first, last = centroid(mask[0]), centroid(mask[-1])
    if first is None or last is None:
        return None
    dy, dx = last[0] - first[0], last[1] - first[1]
    if max(abs(dy), abs(dx)) < MIN_MOTION_PX:
        return None
    step = (int(np.sign(dy)), 0) if abs(dy) > abs(dx) else (0, int(np.sign(dx)))
    return next(name for name, d in DIRECTIONS.items() if d == step)


@dataclass
class Agreement:
    colour: float  # fraction of clips whose dominant colour matches the caption
    direction: float  # fraction of clips whose motion matches the caption
    rows: list  # (caption, found colour, found direction) per clip

    def __str__(self) -> str:
        return f"colour {self.colour:.0%}, direction {self.direction:.0%} over {len(self.rows)} clips"


def caption_agreement(videos, specs) -> Agreement:
    """How often each video's colour and motion match its clip spec (``.colour``, ``.direction``)."""
    videos, specs = list(videos), list(specs)
    if len(videos) != len(specs) or not videos:
        raise ValueError(f"videos and specs must be non-empty and of equal length, got {len(videos)} and {len(specs)}")
    rows = [(s.caption, dominant_colour(v), motion_direction(v)) for v, s in zip(videos, specs)]
    colour = sum(c == s.colour for (_, c, _), s in zip(rows, specs)) / len(specs)
    direction = sum(d == s.direction for (_, _, d), s in zip(rows, specs)) / len(specs)
    return Agreement(colour, direction, rows)


# --- attention locality ---------------------------------------------------------------------------

def tile_neighbourhood(grid, tile, reach: int = 1) -> torch.Tensor:
    """Bool ``[S, S]``: key within ``reach`` tiles of the query's tile on every axis (raster tokens)."""
    if len(grid) != 3 or len(tile) != 3 or min(tile) < 1:
        raise ValueError(f"grid and tile must be 3 positive ints each, got grid={grid}, tile={tile}")
    axes = torch.meshgrid(*(torch.arange(n) // t for n, t in zip(grid, tile)), indexing="ij")
    coords = torch.stack([a.reshape(-1) for a in axes], -1)  # [S, 3] tile coordinates
    return ((coords[:, None, :] - coords[None, :, :]).abs() <= reach).all(-1)


def local_mass(q: torch.Tensor, k: torch.Tensor, near: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Mean softmax mass on ``near`` keys, per head: q, k ``[B, S, H, D]`` -> ``[H]``."""
    B, S, H, D = q.shape
    q, k = q.float().transpose(1, 2), k.float().transpose(1, 2)  # [B, H, S, D]
    total = torch.zeros(H)
    for start in range(0, S, chunk):
        scores = q[:, :, start:start + chunk] @ k.transpose(-1, -2) / D**0.5
        probs = scores.softmax(-1)
        total += (probs * near[start:start + chunk]).sum(-1).sum((0, 2))
    return total / (B * S)


def attention_locality(pipe, prompt: str, tile=(1, 4, 4), seed: int = 0, **call) -> list[float]:
    """Per layer: mean attention mass within the 3x3x3 tiles around each query, over a whole call."""
    transformer = pipe.transformer
    p_t, p_h, p_w = transformer.config.patch_size
    height, width, frames = call["height"], call["width"], call["num_frames"]
    grid = ((frames - 1) // pipe.vae_scale_factor_temporal + 1,
            height // pipe.vae_scale_factor_spatial // p_h, width // pipe.vae_scale_factor_spatial // p_w)
    grid = (grid[0] // p_t, grid[1], grid[2])
    near = tile_neighbourhood(grid, tile).float()
    sums, counts = {}, {}

    def record(layer, q, k):
        if q.shape[1] != near.shape[0]:
            raise ValueError(f"self-attention over {q.shape[1]} tokens, expected grid {grid}")
        sums[layer] = sums.get(layer, 0.0) + float(local_mass(q, k, near).mean())
        counts[layer] = counts.get(layer, 0) + 1

    import ditaccel

    # Every step dense through the model's own attention; observe() sees each self-attention's q, k
    # (after the norms and RoPE) before that.
    steps = call.get("num_inference_steps", 50)
    with ditaccel.accelerate(pipe, "dense", dense_steps=steps) as handle, torch.no_grad():
        handle.observe(lambda info, q, k, v: record(info["layer"], q, k))
        pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), output_type="latent", **call)
    return [sums[i] / counts[i] for i in sorted(sums)]


def uniform_locality(grid, tile=(1, 4, 4)) -> float:
    """The same figure for attention spread evenly over all keys (the floor to compare against)."""
    return float(tile_neighbourhood(grid, tile).float().mean())


def generate(pipe, prompts, seed: int = 0, batch: int = 4, **call) -> list[np.ndarray]:
    """One video per prompt (``[F, H, W, 3]`` in [0, 1]); prompt ``i`` uses generator seed ``seed + i``."""
    videos = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + j) for j in range(len(chunk))]
        with torch.no_grad():
            out = pipe(prompt=[p.caption for p in chunk], generator=generators, output_type="np", **call).frames
        videos.extend(np.asarray(v, dtype=np.float32) for v in out)
    return videos


def held_out_agreement(pipe, count: int = 16, seed: int = 0, **call) -> tuple[Agreement, list[np.ndarray]]:
    """Generate the first ``count`` held-out prompts and check each video against its caption."""
    from .data import held_out_prompts

    prompts = held_out_prompts(count)
    videos = generate(pipe, prompts, seed=seed, **call)
    return caption_agreement(videos, prompts), videos


def report(pipe, count: int = 16, seed: int = 0, tile=(1, 4, 4), **call) -> dict:
    """Every figure the issue asks for: held-out caption agreement and per-layer locality vs random."""
    import time

    from .model import build

    started = time.perf_counter()
    agreement, _ = held_out_agreement(pipe, count=count, seed=seed, **call)
    seconds = time.perf_counter() - started
    prompt = "a red square moving left on a gray striped background"
    trained = attention_locality(pipe, prompt, tile=tile, seed=seed, **call)
    random_pipe = build(seed=0, transformer_config=dict(pipe.transformer.config), vae_config=dict(pipe.vae.config))
    random = attention_locality(random_pipe, prompt, tile=tile, seed=seed, **call)
    grid = ((call["num_frames"] - 1) // 4 + 1, call["height"] // 8, call["width"] // 8)
    return {"colour": agreement.colour, "direction": agreement.direction, "rows": agreement.rows,
            "generate_s_per_clip": seconds / count, "tile": list(tile), "grid": list(grid),
            "locality_trained": trained, "locality_random": random, "locality_uniform": uniform_locality(grid, tile)}


def main(argv=None) -> int:
    import argparse
    import json

    from .. import embedded
    from . import load

    parser = argparse.ArgumentParser(prog="python -m ditaccel.pipelines.reference.analysis",
                                     description="Held-out caption agreement and attention locality of a trained "
                                                 "reference pipeline (default: the shipped one).")
    parser.add_argument("--path", help="pipeline directory (default: the shipped weights)")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=embedded.DEFAULTS["num_inference_steps"])
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    call = dict(embedded.DEFAULTS, num_inference_steps=args.steps)
    result = report(load(path=args.path), count=args.count, seed=args.seed, **call)
    for caption, colour, direction in result["rows"]:
        print(f"{caption:60s} -> {colour}, {direction}")
    print(f"colour {result['colour']:.0%}  direction {result['direction']:.0%}  "
          f"({result['generate_s_per_clip']:.1f} s per clip)")
    print(f"local 3x3x3-tile mass, tile {tuple(result['tile'])} on grid {tuple(result['grid'])} "
          f"(uniform attention: {result['locality_uniform']:.3f})")
    for i, (t, r) in enumerate(zip(result["locality_trained"], result["locality_random"])):
        print(f"  layer {i}: trained {t:.3f}  random {r:.3f}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
