#!/usr/bin/env bash
# The CPU demo, from a fresh clone, in ONE command:
#   1. scripts/setup_dev.sh: the sandbox (.venv, ComfyUI 0.3.75 in .comfyui/, .comfy-base/ with this pack linked);
#   2. scripts/run_demo.py: starts that ComfyUI headless (CPU), converts workflows/cpu_demo.json (UI format)
#      to an API prompt with the server's /object_info, queues it, streams the Trainer's reward per iteration,
#      waits, stops the server, and prints where the LoRA, the reward curve and the before/after images went.
# Training itself takes a few minutes on 2 CPU cores (see README). Extra arguments go to run_demo.py, e.g.
#   bash scripts/demo.sh --set 5.iterations=10      (node 5 = the Trainer)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
T0=$SECONDS
bash scripts/setup_dev.sh
echo "[demo.sh] set-up done in $((SECONDS - T0)) s; running workflows/cpu_demo.json in a headless ComfyUI (CPU)"
status=0
.venv/bin/python scripts/run_demo.py --base-dir "$PWD/.comfy-base" "$@" || status=$?
echo "[demo.sh] finished in $((SECONDS - T0)) s (exit code $status)"
exit "$status"
