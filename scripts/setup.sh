#!/usr/bin/env bash
# Set up qwen3coder in ./.venv: the right torch build for this machine, then the package.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   runtime + test dependencies (transformers, openai, pytest, hypothesis,
#                             triton for the kernel tests, playwright + Debian chromium for the web page)
# Environment: PYTHON (interpreter, default python3), TORCH_SPEC (override the torch requirement),
# TORCH_INDEX_URL (a pip index for torch, e.g. your mirror of CPU wheels).
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
"$VPY" -m pip install -q --upgrade pip >/dev/null 2>&1 || true

if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${TORCH_SPEC:-}" ]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    spec="torch"            # a GPU is present: the default (CUDA) build
  else
    spec="torch==2.13.0"    # no GPU: the CPU build (found on local disk on the project's machines)
  fi
  echo "setup: installing $spec"
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    "$VPY" -m pip install -q "$spec" --index-url "$TORCH_INDEX_URL"
  else
    "$VPY" -m pip install -q "$spec"
  fi
fi

# torch is already satisfied, so this installs only the rest
"$VPY" -m pip install -q -e ".${extras}"

# tests: the web-page test drives Debian's Chromium through playwright (no browser download)
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing Debian's chromium for the web-page test"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium fonts-dejavu-core) \
      >/dev/null 2>&1 || echo "setup: could not install chromium; the web-page test will skip"
  else
    echo "setup: no chromium found; the web-page test will skip (install Debian's 'chromium' to run it)"
  fi
fi
echo "setup: done ($("$VPY" -c 'import torch; print("torch", torch.__version__, "cuda" if torch.cuda.is_available() else "cpu")'))"
