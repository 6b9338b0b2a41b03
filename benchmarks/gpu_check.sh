#!/usr/bin/env bash
# All GPU checks and timings of the Triton attention kernel in one command, <= 8 minutes on one
# H100/H200 (two stages in separate processes, each with its own deadline and timeout: a CUDA fault in
# one cannot hide the other's results). Run from the repository root:
#
#   bash benchmarks/gpu_check.sh              # writes $OUT (default /tmp/gpu_check_out)
#   bash benchmarks/gpu_check.sh --dry-run    # CPU, TRITON_INTERPRET=1, tiny shapes: checks the script
#
# Results in $OUT: env.txt, correct.log/.json (correctness of the autotuned kernel incl. key_valid, LSE,
# fp32/tf32, merge_by_lse, zero host syncs on a mask's second call, registers/spills/shared of every
# compiled kernel), bench.log/.json (synthetic densities 100/50/25/10/5 % at the four shapes vs SDPA and
# compiled flex, partial-block / key_valid / LSE cost, the methods' real plans: kernel alone, whole path,
# first-call seconds, host ms per call), summary.txt (printed last).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
HERE=$(cd "$(dirname "$0")" && pwd)
PY=${PYTHON:-python3}
DRY=""
CORRECT_S=170; BENCH_S=250
if [ "${1:-}" = "--dry-run" ]; then DRY="--dry-run"; CORRECT_S=500; BENCH_S=500; fi

{ $PY -c "import torch, triton, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,memory.total --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

timeout $((CORRECT_S + 25)) $PY "$HERE/gpu_check.py" correct --out "$OUT" --deadline $CORRECT_S $DRY > "$OUT/correct.log" 2>&1
echo "correct: exit $?" | tee -a "$OUT/correct.log"
timeout $((BENCH_S + 25)) $PY "$HERE/gpu_check.py" bench --out "$OUT" --deadline $BENCH_S $DRY > "$OUT/bench.log" 2>&1
echo "bench: exit $?" | tee -a "$OUT/bench.log"
$PY "$HERE/gpu_check.py" summary --out "$OUT" 2>&1 | tee "$OUT/summary.txt"

# Distributed bench (issue 14): 2 ranks over nccl, data parallel and --cp ulysses=2, quality against a
# 1-process run of the same matrix. Needs >= 2 GPUs (one GPU cannot host two nccl ranks): skipped otherwise.
NGPU=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
if [ -z "$DRY" ] && [ "$NGPU" -ge 2 ]; then
  DB=(--method dense --method tile --size 144x192x17 --steps 4 --seeds 0 --device cuda --no-progress)
  { timeout 200 $PY -m ditaccel bench "${DB[@]}" --out "$OUT/dbench_1p" \
    && timeout 200 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m ditaccel bench "${DB[@]}" --out "$OUT/dbench_dp" \
    && timeout 200 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m ditaccel bench "${DB[@]}" --cp ulysses=2 --out "$OUT/dbench_cp" \
    && $PY "$HERE/dbench_same.py" "$OUT/dbench_1p" "$OUT/dbench_dp" "$OUT/dbench_cp"; } > "$OUT/dbench.log" 2>&1
  echo "dbench: exit $?" | tee -a "$OUT/dbench.log"
else
  echo "dbench: skipped (needs >= 2 CUDA devices, found $NGPU)" | tee "$OUT/dbench.log"
fi

# Calibrator candidates (residual reuse, spatial/temporal heads): only with CALIBRATE=1 (~5 more minutes).
# On CUDA the Triton kernel can make sparse candidates cheaper than dense, which no CPU run has shown:
# the log's "not a candidate here" lines and candidate_ms say which survive, the preset's rules whether
# residual/head-pattern cells were chosen. Unmeasured so far.
if [ -z "$DRY" ] && [ "${CALIBRATE:-0}" = "1" ]; then
  timeout 420 $PY -m ditaccel calibrate --device cuda --budget-minutes 6 --state "$OUT/calibrate_state.pt" \
    --out "$OUT/calibrate_gpu.json" --no-progress > "$OUT/calibrate.log" 2>&1
  echo "calibrate: exit $?" | tee -a "$OUT/calibrate.log"
fi
