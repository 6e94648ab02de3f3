#!/usr/bin/env bash
# The GPU check, one command for a lent GPU machine (at most 8 minutes on one H200):
#   bash scripts/gpu_check.sh --kit --out "$OUT"          (the device: its own python3, the kit of gpu_kit.sh)
# Steps, each with its own time limit and result file in --out (a failed step does not stop the next):
#   environment.json  Python, torch, CUDA device, memory free/total, every module ComfyUI needs, comfy-kitchen's backends
#   demo_summary.json the CPU demo's graph (workflows/cpu_demo.json) through a real ComfyUI 0.33.0 started WITHOUT
#                     --cpu (so DynamicVRAM is on on NVIDIA), by scripts/run_demo.py
#   adapters.json     whether the trained LoRA's tensors moved (the weight wrappers acted under the server's patcher),
#                     and which patcher class the Trainer trained through (from its log line)
#   continued_summary.json  the same graph continuing the demo's LoRA (continue_lora) for more iterations
#   budget.json       the graph with memory_budget_gb forced small: refused before compute, with the message
#   fp8.json          FLUX.1-dev's architecture at full depth (random weights, ComfyUI's Flux class) with fp8 weights,
#                     one iteration of branchgrpo at 512x512 (bench.scale): memory per phase measured against predicted
#   ratios.json       the same model in bf16: dancegrpo, branchgrpo, branchgrpo-deppru, branchgrpo-mix, interleaved,
#                     seconds per iteration and their ratios, memory per phase (allocated, reserved, free) against
#                     the Trainer's prediction (bench.scale --ratios)
#   steps.json        each step's exit code and seconds; comfyui.log, the server's log
#
# --kit: run from .gpu-kit/ (scripts/gpu_kit.sh): its wheels are installed with pip --no-index --target into a
# scratch folder and put first on PYTHONPATH, its ComfyUI tree is unpacked beside them, and the machine's python3 (or
# $PYTHON) runs everything. Without --kit: the sandbox of scripts/setup_dev.sh (.venv, .comfyui-0.33 or .comfyui).
#
# CPU form (in the test suite, small and fast): PYTHON=.venv-kit312/bin/python scripts/gpu_check.sh --kit --device cpu
# (FLUX's architecture narrowed to 256 channels, one block per list, 64 px, 2 steps; the demo for 2 iterations).
# Options: --device cuda|cpu, --blocks N (0 = full depth), --width N (0 = real), --resolution PX, --steps N,
# --out DIR, --kit, --no-demo, --no-scale, --deadline S (seconds for the whole check, default 470).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEVICE=cuda BLOCKS=0 WIDTH=0 RES=512 STEPS=8 OUT=gpu_check DEMO=1 SCALE=1 KIT=0 TOKENS=512 DEADLINE=470
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --blocks) BLOCKS=$2; shift 2 ;;
    --width) WIDTH=$2; shift 2 ;;
    --resolution) RES=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --out) OUT=$2; shift 2 ;;
    --kit) KIT=1; shift ;;
    --no-demo) DEMO=0; shift ;;
    --no-scale) SCALE=0; shift ;;
    --deadline) DEADLINE=$2; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
T0=$SECONDS
say() { printf '[gpu_check %4ss] %s\n' "$((SECONDS - T0))" "$*"; }
STEPS_JSON="$OUT/steps.json"
echo "{}" > "$STEPS_JSON"
# step NAME LIMIT CMD...: run CMD in its own process group, killed after LIMIT seconds (or the deadline); record it
step() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - (SECONDS - T0)))
  if [ "$left" -lt 5 ]; then say "$name: skipped (deadline of ${DEADLINE} s reached)"; record "$name" skipped 0; return 0; fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  local t=$SECONDS rc=0
  say "$name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  say "$name: exit code $rc in $((SECONDS - t)) s"
  record "$name" "$rc" "$((SECONDS - t))"
  return 0
}
record() {
  "$PY" - "$STEPS_JSON" "$1" "$2" "$3" <<'EOF'
import json, sys
path, name, rc, secs = sys.argv[1:]
d = json.load(open(path))
d[name] = {"exit_code": rc if rc == "skipped" else int(rc), "seconds": int(secs)}
json.dump(d, open(path, "w"), indent=1)
EOF
}

# ---------------------------------------------------------------- the Python and ComfyUI to run
if [ "$KIT" = 1 ]; then
  PY="${PYTHON:-python3}"
  [ -f .gpu-kit/manifest.json ] || { echo "gpu_check.sh: no .gpu-kit/ here: run scripts/gpu_kit.sh and carry .gpu-kit" >&2; exit 1; }
  RUN="${BRANCHGRPO_KIT_RUN:-${TMPDIR:-/tmp}/branchgrpo-gpu-kit}"
  rm -rf "$RUN"
  mkdir -p "$RUN/base/custom_nodes" "$RUN/no-frontend"
  say "unpacking .gpu-kit/ into $RUN"
  tar -xJf .gpu-kit/wheels.tar.xz -C "$RUN"
  tar -xJf .gpu-kit/comfyui-*.tar.xz -C "$RUN"
  COMFY="$(ls -d "$RUN"/comfyui-*/ | head -1)"; COMFY="${COMFY%/}"
  "$PY" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$RUN/site" "$RUN"/wheels/*.whl
  export PYTHONPATH="$RUN/site${PYTHONPATH:+:$PYTHONPATH}"
  BASE="$RUN/base"
  ln -sfn "$ROOT" "$BASE/custom_nodes/ComfyUI-BranchGRPO"
  SERVER_ARGS=(--front-end-root "$RUN/no-frontend" --database-url "sqlite:///$RUN/comfyui.db")
