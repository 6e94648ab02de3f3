#!/usr/bin/env bash
# The whole test suite: engine unit tests, reward tests, and the real-ComfyUI integration tests (the tests start
# ComfyUI servers themselves), on ComfyUI 0.3.75 (.comfyui/, the oldest supported core). Then the ComfyUI
# integration tests again on ComfyUI 0.33.0 (.comfyui-0.33/, upstream of 2026-08) when scripts/setup_dev.sh built
# it: the family matrix, adapters, memory policy, preview, training / resume / interrupt / out of memory, the
# Trainer's checks, the demo, the contract with the core and the browser check with that core's frontend.
# Run scripts/setup_dev.sh first. Arguments go to pytest, and then only the first core runs.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x .venv/bin/python ]]; then
  echo "test.sh: .venv is missing; run 'bash scripts/setup_dev.sh' first" >&2
  exit 2
fi
if [[ $# -gt 0 ]]; then
  exec .venv/bin/python -m pytest -q "$@"
fi
CORE2_TESTS=(tests/test_comfy_family_matrix.py tests/test_comfy_adapters.py tests/test_comfy_memory.py
             tests/test_comfy_memory_server.py tests/test_comfy_preview.py tests/test_comfy_training.py
             tests/test_trainer_checks.py tests/test_out_of_memory.py tests/test_trainer_node.py
             tests/test_demo.py tests/test_dev_nodes.py tests/test_comfy_contract.py tests/test_browser.py)
echo "[test.sh] ComfyUI $(cat .comfyui/comfyui_version.py 2>/dev/null | grep -oE '[0-9]+\.[0-9]+\.[0-9]+' | head -1) (.comfyui/): the whole suite"
.venv/bin/python -m pytest -q
first=$?
second=0
if [[ -x .venv-0.33/bin/python && -f .comfyui-0.33/main.py ]]; then
  echo "[test.sh] ComfyUI 0.33.0 (.comfyui-0.33/): the integration tests"
  BRANCHGRPO_COMFYUI_DIR="$PWD/.comfyui-0.33" BRANCHGRPO_COMFY_PYTHON="$PWD/.venv-0.33/bin/python" \
    .venv-0.33/bin/python -m pytest -q "${CORE2_TESTS[@]}"
  second=$?
else
  echo "[test.sh] no second core (.comfyui-0.33/): run scripts/setup_dev.sh with ../shared/comfyui/0.33.0 present"
fi
[[ $first == 0 && $second == 0 ]]
