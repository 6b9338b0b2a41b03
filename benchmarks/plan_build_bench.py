"""Plan build time of the static methods: block-level geometry vs the brute-force token classifier.

For tile, window and radial at about 36k and 118k tokens (and Wan2.1-14B 720p in between) this
prints and writes (JSON) the seconds ``method.plan(shape)`` takes on the CPU -- the block-level
builder on both candidate layouts plus the choice between them -- and the full / partial / empty
block-pair counts:

- ``before``: the packed layout with key-only conditions folded into the block lists (the
  ``block_mask`` every plan had before: a key block holding empty slots is partial);
- ``packed`` / ``padded``: the pattern-only classification (``pattern_block_mask``: partial only
  where the pattern cuts a block) on the packed and the tile-padded layout;
- ``chosen``: which layout the method kept, by kernel work (computed block pairs x block size^2).

With ``--brute-force`` the token-pair classifier (``ditaccel.plan.build_plan``, O(tokens^2)) also
runs on the shapes of at most ``--brute-force-max`` tokens, and its block lists are checked equal
to the block-level ones.

    python benchmarks/plan_build_bench.py --brute-force --out plan_build.json
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from dataclasses import dataclass

import torch

from ditaccel.layout import build_layout
from ditaccel.methods import RadialConfig, TileConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape
from ditaccel.plan import build_block_plan, build_plan


@dataclass(frozen=True)
class Shape:
    name: str
    grid: tuple[int, int, int]
    text: int
    where: str

    @property
    def tokens(self) -> int:
        return math.prod(self.grid) + self.text


SHAPES = [
    Shape("36k (9x64x64)", (9, 64, 64), 0, "none"),  # 36,864 tokens
    Shape("wan14b-720p (21x45x80)", (21, 45, 80), 0, "none"),  # 75,600
    Shape("hunyuan-720p (33x45x80 + 256 text)", (33, 45, 80), 256, "suffix"),  # 119,056
]

CONFIGS = {
    "tile": TileConfig(window=(3, 3, 3)),  # tile (2, 8, 8) at block 128
    "window": WindowConfig(kernel_size=(3, 9, 9)),
    "radial": RadialConfig(),
}


def counts(any_blocks: torch.Tensor, full_blocks: torch.Tensor) -> dict:
    a, f = any_blocks.bool(), full_blocks.bool()
    return {"full": int(f.sum()), "partial": int((a & ~f).sum()), "empty": int((~a).sum()),
            "blocks": int(a.shape[-1])}


def bench_one(shape: Shape, name: str, brute_force: bool) -> dict:
    cfg = CONFIGS[name]
    method = make_method(cfg)
    call = CallShape(shape.grid, shape.text, shape.where)
    t0 = time.perf_counter()
    plan = method.plan(call, "cpu")
    seconds = time.perf_counter() - t0
    tile = method.tile_for(shape.grid)
    row = {"shape": shape.name, "tokens": shape.tokens, "method": name, "block_level_s": round(seconds, 3),
           "chosen": plan.layout_choice, "note": plan.layout_note, "slots": plan.layout.num_slots}
    packed_layout = build_layout(shape.grid, shape.text, shape.where, method.order(), tile, cfg.block_size)
    rule, predicate = method.box_rule(shape.grid), method.video_predicate(shape.grid)
    packed = plan if plan.layout is packed_layout else build_block_plan(packed_layout, rule, predicate, "cpu")
    row["before"] = counts(packed.any_blocks, packed.full_blocks)
    row["packed"] = counts(packed.any_blocks, packed.pattern_full_blocks)
    if method.order() == "tile":
        padded_layout = build_layout(shape.grid, shape.text, shape.where, "tile", tile, cfg.block_size, True)
        padded = plan if plan.layout is padded_layout else build_block_plan(padded_layout, rule, predicate, "cpu")
        row["padded"] = counts(padded.any_blocks, padded.pattern_full_blocks)
        row["padded_slots"] = padded_layout.num_slots
    row["chosen_counts"] = counts(plan.any_blocks, plan.pattern_full_blocks)
    if brute_force:
        t0 = time.perf_counter()
        oracle = build_plan(packed_layout, predicate, "cpu")
        row["brute_force_s"] = round(time.perf_counter() - t0, 3)
        row["brute_force_equal"] = bool(
            torch.equal(oracle.any_blocks, packed.any_blocks) and torch.equal(oracle.full_blocks, packed.full_blocks)
            and torch.equal(oracle.pattern_full_blocks, packed.pattern_full_blocks))
    return row


def fmt(c: dict | None) -> str:
    return "-" if c is None else f"{c['full']:>7,} / {c['partial']:>7,} / {c['empty']:>9,}"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--brute-force", action="store_true", help="also time the token-pair classifier")
    ap.add_argument("--brute-force-max", type=int, default=40_000,
                    help="largest token count the brute force runs on (default 40,000)")
    ap.add_argument("--methods", default="tile,window,radial")
    ap.add_argument("--shapes", default="all", help="comma-separated indices into SHAPES, or 'all'")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--out", default="plan_build.json")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SHAPES if args.shapes == "all" else [SHAPES[int(i)] for i in args.shapes.split(",")]
    rows = []
    print(f"{'shape':36} {'method':7} {'block s':>8} {'brute s':>8} {'layout':7} "
          f"{'before full/partial/empty':>29} {'after (chosen) full/partial/empty':>33}")
    for shape in shapes:
        for name in args.methods.split(","):
            brute = args.brute_force and shape.tokens <= args.brute_force_max
            row = bench_one(shape, name, brute)
            rows.append(row)
            bf = f"{row['brute_force_s']:8.1f}" if "brute_force_s" in row else f"{'-':>8}"
            eq = "" if "brute_force_equal" not in row else ("  (= brute force)" if row["brute_force_equal"]
                                                          else "  (DIFFERS from brute force)")
            print(f"{shape.name:36} {name:7} {row['block_level_s']:8.2f} {bf} {row['chosen']:7} "
                  f"{fmt(row['before']):>29} {fmt(row['chosen_counts']):>33}{eq}", flush=True)
            if "padded" in row:
                print(f"{'':36} {'':7} {'':8} {'':8} {'':7} {'packed: ' + fmt(row['packed']):>29} "
                      f"{'padded: ' + fmt(row['padded']):>33}  {row['note']}", flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.processor() or
            platform.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "configs": {k: repr(v) for k, v in CONFIGS.items()}}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