else
  PY="${PYTHON:-.venv/bin/python}"
  if [ -f .comfyui-0.33/main.py ]; then COMFY="$ROOT/.comfyui-0.33"; PY="${PYTHON:-.venv-0.33/bin/python}"
  else COMFY="$ROOT/.comfyui"; fi
  RUN="$(mktemp -d)"
  BASE="$RUN/base"
  mkdir -p "$BASE/custom_nodes"
  ln -sfn "$ROOT" "$BASE/custom_nodes/ComfyUI-BranchGRPO"
  SERVER_ARGS=(--database-url "sqlite:///$RUN/comfyui.db")
fi
export BRANCHGRPO_COMFYUI_DIR="$COMFY" BRANCHGRPO_COMFY_PYTHON="$PY" HF_HUB_OFFLINE=1
mkdir -p "$BASE/models/loras" "$BASE/output" "$BASE/input" "$BASE/user"
say "python: $PY; ComfyUI: $COMFY; device: $DEVICE; out: $OUT"
step environment 60 "$PY" scripts/gpu_check_report.py environment --out "$OUT/environment.json"

# ---------------------------------------------------------------- the demo's graph through a real server
if [ "$DEMO" = 1 ]; then
  PORT="$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  URL="http://127.0.0.1:$PORT"
  CPU_ARG=()
  [ "$DEVICE" = cpu ] && CPU_ARG=(--cpu)
  "$PY" "$COMFY/main.py" --listen 127.0.0.1 --port "$PORT" --disable-auto-launch --base-directory "$BASE" \
    "${SERVER_ARGS[@]}" "${CPU_ARG[@]}" > "$OUT/comfyui.log" 2>&1 &
  SERVER=$!
  trap 'kill "$SERVER" 2>/dev/null || true' EXIT
  UP=0
  for _ in $(seq 1 150); do
    if "$PY" -c "import urllib.request, sys; urllib.request.urlopen(sys.argv[1] + '/system_stats', timeout=2)" "$URL" 2>/dev/null; then UP=1; break; fi
    kill -0 "$SERVER" 2>/dev/null || break
    sleep 1
  done
  if [ "$UP" = 1 ]; then
    say "ComfyUI is up at $URL"
    ITS=(); CONT_ITS=28
    if [ "$DEVICE" = cpu ]; then ITS=(--set 5.iterations=2); CONT_ITS=3; fi
    step demo 150 "$PY" scripts/run_demo.py --url "$URL" "${ITS[@]}" --set '6.overwrite=true' \
      --summary "$OUT/demo_summary.json" --timeout 140
    step adapters 60 "$PY" scripts/gpu_check_report.py adapters --summary "$OUT/demo_summary.json" \
      --log "$OUT/comfyui.log" --out "$OUT/adapters.json"
    step continued 150 "$PY" scripts/run_demo.py --url "$URL" --set "5.iterations=$CONT_ITS" \
      --set '5.continue_lora="branchgrpo/cpu_demo.safetensors"' --set '5.run_name="cpu_demo_continued"' \
      --set '5.resume=false' --set '6.filename="branchgrpo/cpu_demo_continued"' --set '6.overwrite=true' \
      --summary "$OUT/continued_summary.json" --timeout 140
    step budget 60 "$PY" scripts/gpu_check_report.py budget --url "$URL" --out "$OUT/budget.json"
  else
    say "ComfyUI did not start; its log:"; tail -30 "$OUT/comfyui.log" || true
    record server 1 0
  fi
  kill "$SERVER" 2>/dev/null || true
  wait "$SERVER" 2>/dev/null || true
  trap - EXIT
fi

# ---------------------------------------------------------------- FLUX.1-dev's architecture at full depth
if [ "$SCALE" = 1 ]; then
  SHAPE=(--blocks "$BLOCKS" --width "$WIDTH" --resolution "$RES" --steps "$STEPS" --text-tokens "$TOKENS")
  if [ "$DEVICE" = cpu ]; then
    # the CPU form: a smoke test, in seconds (2 steps, 4 roots, the tree forking once, 256 channels, one block)
    [ "$WIDTH" = 0 ] && WIDTH=256
    [ "$BLOCKS" = 0 ] && BLOCKS=1
    SHAPE=(--blocks "$BLOCKS" --width "$WIDTH" --resolution 64 --steps 2 --text-tokens 8 --group-size 4
           --split-steps 0 --lora-rank 4 --lora-targets "*qkv*" --max-batch 16 --max-train-batch 16)
    RUNS=(--iterations 1)
  else
    RUNS=(--iterations 2 --max-batch 16 --max-train-batch 8)
  fi
  step fp8 120 "$PY" -m bench.scale --family flux-dev --device "$DEVICE" --weight-dtype fp8 "${SHAPE[@]}" \
    --iterations 1 "${RUNS[@]:2}" --out "$OUT/fp8.json"
  step ratios 300 "$PY" -m bench.scale --ratios --family flux-dev --device "$DEVICE" "${SHAPE[@]}" "${RUNS[@]}" \
    --out "$OUT/ratios.json"
fi
"$PY" scripts/gpu_check_report.py summary --out "$OUT"
say "done in $((SECONDS - T0)) s; results in $OUT"
