"""Compare the quality figures of ``ditaccel bench`` runs against the first one (a 1-process run):
``python benchmarks/dbench_same.py ONE_DIR OTHER_DIR...``. Prints one line per cell and run, the largest
difference of PSNR / SSIM / latent rel-L2 / density; exit 1 if a cell is missing, failed, or differs
by more than 1e-6 (relative) in those figures."""

import json
import sys
from pathlib import Path

FIGURES = ("psnr", "ssim", "latent_rel_l2", "density")


def main(dirs: list[str]) -> int:
    runs = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    ref = {c["key"]: c for c in runs[0]["cells"]}
    bad = 0
    for d, run in zip(dirs[1:], runs[1:]):
        cells = {c["key"]: c for c in run["cells"]}
        mode = (run.get("distributed") or {}).get("mode", "1-process")
        if sorted(cells) != sorted(ref) or len(cells) != len(run["cells"]):
            print(f"{d} ({mode}): cells {sorted(cells)} != {sorted(ref)}")
            bad += 1
            continue
        for key, r in ref.items():
            c = cells[key]
            if c["status"] != "ok" or r["status"] != "ok":
                print(f"{d} ({mode}) {key}: status {c['status']} vs {r['status']}: {c.get('error')}")
                bad += 1
                continue
            worst = 0.0
            for name in FIGURES:
                a, b = c["metrics"][name], r["metrics"][name]
                if a is None or b is None:
                    worst = max(worst, 0.0 if a is b else float("inf"))
                else:
                    worst = max(worst, abs(a - b) / max(1.0, abs(b)))
            bad += worst > 1e-6
            print(f"{d} ({mode}) {key}: max rel. difference {worst:.2e}; speedup {c['metrics']['speedup']}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
