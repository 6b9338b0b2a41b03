"""Train the reference pipeline from scratch: ``python -m ditaccel.pipelines.reference.train``.

Five resumable stages, each checkpointed under ``--workdir`` (default
``~/.cache/ditaccel/reference-train/``); re-running the command continues where it stopped:

1. ``vae``: the ``AutoencoderKLWan`` on small clips of the full frame count (it is convolutional, so a
   small canvas teaches it the same edges and colours; fewer frames than generated leave its causal
   cache across later 4-frame chunks untrained), reconstruction MSE + L1 weighted up on the shape's
   pixels, posterior mean + fixed small noise, a tiny L2 on the latents;
2. ``latents``: encode a fixed set of clips once (posterior means) and cache them with their specs:
   clips at the full training size and clips on a small canvas; set the VAE's
   ``latents_mean`` / ``latents_std`` from them so the transformer sees unit-scale latents;
3. ``decoder``: fine-tune the decoder alone (encoder frozen, so the cached latents stay valid) with a
   cosine-decaying learning rate: the constant-lr joint stage ends noisy, and colours are decided by
   the decoder;
4. ``transformer``: flow matching on the cached latents (x_t = (1 - s) x0 + s e, target e - x0,
   timestep = 1000 s, s drawn with the scheduler's shift), captions through the frozen text encoder,
   10% empty captions for classifier-free guidance, an EMA of the weights. The first steps use
   small latent crops (cheap; Wan's 3-D RoPE only sees relative positions and shapes have pixel
   sizes, so a crop is a smaller window on the same world) that contain the shape's whole path; the
   last ``--full-fraction`` of the ``--dit-steps`` use whole full-size latents; a cool-down of
   ``--cooldown-steps`` follows (every 4th step full-size, the rest crops, the learning rate
   cosine-decayed to a tenth): the full-size batches are small, and at the constant rate they left
   the weights noisy enough to break the first latent frames' consistency with the rest;
5. ``export``: ``save_pretrained(safe_serialization=True)`` of the whole ``WanPipeline`` (EMA weights),
   once every stage has finished.

The decoder and transformer stages only share the frozen encoder, so two processes can run them side
by side on two cores: ``--stages vae,decoder`` in one, ``--stages vae,latents,transformer`` in the
other, then ``--stages export`` (the default, all stages, does the same one after the other).
Every random draw is a function of (seed, stage, step), so a resumed run is the run it continues
(with the same settings; ``--stop-at N`` ends a piece at transformer step N). ``--device cuda`` trains
on a GPU; on CPU ``--threads`` (default 1) sets torch's intra-op threads. After the export, copy the
``pipeline`` folder to ``ditaccel/pipelines/reference/weights/`` once
``python -m ditaccel.pipelines.reference.analysis --path <workdir>/pipeline`` meets the checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import data, model

log = logging.getLogger("ditaccel.reference.train")
DEFAULT_WORKDIR = Path("~/.cache/ditaccel/reference-train").expanduser()
VAE_STAGE, LATENT_STAGE, DIT_STAGE, DECODER_STAGE = 1, 2, 3, 4
STAGES = ("vae", "latents", "decoder", "transformer", "export")


@dataclass
class TrainConfig:
    """Every knob of a training run (the defaults are the shipped run)."""

    workdir: str = str(DEFAULT_WORKDIR)
    export_dir: str | None = None  # default: <workdir>/pipeline
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads on CPU (0: torch's default)
    frames: int = 17  # the full training / generation size
    height: int = 144
    width: int = 192
    stages: tuple = STAGES  # which stages this process runs (decoder and transformer can run side by side)
    vae_steps: int = 2250
    vae_batch: int = 1
    vae_clip: tuple = (17, 48, 64)  # frames, height, width: as many frames as generated (causal cache)
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    latent_noise: float = 0.1  # std of the noise added to the posterior mean while training the VAE
    foreground_weight: float = 9.0  # extra reconstruction weight on the shape's pixels
    decoder_steps: int = 1400  # decoder-only fine-tuning with the encoder (so the latents) frozen
    decoder_clip: tuple = (17, 48, 64)
    decoder_lr: float = 3e-4  # cosine-decayed to a tenth
    full_clips: int = 60
    small_clips: int = 200
    small_canvas: tuple = (64, 96)  # height, width of the small clips (latent 8 x 12)
    crop: tuple = (8, 12)  # latent height, width of the cheap steps
    dit_steps: int = 6000
    cooldown_steps: int = 1000  # then: lr cosine-decayed to a tenth, every 4th step full-size, the rest crops
    full_fraction: float = 0.1
    crop_batch: int = 8
    full_batch: int = 2
    dit_lr: float = 6e-4
    warmup: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1
    checkpoint_every: int = 50
    stop_at: int | None = None  # end this process once the transformer reaches this step (run in pieces)
    transformer_config: dict | None = None  # default: model.TRANSFORMER_CONFIG
    vae_config: dict | None = None  # default: model.VAE_CONFIG
    progress: bool = True

    def __post_init__(self):
        positive = ("frames", "height", "width", "vae_batch", "full_clips", "crop_batch", "full_batch",
                    "checkpoint_every")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.stop_at is not None and (not isinstance(self.stop_at, int) or self.stop_at < 0):
            raise ValueError(f"stop_at must be None or an int >= 0, got {self.stop_at!r}")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown or not self.stages:
            raise ValueError(f"stages must be a non-empty subset of {list(STAGES)}, got {list(self.stages)!r}")
        for name in ("vae_steps", "decoder_steps", "small_clips", "dit_steps", "cooldown_steps", "warmup", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if (self.frames - 1) % 4 or self.height % 8 or self.width % 8:
            raise ValueError(f"frames must be 4k+1 and height, width multiples of 8, got "
                             f"frames={self.frames}, height={self.height}, width={self.width}")
        if not 0.0 <= self.full_fraction <= 1.0:
            raise ValueError(f"full_fraction must be in [0, 1], got {self.full_fraction!r}")
        if not 0.0 <= self.caption_dropout < 1.0:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout!r}")
        lat_h, lat_w = self.height // 8, self.width // 8
        if not (1 <= self.crop[0] <= lat_h and 1 <= self.crop[1] <= lat_w):
            raise ValueError(f"crop must fit the latent grid {lat_h} x {lat_w}, got {self.crop!r}")

    @property
    def transformer_steps(self) -> int:
        """Every transformer step: the main run and its cool-down."""
        return self.dit_steps + self.cooldown_steps

    @property
    def paths(self) -> dict:
        root = Path(self.workdir).expanduser()
        return {"vae": root / "vae.pt", "decoder": root / "decoder.pt", "latents": root / "latents.pt",
                "transformer": root / "transformer.pt",
                "export": Path(self.export_dir).expanduser() if self.export_dir else root / "pipeline"}


def _rng(cfg: TrainConfig, stage: int, step: int) -> np.random.Generator:
    return np.random.default_rng([cfg.seed, stage, step])


def _torch_gen(cfg: TrainConfig, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(_rng(cfg, stage, step).integers(2**62)))


def _to_model_input(frames: np.ndarray) -> torch.Tensor:
    """[F, H, W, 3] in [0, 1] -> [3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(frames).permute(3, 0, 1, 2) * 2 - 1


def _save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a half-written checkpoint


def _bar(cfg, total, initial, desc):
    return tqdm(total=total, initial=initial, desc=desc, disable=not cfg.progress, mininterval=5, dynamic_ncols=True)


def _cosine_to_a_tenth(done: int, total: int) -> float:
    """Learning-rate factor falling from 1 to 0.1 along half a cosine over ``total`` steps."""
    return 0.1 + 0.45 * (1 + math.cos(math.pi * done / total))


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """[B, 1, F, H, W] 1.0 where a [-1, 1] clip is saturated and bright (the shape), as analysis reads it."""
    rgb = (x + 1) / 2
    top, bottom = rgb.max(1, keepdim=True).values, rgb.min(1, keepdim=True).values
    return ((top - bottom >= 0.3) & (top >= 0.5)).float()


def resume(path, **parts) -> int:
    """Load each named part's state from the checkpoint at ``path``; the step it reached (0: none)."""
    if not path.is_file():
        return 0
    state = torch.load(path, map_location="cpu", weights_only=False)
    for name, part in parts.items():
        part.load_state_dict(state[name])
    return state["step"]


# --- stage 1: VAE ---------------------------------------------------------------------------------

def _reconstruction_loss(cfg: TrainConfig, vae, x: torch.Tensor, step: int, stage: int, encoder_grad: bool):
    # A fixed small noise on the posterior mean instead of sampling with the learned variance: at
    # initialisation that variance is ~1 and drowns the signal, so the decoder first learns to
    # ignore its input (hundreds of CPU steps lost). The noise keeps the decoder tolerant of the
    # transformer's small errors; the tiny penalty on the mean keeps latents bounded.
    with torch.set_grad_enabled(encoder_grad):
        mean = vae.encode(x).latent_dist.mean
    z = mean + cfg.latent_noise * torch.randn(mean.shape, generator=_torch_gen(cfg, stage, step)).to(x.device)
    recon = vae.decode(z).sample
    # The shape covers a few % of the pixels but is all the captions talk about: weigh it up.
    weight = 1.0 + cfg.foreground_weight * _foreground(x)
    error = recon - x
    loss = (weight * (error.square() + 0.5 * error.abs())).mean() / weight.mean()
    return loss + cfg.kl_weight * 0.5 * mean.square().mean() if encoder_grad else loss


def _train_autoencoder(cfg: TrainConfig, vae, stage: int, decoder_only: bool) -> None:
    """Stage 1 (encoder and decoder, constant lr after a warm-up) or the decoder fine-tuning (cosine lr)."""
    path, total = (cfg.paths["decoder"], cfg.decoder_steps) if decoder_only else (cfg.paths["vae"], cfg.vae_steps)
    params = ([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()] if decoder_only
              else list(vae.parameters()))
    opt = torch.optim.AdamW(params, lr=cfg.decoder_lr if decoder_only else cfg.vae_lr, weight_decay=0.0)
    step = resume(path, model=vae, optimizer=opt)
    if step >= total:
        return
    vae.train().requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    frames, height, width = cfg.decoder_clip if decoder_only else cfg.vae_clip
    name = "decoder" if decoder_only else "vae"
    bar, ema_loss = _bar(cfg, total, step, name), None
    while step < total:
        rng = _rng(cfg, stage, step)
        clips = [data.render(data.sample_spec(rng, height, width, frames, data.all_combos()), height, width, frames)
                 for _ in range(cfg.vae_batch)]
        x = torch.stack([_to_model_input(c) for c in clips]).to(cfg.device)
        for group in opt.param_groups:
            if decoder_only:
                group["lr"] = cfg.decoder_lr * _cosine_to_a_tenth(step, total)
            else:
                group["lr"] = cfg.vae_lr * min(1.0, (step + 1) / 20)
        loss = _reconstruction_loss(cfg, vae, x, step, stage, encoder_grad=not decoder_only)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}")
        if step % cfg.checkpoint_every == 0 or step == total:
            _save(path, {"model": vae.state_dict(), "optimizer": opt.state_dict(), "step": step})
            log.info("%s step %d loss %.5f", name, step, ema_loss)
    bar.close()
    vae.eval().requires_grad_(False)


