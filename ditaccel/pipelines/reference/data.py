"""Procedural "moving shapes" videos with captions: the training data of the reference pipeline.

Every clip is one saturated shape (:data:`SHAPES` x :data:`COLOURS`) sliding in one of four
:data:`DIRECTIONS` at a constant speed over a dark, static, textured background, described by a
caption such as ``"a red square moving left on a gray striped background"``. Clips are drawn on the
fly from a seed (nothing is stored): :func:`sample_spec` picks the attributes, :func:`render` draws
the frames. Sizes and speeds are in pixels, so a smaller canvas is the same world seen through a
smaller window (the trainer uses that for cheap low-resolution steps).

Foreground colours are saturated and bright, backgrounds dark and desaturated (max channel <= 0.45),
so :mod:`.analysis` can find the shape by saturation alone and check a clip against its caption.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

COLOURS = {  # RGB in [0, 1]: the six corners of the colour cube, far apart from each other
    "red": (0.95, 0.12, 0.10),
    "green": (0.12, 0.85, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (0.95, 0.90, 0.10),
    "cyan": (0.10, 0.88, 0.95),
    "magenta": (0.90, 0.15, 0.90),
}
SHAPES = ("square", "circle", "triangle", "diamond")
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (dy, dx) on screen
BACKGROUNDS = {  # dark, desaturated base colours
    "gray": (0.24, 0.24, 0.24),
    "brown": (0.32, 0.22, 0.14),
    "navy": (0.10, 0.12, 0.32),
    "teal": (0.08, 0.26, 0.26),
}
TEXTURES = ("gradient", "striped", "checkered", "cloudy")
BACKGROUND_MAX = 0.45

SIZE_RANGE = (18.0, 34.0)  # shape diameter, pixels
SPEED_RANGE = (1.0, 2.4)  # pixels per frame

Combo = tuple  # (colour, shape, direction)


def all_combos() -> list[Combo]:
    return list(itertools.product(COLOURS, SHAPES, DIRECTIONS))


def held_out_combos() -> list[Combo]:
    """16 colour/shape/direction combinations never shown in training.

    Every (shape, direction) pair appears exactly once, colours cycle, so each word is still seen in
    training, only in other combinations.
    """
    colours, directions = list(COLOURS), list(DIRECTIONS)
    return [(colours[i % 6], SHAPES[i % 4], directions[i // 4]) for i in range(16)]


def training_combos() -> list[Combo]:
    held = set(held_out_combos())
    return [c for c in all_combos() if c not in held]


@dataclass(frozen=True)
class ClipSpec:
    """Everything that determines one clip (pixels and frames refer to the canvas it was drawn for)."""

    colour: str
    shape: str
    direction: str
    background: str
    texture: str
    size: float  # diameter, px
    speed: float  # px / frame
    start: tuple  # (y, x) centre in the first frame, px
    texture_seed: int

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} {self.texture} background"

    def centre(self, frame: int) -> tuple[float, float]:
        dy, dx = DIRECTIONS[self.direction]
        return self.start[0] + dy * self.speed * frame, self.start[1] + dx * self.speed * frame


def _check_canvas(height: int, width: int, num_frames: int) -> None:
    for name, value, low in (("height", height, 32), ("width", width, 32), ("num_frames", num_frames, 2)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def sample_spec(rng: np.random.Generator, height: int, width: int, num_frames: int, combos=None) -> ClipSpec:
    """A random clip for a ``height`` x ``width`` canvas of ``num_frames`` frames.

    ``combos`` restricts (colour, shape, direction) (default: :func:`training_combos`). The start
    point keeps the whole trajectory inside the canvas; the speed is lowered when the canvas is too
    small for the drawn one.
    """
    _check_canvas(height, width, num_frames)
    combos = training_combos() if combos is None else list(combos)
    if not combos:
        raise ValueError("combos must name at least one (colour, shape, direction), got an empty list")
    colour, shape, direction = combos[int(rng.integers(len(combos)))]
    for name, value, allowed in (("colour", colour, COLOURS), ("shape", shape, SHAPES),
                                 ("direction", direction, DIRECTIONS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    size = float(rng.uniform(*SIZE_RANGE))
    size = min(size, 0.6 * min(height, width))
    r = size / 2
    speed = float(rng.uniform(*SPEED_RANGE))
    dy, dx = DIRECTIONS[direction]
    along = height if dy else width
    speed = min(speed, (along - 2 * r - 2) / max(num_frames - 1, 1))
    travel = speed * (num_frames - 1)
    # Along the motion axis: anywhere the trajectory fits; across it: anywhere the shape fits.
    lo_along, hi_along = r + 1, along - r - 1 - travel
    a = float(rng.uniform(lo_along, max(hi_along, lo_along)))
    if dy < 0 or dx < 0:
        a = along - a
    across = width if dy else height
    c = float(rng.uniform(r + 1, across - r - 1))
    start = (a, c) if dy else (c, a)
    return ClipSpec(colour, shape, direction, str(rng.choice(list(BACKGROUNDS))), str(rng.choice(TEXTURES)),
                    size, speed, start, int(rng.integers(2**31)))


def _inside_distance(shape: str, yy: np.ndarray, xx: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (px, > 0 inside) from the shape's outline; yy, xx are offsets from its centre."""
    if shape == "square":
        return r * 0.85 - np.maximum(np.abs(yy), np.abs(xx))
    if shape == "circle":
        return r - np.sqrt(yy * yy + xx * xx)
    if shape == "diamond":
        return (r - (np.abs(yy) + np.abs(xx))) / math.sqrt(2)
    if shape == "triangle":  # apex up, base at the bottom
        base = 0.8 * r - yy
        # the two sides run from the apex (-r, 0) to the base corners (0.8 r, +-r)
        side = ((yy + r) - 1.8 * np.abs(xx)) / math.hypot(1.0, 1.8)
        return np.minimum(base, side)
    raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")


