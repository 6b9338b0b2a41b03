"""GPU check of the per-call plan inputs: after the first call of a shape, permuting q/k/v into slots
and back (``TokenLayout.to_slots`` / ``from_slots``) and combining a call's key padding with the
plan's slot validity (``SparsePlan.call_key_valid``) make no host-device synchronisation.

Needs CUDA (``torch.cuda.set_sync_debug_mode("error")`` raises on a synchronising op); on a machine
without one it says so and exits 0. Meant to be called from ``benchmarks/gpu_check.sh``:

    python benchmarks/plan_device_check.py --out "$OUT/plan_device_check.json"
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ditaccel.methods import TileConfig, WindowConfig, make_method
from ditaccel.methods.base import CallShape

SHAPES = [("wan14b-720p", CallShape((21, 45, 80), 0, "none")),
          ("hunyuan-720p", CallShape((33, 45, 80), 256, "suffix"))]


def check(name: str, shape: CallShape, method_cfg, device) -> dict:
    plan = make_method(method_cfg).plan(shape, device)
    layout = plan.layout
    q = torch.randn(1, layout.seq_len, 24, 128, device=device, dtype=torch.bfloat16)
    padding = torch.ones(1, layout.seq_len, dtype=torch.bool, device=device)
    padding[:, -7:] = False  # a padded text tail (or video tail on text-free shapes)

    def one_call():
        slots = layout.to_slots(q, dim=1)
        key_valid = plan.call_key_valid(padding)
        return layout.from_slots(slots, dim=1), key_valid

    one_call()  # first call of the shape: the index copies happen here
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        error = None
        t0 = time.perf_counter()
        for _ in range(10):
            out, _ = one_call()
        host_ms = (time.perf_counter() - t0) * 100
    except RuntimeError as e:  # a synchronising op in the steady state
        error = str(e).splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    ok = error is None and torch.equal(out, q)
    return {"shape": name, "method": method_cfg.method, "layout": plan.layout_choice, "syncs_ok": error is None,
            "round_trip_ok": bool(ok), "error": error, "host_ms_per_call": None if error else round(host_ms, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="plan_device_check.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("plan_device_check: no CUDA device, nothing checked")
        return 0
    rows = [check(n, s, cfg, torch.device("cuda")) for n, s in SHAPES
            for cfg in (TileConfig(), WindowConfig(kernel_size=(3, 9, 9)))]
    for r in rows:
        print(r)
    with open(args.out, "w") as f:
        json.dump({"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
    return 0 if all(r["syncs_ok"] and r["round_trip_ok"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