def train_vae(cfg: TrainConfig, pipe) -> None:
    """Stage 1: encoder and decoder together on small clips of the full frame count."""
    _train_autoencoder(cfg, pipe.vae, VAE_STAGE, decoder_only=False)


def train_decoder(cfg: TrainConfig, pipe) -> None:
    """Stage 3: the decoder alone on larger clips, lr decaying. The encoder stays frozen, so the cached
    latents stay valid and this stage can run beside the transformer's (``--stages``)."""
    _train_autoencoder(cfg, pipe.vae, DECODER_STAGE, decoder_only=True)


# --- stage 2: latent cache ------------------------------------------------------------------------

def _clip_sizes(cfg: TrainConfig) -> list[tuple[int, int]]:
    return [(cfg.height, cfg.width)] * cfg.full_clips + [tuple(cfg.small_canvas)] * cfg.small_clips


def cache_latents(cfg: TrainConfig, pipe) -> dict:
    """Encode (or resume encoding) the fixed clip set; returns {"latents", "specs", "sizes", "mean", "std"}."""
    path = cfg.paths["latents"]
    cache = torch.load(path, map_location="cpu", weights_only=False) if path.is_file() else {"latents": [], "specs": []}
    sizes = _clip_sizes(cfg)
    if len(cache["latents"]) < len(sizes):
        bar = _bar(cfg, len(sizes), len(cache["latents"]), "latents")
        with torch.no_grad():
            for i in range(len(cache["latents"]), len(sizes)):
                height, width = sizes[i]
                spec = data.sample_spec(_rng(cfg, LATENT_STAGE, i), height, width, cfg.frames)
                x = _to_model_input(data.render(spec, height, width, cfg.frames))[None].to(cfg.device)
                cache["latents"].append(pipe.vae.encode(x).latent_dist.mean[0].to("cpu", torch.float32))
                cache["specs"].append(dataclasses.asdict(spec))
                bar.update(1)
                if (i + 1) % 25 == 0:
                    _save(path, cache)
        bar.close()
        flat = torch.cat([z.flatten(1) for z in cache["latents"]], dim=1)  # [C, N]
        cache["mean"], cache["std"] = flat.mean(1), flat.std(1).clamp_min(1e-4)
        _save(path, cache)
        log.info("cached %d latents; channel std %s", len(cache["latents"]), cache["std"].numpy().round(3))
    pipe.vae.register_to_config(latents_mean=cache["mean"].tolist(), latents_std=cache["std"].tolist())
    return cache


