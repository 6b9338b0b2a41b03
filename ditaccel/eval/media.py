"""The comparison's pictures: both outputs and a labelled side-by-side with the amplified difference.

The side-by-side is ``dense | accelerated | |accelerated - dense| × gain`` with a caption bar over
each panel (so a video attached to a report still says which side is which). Videos are H.264 MP4
through imageio's FFMPEG plugin; images are PNG (a batch laid out left to right).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

DIFF_GAIN = 4.0
LABEL_HEIGHT = 14
GAP = 6


def to_uint8(media: np.ndarray) -> np.ndarray:
    return (np.clip(media, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _rgb(frames: np.ndarray) -> np.ndarray:
    if frames.shape[-1] == 1:
        return np.repeat(frames, 3, axis=-1)
    return frames[..., :3]


def _even(frames: np.ndarray) -> np.ndarray:
    """Pad H and W to even sizes (H.264 in yuv420p needs them) by repeating the last row/column."""
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return frames


def _caption(text: str, width: int) -> np.ndarray:
    """A [LABEL_HEIGHT, width, 3] uint8 bar with ``text`` in white on dark grey (Pillow's built-in font)."""
    from PIL import Image, ImageDraw

    bar = Image.new("RGB", (width, LABEL_HEIGHT), (32, 32, 32))
    draw = ImageDraw.Draw(bar)
    while text and draw.textlength(text) > width - 4:
        text = text[:-1]
    draw.text((2, 1), text, fill=(255, 255, 255))
    return np.asarray(bar)


def difference(dense: np.ndarray, accelerated: np.ndarray, gain: float = DIFF_GAIN) -> np.ndarray:
    """|accelerated - dense| × gain, clipped, as uint8 (inputs uint8)."""
    diff = np.abs(accelerated.astype(np.int16) - dense.astype(np.int16)).astype(np.float32) * gain
    return np.clip(diff, 0, 255).astype(np.uint8)


def side_by_side(dense: np.ndarray, accelerated: np.ndarray, label: str, gain: float = DIFF_GAIN) -> np.ndarray:
    """[N, H, W, C] uint8 x 2 -> [N, LABEL_HEIGHT + H, 3W + 2 GAP, 3]: labelled panels."""
    d, a = _rgb(dense), _rgb(accelerated)
    panels = [(d, "dense"), (a, label), (difference(d, a, gain), f"|difference| x{gain:g}")]
    n, h, w, _ = d.shape
    sep = np.full((n, LABEL_HEIGHT + h, GAP, 3), 255, dtype=np.uint8)
    columns = []
    for i, (frames, text) in enumerate(panels):
        bar = np.broadcast_to(_caption(text, w), (n, LABEL_HEIGHT, w, 3))
        columns.append(np.concatenate([bar, frames], axis=1))
        if i < len(panels) - 1:
            columns.append(sep)
    return np.concatenate(columns, axis=2)


def write_video(path: Path, frames: np.ndarray, fps: int) -> Path:
    import imageio.v3 as iio

    iio.imwrite(path, _even(_rgb(frames)), fps=fps, plugin="FFMPEG", macro_block_size=2, quality=8)
    return path


def write_image(path: Path, images: np.ndarray) -> Path:
    import imageio.v3 as iio

    img = np.concatenate(list(images), axis=1) if images.shape[0] > 1 else images[0]
    iio.imwrite(path, img.squeeze(-1) if img.shape[-1] == 1 else img)
    return path


def key_frames(media: np.ndarray, count: int = 3) -> list[int]:
    """Indices of ``count`` frames spread over the clip (first, middle, last)."""
    n = media.shape[0]
    return sorted({round(i * (n - 1) / max(1, count - 1)) for i in range(min(count, n))})


def write_media(out: Path, dense, accel, *, label: str, fps: int = 8) -> dict:
    """Both outputs, the labelled side-by-side (video or PNG) and, for video, a PNG of its key frames."""
    out.mkdir(parents=True, exist_ok=True)
    d, a = to_uint8(dense.media), to_uint8(accel.media)
    both = side_by_side(d, a, label)
    if dense.is_video:
        files = {"dense": write_video(out / "dense.mp4", d, fps), "accelerated": write_video(out / "accelerated.mp4", a, fps),
                 "side_by_side": write_video(out / "side_by_side.mp4", both, fps)}
        frames = key_frames(both)
        files["side_by_side_png"] = write_image(out / "side_by_side.png",
                                                np.concatenate([both[i] for i in frames], axis=0)[None])
    else:
        files = {"dense": write_image(out / "dense.png", d), "accelerated": write_image(out / "accelerated.png", a),
                 "side_by_side": write_image(out / "side_by_side.png", both)}
        files["side_by_side_png"] = files["side_by_side"]
    return {k: str(v) for k, v in files.items()}


__all__ = ["difference", "key_frames", "side_by_side", "to_uint8", "write_image", "write_media", "write_video"]