def _background(spec: ClipSpec, height: int, width: int) -> np.ndarray:
    rng = np.random.default_rng(spec.texture_seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / max(height, width)
    shade = 0.7 + 0.6 * (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    if spec.texture == "striped":
        period, phase, tilt = rng.uniform(8, 20), rng.uniform(0, 2 * math.pi), rng.uniform(0, math.pi)
        u = np.cos(tilt) * xx + np.sin(tilt) * yy
        shade = shade * (0.75 + 0.25 * (np.sin(2 * math.pi * u / period + phase) > 0))
    elif spec.texture == "checkered":
        period = rng.uniform(8, 20)
        oy, ox = rng.uniform(0, period, 2)
        shade = shade * (0.75 + 0.25 * ((((yy + oy) // period) + ((xx + ox) // period)) % 2))
    elif spec.texture == "cloudy":
        coarse = rng.uniform(0.6, 1.0, (height // 16 + 2, width // 16 + 2))
        iy, ix = yy / 16, xx / 16
        y0, x0 = iy.astype(int), ix.astype(int)
        fy, fx = iy - y0, ix - x0
        smooth = (coarse[y0, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1, x0] * fy * (1 - fx)
                  + coarse[y0, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1, x0 + 1] * fy * fx)
        shade = shade * smooth
    elif spec.texture != "gradient":
        raise ValueError(f"texture must be one of {list(TEXTURES)}, got {spec.texture!r}")
    base = np.asarray(BACKGROUNDS[spec.background], dtype=np.float32)
    return np.clip(shade[..., None] * base, 0.0, BACKGROUND_MAX).astype(np.float32)


def render(spec: ClipSpec, height: int, width: int, num_frames: int) -> np.ndarray:
    """The clip as float32 ``[num_frames, height, width, 3]`` in [0, 1]."""
    _check_canvas(height, width, num_frames)
    background = _background(spec, height, width)
    colour = np.asarray(COLOURS[spec.colour], dtype=np.float32)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = np.empty((num_frames, height, width, 3), dtype=np.float32)
    for f in range(num_frames):
        cy, cx = spec.centre(f)
        alpha = np.clip(_inside_distance(spec.shape, yy - cy, xx - cx, spec.size / 2) + 0.5, 0.0, 1.0)[..., None]
        frames[f] = background * (1 - alpha) + colour * alpha
    return frames


def sample_clip(seed: int, height: int, width: int, num_frames: int, combos=None) -> tuple[np.ndarray, ClipSpec]:
    """(frames, spec) of clip number ``seed``: the same seed always gives the same clip."""
    spec = sample_spec(np.random.default_rng(seed), height, width, num_frames, combos)
    return render(spec, height, width, num_frames), spec


def caption_words() -> list[str]:
    """Every word a caption can contain, in a fixed order (the tokenizer's vocabulary)."""
    words = ["a", "moving", "on", "background"]
    return words + list(COLOURS) + list(SHAPES) + list(DIRECTIONS) + list(BACKGROUNDS) + list(TEXTURES)


@dataclass(frozen=True)
class Prompt:
    """A caption without geometry: what a generated clip is asked to show."""

    colour: str
    shape: str
    direction: str
    background: str
    texture: str

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} moving {self.direction} on a {self.background} {self.texture} background"


def held_out_prompts(count: int = 16) -> list[Prompt]:
    """Prompts for the first ``count`` held-out combinations, backgrounds and textures cycling."""
    combos = held_out_combos()
    if not isinstance(count, int) or not 1 <= count <= len(combos):
        raise ValueError(f"count must be an int in [1, {len(combos)}], got {count!r}")
    backgrounds = list(BACKGROUNDS)
    return [Prompt(*combos[i], backgrounds[i % len(backgrounds)], TEXTURES[(i // len(backgrounds)) % len(TEXTURES)])
            for i in range(count)]
