#!/usr/bin/env bash
# The whole test suite: engine unit tests, reward tests, and the real-ComfyUI integration tests
# (a ComfyUI 0.3.75 server is started by the tests themselves). Run scripts/setup_dev.sh first.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x .venv/bin/python ]]; then
  echo "test.sh: .venv is missing; run 'bash scripts/setup_dev.sh' first" >&2
  exit 2
fi
exec .venv/bin/python -m pytest -q "$@"
