#!/usr/bin/env bash
# The GPU check, one command (about 8 minutes on one H200):
#   1. the FLUX.1-dev architecture at full depth (random weights, ComfyUI's own Flux class, bf16) at 512x512:
#      two iterations of each of dancegrpo, branchgrpo, branchgrpo-deppru and branchgrpo-mix, interleaved, through
#      the Trainer's code path (bench.scale --ratios): seconds per iteration, their ratios to dancegrpo, model
#      evaluations, peak memory measured (torch.cuda.max_memory_allocated / reserved) against the Trainer's
#      prediction;
#   2. the CPU demo's ComfyUI graph (workflows/cpu_demo.json) on CUDA: scripts/run_demo.py against a ComfyUI
#      started without --cpu.
# Results: gpu_check/ratios.json, gpu_check/demo_summary.json, gpu_check/comfyui.log.
#
# CPU form (run by the test suite, small and fast: FLUX's architecture narrowed to 256 channels, one block per
# list, 64 px, 2 steps): scripts/gpu_check.sh --device cpu --blocks 1
# Options: --device cuda|cpu, --blocks N (0 = full depth), --width N (0 = real), --resolution PX, --steps N,
# --out DIR, --no-demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
DEVICE=cuda BLOCKS=0 WIDTH=0 RES=512 STEPS=8 OUT=gpu_check DEMO=1 TOKENS=512 GROUP=0 SPLITS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --blocks) BLOCKS=$2; shift 2 ;;
    --width) WIDTH=$2; shift 2 ;;
    --resolution) RES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --no-demo) DEMO=0; shift ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
EXTRA=()
if [ "$DEVICE" = cpu ]; then
  # the CPU form: a smoke test of this script, in seconds (2 steps, 4 roots, the tree forking once, 256 channels);
  # the demo is left to scripts/demo.sh, the full-width CPU ratios to bench.scale --ratios
  RES=64 STEPS=2 TOKENS=8 DEMO=0
  if [ "$WIDTH" = 0 ]; then WIDTH=256; fi
  EXTRA=(--group-size 4 --split-steps 0 --lora-rank 4 --lora-targets "*qkv*" --max-batch 16 --max-train-batch 16
         --iterations 1)
else
  EXTRA=(--iterations 2 --max-batch 16 --max-train-batch 8)
fi
mkdir -p "$OUT"
T0=$SECONDS
echo "[gpu_check] FLUX.1-dev architecture, blocks=${BLOCKS} (0 = full depth), width=${WIDTH} (0 = real), ${RES}px, ${STEPS} steps, device ${DEVICE}"
"$PY" -m bench.scale --ratios --family flux-dev --device "$DEVICE" --blocks "$BLOCKS" --width "$WIDTH" --resolution "$RES" \
  --steps "$STEPS" --text-tokens "$TOKENS" "${EXTRA[@]}" --out "$OUT/ratios.json"
"$PY" - "$OUT/ratios.json" <<'EOF'
import json, sys
data = json.load(open(sys.argv[1]))
gib = 2 ** 30
print(f"{'preset':18s} {'s/iter':>8s} {'x dancegrpo':>11s} {'NFE':>5s} {'measured GiB':>12s} {'predicted GiB':>13s}")
for name, r in data["ratios"]["presets"].items():
    print(f"{name:18s} {r['seconds_per_iteration']:8.2f} {r['ratio']:11.2f} {r['model_evaluations']:5d} "
          f"{r['peak_bytes_measured'] / gib:12.2f} {r['peak_bytes_predicted'] / gib:13.2f}")
for run in data["runs"]:
    if run.get("peak_bytes_reserved"):
        print(f"{run['preset']}: reserved {run['peak_bytes_reserved'] / gib:.2f} GiB")
EOF
echo "[gpu_check] ratios done in $((SECONDS - T0)) s"
if [ "$DEMO" = 1 ]; then
  PORT=8199
  "$PY" .comfyui/main.py --listen 127.0.0.1 --port "$PORT" --disable-auto-launch \
    --base-directory "$PWD/.comfy-base" > "$OUT/comfyui.log" 2>&1 &
  SERVER=$!
  trap 'kill "$SERVER" 2>/dev/null || true' EXIT
  for _ in $(seq 1 120); do
    curl -sf "http://127.0.0.1:$PORT/system_stats" > /dev/null && break
    sleep 1
  done
  "$PY" scripts/run_demo.py --url "http://127.0.0.1:$PORT" --summary "$OUT/demo_summary.json" --timeout 300
  echo "[gpu_check] demo on ${DEVICE} done; total $((SECONDS - T0)) s"
fi