def _crop_window(spec: dict, latent_hw, crop, rng, frames: int) -> tuple[int, int]:
    """Top-left of a latent crop that holds the shape's whole path when it fits, else its middle."""
    starts = []
    for axis, (n, c) in enumerate(zip(latent_hw, crop)):
        s = data.ClipSpec(**spec)
        ends = [s.centre(0)[axis], s.centre(frames - 1)[axis]]  # straight path: its ends bound it
        lo, hi = (min(ends) - s.size / 2) / 8, (max(ends) + s.size / 2) / 8
        first, last = max(0, math.ceil(hi) - c), min(int(lo), n - c)
        if first > last:  # the path is longer than the crop: centre on it
            first = last = min(max(int(round((lo + hi) / 2 - c / 2)), 0), n - c)
        starts.append(int(rng.integers(first, last + 1)))
    return starts[0], starts[1]


def _dit_batch(cfg: TrainConfig, cache: dict, step: int, full: bool):
    rng = _rng(cfg, DIT_STAGE, step)
    pool = [i for i, z in enumerate(cache["latents"]) if z.shape[-2:] == (cfg.height // 8, cfg.width // 8)] \
        if full else list(range(len(cache["latents"])))
    batch = cfg.full_batch if full else cfg.crop_batch
    picks = rng.choice(pool, size=batch, replace=len(pool) < batch)
    latents, captions = [], []
    for i in picks:
        z = cache["latents"][i]
        if not full:
            top, left = _crop_window(cache["specs"][i], z.shape[-2:], cfg.crop, rng, cfg.frames)
            z = z[..., top:top + cfg.crop[0], left:left + cfg.crop[1]]
        latents.append(z)
        captions.append("" if rng.random() < cfg.caption_dropout else data.ClipSpec(**cache["specs"][i]).caption)
    x0 = (torch.stack(latents) - cache["mean"].view(1, -1, 1, 1, 1)) / cache["std"].view(1, -1, 1, 1, 1)
    return x0, captions


def flow_matching_loss(transformer, x0, prompt_embeds, gen: torch.Generator, shift: float) -> torch.Tensor:
    """MSE of the predicted velocity (noise - x0) at a shifted-uniform noise level per sample."""
    u = torch.rand(x0.shape[0], generator=gen)
    sigma = shift * u / (1 + (shift - 1) * u)
    noise = torch.randn(x0.shape, generator=gen)
    s = sigma.view(-1, 1, 1, 1, 1)
    xt = ((1 - s) * x0 + s * noise).to(prompt_embeds.device)
    pred = transformer(xt, (sigma * 1000).to(xt.device), prompt_embeds, return_dict=False)[0]
    return F.mse_loss(pred.float(), (noise - x0).to(pred.device))


def train_transformer(cfg: TrainConfig, pipe, cache: dict) -> torch.nn.Module:
    """Returns the EMA copy of the transformer, or None when ``stop_at`` ended the run early."""
    transformer, path = pipe.transformer, cfg.paths["transformer"]
    ema = model.build(cfg.seed, cfg.transformer_config, cfg.vae_config).transformer.to(cfg.device)
    ema.load_state_dict(transformer.state_dict())
    opt = torch.optim.AdamW(transformer.parameters(), lr=cfg.dit_lr, weight_decay=0.0)
    step = resume(path, model=transformer, ema=ema, optimizer=opt)
    ema.requires_grad_(False).eval()
    total = cfg.transformer_steps
    if step >= total:
        return ema
    transformer.train().requires_grad_(True)
    shift = pipe.scheduler.config.shift
    full_from = int(round(cfg.dit_steps * (1 - cfg.full_fraction)))
    bar, ema_loss = _bar(cfg, total, step, "transformer"), None
    end = total if cfg.stop_at is None else min(cfg.stop_at, total)
    while step < end:
        cooling = step - cfg.dit_steps  # >= 0 in the cool-down
        full = full_from <= step < cfg.dit_steps or (cooling >= 0 and cooling % 4 == 3)
        x0, captions = _dit_batch(cfg, cache, step, full)
        with torch.no_grad():
            embeds, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False,
                                           max_sequence_length=model.MAX_SEQUENCE_LENGTH, device=cfg.device)
        for group in opt.param_groups:
            group["lr"] = cfg.dit_lr * min(1.0, (step + 1) / max(cfg.warmup, 1))
            if cooling >= 0:  # batch-2 full-size steps at a constant lr leave the weights noisy: decay it
                group["lr"] = cfg.dit_lr * _cosine_to_a_tenth(cooling, cfg.cooldown_steps)
        loss = flow_matching_loss(transformer, x0, embeds, _torch_gen(cfg, DIT_STAGE, step), shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        opt.step()
        step += 1
        decay = min(cfg.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for e, p in zip(ema.parameters(), transformer.parameters()):
                e.lerp_(p, 1 - decay)
        ema_loss = loss.item() if ema_loss is None else 0.98 * ema_loss + 0.02 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{ema_loss:.4f}", size="full" if full else "crop")
        if step % cfg.checkpoint_every == 0 or step == end:
            _save(path, {"model": transformer.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "step": step})
            log.info("transformer step %d loss %.5f (%s)", step, ema_loss, "full" if full else "crop")
    bar.close()
    transformer.eval().requires_grad_(False)
    return ema if step >= total else None


# --- the whole run --------------------------------------------------------------------------------

def assemble(cfg: TrainConfig, transformer_weights: str = "ema"):
    """The pipeline from the checkpoints in ``cfg.workdir`` (stages that have not run keep random weights)."""
    pipe = model.build(cfg.seed, cfg.transformer_config, cfg.vae_config)
    paths = cfg.paths
    for name in ("vae", "decoder"):  # the decoder checkpoint holds the whole VAE, its encoder unchanged
        if paths[name].is_file():
            pipe.vae.load_state_dict(torch.load(paths[name], map_location="cpu", weights_only=False)["model"])
    if paths["latents"].is_file():
        cache = torch.load(paths["latents"], map_location="cpu", weights_only=False)
        if "mean" in cache:
            pipe.vae.register_to_config(latents_mean=cache["mean"].tolist(), latents_std=cache["std"].tolist())
    if paths["transformer"].is_file():
        state = torch.load(paths["transformer"], map_location="cpu", weights_only=False)
        pipe.transformer.load_state_dict(state[transformer_weights])
    return pipe


def train(cfg: TrainConfig) -> Path | None:
    """Run (or resume) the stages in ``cfg.stages`` and export the pipeline; returns the export
    directory, or None when no export happened (``stop_at`` ended the transformer early, or another
    process still has a stage to finish: run again to continue)."""
    if cfg.threads and torch.device(cfg.device).type == "cpu":
        torch.set_num_threads(cfg.threads)
    started, run, paths = time.perf_counter(), set(cfg.stages), cfg.paths
    pipe = model.build(cfg.seed, cfg.transformer_config, cfg.vae_config).to(cfg.device)
    if "vae" in run:
        train_vae(cfg, pipe)
    else:
        done = resume(paths["vae"], model=pipe.vae)
        if done < cfg.vae_steps:
            raise ValueError(f"stages {list(cfg.stages)} need the vae stage finished ({done} of {cfg.vae_steps} "
                             f"steps in {paths['vae']}); add 'vae' to --stages")
    if run & {"latents", "transformer"}:
        cache = cache_latents(cfg, pipe)
    if "decoder" in run:
        train_decoder(cfg, pipe)
    if "transformer" in run and train_transformer(cfg, pipe, cache) is None:
        log.info("stopped at transformer step %d of %d; run again to resume", cfg.stop_at, cfg.transformer_steps)
        return None
    if "export" not in run:
        return None
    totals = {"decoder": cfg.decoder_steps, "transformer": cfg.transformer_steps}
    done = {name: resume(paths[name]) for name in totals}  # no parts given: only the step it reached
    missing = [f"{name} ({done[name]} of {total} steps)" for name, total in totals.items() if done[name] < total]
    if missing or not paths["latents"].is_file():
        log.info("not exported yet, unfinished: %s", ", ".join(missing) or "latents")
        return None
    out = paths["export"]
    assemble(cfg).save_pretrained(out, safe_serialization=True)
    log.info("exported to %s after %.1f min in this process", out, (time.perf_counter() - started) / 60)
    return out


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m ditaccel.pipelines.reference.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        if f.name in ("transformer_config", "vae_config", "progress"):
            continue
        if f.name == "stages":
            parser.add_argument("--stages", type=lambda v: tuple(x for x in v.split(",") if x), default=STAGES,
                                help=f"comma-separated subset of {','.join(STAGES)} (default: all, in order)")
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(f.default, tuple):
            parser.add_argument(flag, type=int, nargs=len(f.default), default=f.default)
        elif f.name == "export_dir":
            parser.add_argument(flag, default=None)
        elif f.name == "stop_at":
            parser.add_argument(flag, type=int, default=None)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    parser.add_argument("--no-progress", action="store_true")
    args = vars(parser.parse_args(argv))
    progress = not args.pop("no_progress")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    return TrainConfig(**args, progress=progress)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    out = train(parse_args(argv))
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
