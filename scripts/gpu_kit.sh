#!/usr/bin/env bash
# The GPU check's kit: what the lent GPU machine lacks to run scripts/gpu_check.sh, in .gpu-kit/ (ignored by git;
# pass it to the device with carry=[".gpu-kit"]). That machine has Python 3.12, torch 2.11 (CUDA 13), transformers,
# peft, safetensors, aiohttp, scipy, ... and no network, no ComfyUI, and none of ComfyUI's requirements that its
# image does not carry. The kit holds:
#   .gpu-kit/wheels.tar.xz        Python 3.12 / manylinux x86-64 wheels of exactly those packages (list below),
#                                 each repacked uncompressed so that xz compresses the lot
#   .gpu-kit/comfyui-0.33.0.tar.xz the ComfyUI 0.33.0 tree (../shared/comfyui/0.33.0 without its tests)
#   .gpu-kit/manifest.json        every wheel's version, size and sha256, what was left out and why, the sizes
# It stays under 60 MiB (checked here): the whole working tree that travels to the device is at most 64 MiB.
#
# Left out, with the reason (gpu_check.sh works without them):
#   - comfy-kitchen's two compiled extensions (backends/cuda/_C.abi3.so, 176 MB, and backends/hip/_C.abi3.so,
#     59 MB unpacked; 58 MB as a wheel, over the limit alone). comfy-kitchen loads without them (its CUDA backend
#     marks itself unavailable) and ComfyUI then runs its triton / eager kernels. The HIP one is imported only
#     under a ROCm torch.
#   - comfyui-frontend-package (22 MB): the check drives the server over its HTTP API; ComfyUI starts with
#     --front-end-root pointing at an empty folder.
#   - comfyui-workflow-templates, comfyui-embedded-docs (the frontend's template browser and node docs), comfy-angle
#     and PyOpenGL (only the GLSL nodes): optional for ComfyUI, which logs their absence; the check uses none.
#
# Usage: bash scripts/gpu_kit.sh [--force]        (about a minute; downloads once into .gpu-kit-cache/)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "gpu_kit.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done
KIT="$ROOT/.gpu-kit"
CACHE="$ROOT/.gpu-kit-cache"
CORE_SRC="${BRANCHGRPO_CORE2_SRC:-$ROOT/../shared/comfyui/0.33.0}"
LIMIT_MIB=60
# What ComfyUI 0.33.0 (its requirements.txt) and the pack (requirements.txt: the config schema and writer) need
# that the device's image lacks, with their own dependencies that it lacks too (kornia and spandrel are ComfyUI's
# "non essential" ones: without them five of its node modules fail to import); versions as in
# scripts/constraints-0.33.txt and scripts/constraints.txt, which the suite runs 0.33.0 with; websocket-client
# for run_demo.py's live progress.
WHEELS=(
  torchsde==0.2.6 trampoline==0.1.2
  av==18.1.0
  alembic==1.20.1 Mako==1.4.3 SQLAlchemy==2.1.9 greenlet==3.5.6
  comfy-kitchen==0.2.31 comfy-aimdo==0.4.13
  simpleeval==1.0.8 blake3==1.0.11
  pydantic==2.14.4 pydantic_core==2.50.5 typing-inspection==0.4.5 annotated-types==0.8.0
  pydantic-settings==2.16.3 python-dotenv==1.2.4
  kornia==0.9.0 kornia_rs==0.2.0 spandrel==0.4.2
  tomli_w==1.2.0 websocket-client==1.9.2
)
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PY="$ROOT/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi
if [[ ! -f "$CORE_SRC/main.py" ]]; then
  echo "gpu_kit.sh: no ComfyUI 0.33.0 tree at $CORE_SRC (set BRANCHGRPO_CORE2_SRC)" >&2
  exit 1
fi
STAMP="$( { printf '%s\n' "${WHEELS[@]}"; echo "$CORE_SRC"; cat "$0" "$ROOT/scripts/gpu_kit_pack.py"; } | sha256sum | cut -d' ' -f1)"
if [[ "$FORCE" == 0 && -f "$KIT/manifest.json" && "$(cat "$KIT/.stamp" 2>/dev/null || true)" == "$STAMP" ]]; then
  echo "[gpu_kit] .gpu-kit/ up to date ($(du -sb "$KIT" | cut -f1) bytes)"
  exit 0
fi
mkdir -p "$CACHE/wheels"
echo "[gpu_kit] downloading ${#WHEELS[@]} wheels for CPython 3.12 / manylinux x86-64 into .gpu-kit-cache/"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --abi abi3 --abi none --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 \
  --platform manylinux2010_x86_64 --platform any -d "$CACHE/wheels" "${WHEELS[@]}" \
  2> >(grep -vE "^WARNING: Location 'file:.*' is ignored" >&2 || true)
rm -rf "$KIT.tmp"
mkdir -p "$KIT.tmp"
"$PY" "$ROOT/scripts/gpu_kit_pack.py" --wheels "$CACHE/wheels" --core "$CORE_SRC" --out "$KIT.tmp" \
  --limit-mib "$LIMIT_MIB" "${WHEELS[@]}"
echo "$STAMP" > "$KIT.tmp/.stamp"
rm -rf "$KIT"
mv "$KIT.tmp" "$KIT"
echo "[gpu_kit] .gpu-kit/ ready: $(du -sb "$KIT" | cut -f1) bytes (limit ${LIMIT_MIB} MiB)"
