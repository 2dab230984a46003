#!/usr/bin/env bash
# Everything the GPU milestone measures, in one command on a CUDA machine (e.g. one `device` call):
#   scripts/gpu_check.sh [steps]      steps: comma-separated from tests,kernels,bench,ab,probes
#                                     (default: tests,kernels,bench)
# - tests:   the `gpu`- and `kernels`-marked tests (kernels vs references, engine parity, graphs, async
#            scheduling)
# - kernels: the kernel sweeps (MoE tiles, routing, QK-norm/RoPE, skinny GEMM, prefill attention)
# - bench:   `qwen3coder bench --preset 30b-a3b --compare-transformers --profile` (all scenarios)
# - ab:      benchmarks/bench_decode_variants.py: batch-1/16 decode under launch variants (PDL modes,
#            the fused norm+router+routing, MoE tiles, qkv on the skinny GEMM) in one process;
#            $QWEN3CODER_AB picks variants (comma-separated; default all)
# - probes:  the speed-of-light probes of bench_decode_variants.py (decode without attention, without
#            the routed experts, without both) at the four decode scenarios of the targets: what each
#            part of a step costs in the engine (docs/PERFORMANCE.md)
# Results (JSON) go to $QWEN3CODER_RESULTS, else $OUT (the device tool's output folder), else
# benchmarks/results. Pass QWEN3CODER_COMMIT=<hash> from your checkout: a copied tree's `git rev-parse`
# can answer with a stale HEAD (it did on the device machine). Wheels the machine lacks (fastapi, uvicorn, ... for the online scenario and the
# server tests) are installed from .wheels carried in .whl/ when present (see docs/ENGINE.md).
set -uo pipefail
cd "$(dirname "$0")/.."
steps=",${1:-tests,kernels,bench},"
py=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/qwen3coder-site .whl/*.whl \
    || echo "gpu_check: some carried wheels did not install" >&2
  export PYTHONPATH="/tmp/qwen3coder-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export QWEN3CODER_RESULTS="${QWEN3CODER_RESULTS:-${OUT:-benchmarks/results}}"
export QWEN3CODER_COMMIT="${QWEN3CODER_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}"
"$py" -c "import torch; assert torch.cuda.is_available(), 'gpu_check: no CUDA device'" || exit 2
rc=0
run() { echo "== $*"; "$@" || { echo "gpu_check: FAILED: $*" >&2; rc=1; }; }
if [[ $steps == *,tests,* ]]; then
  # the openai-client server tests are collected only where the `openai` package is installed
  # `kernels`: the kernel tests that run compiled on a GPU and through the interpreter on CPU (CI)
  run "$py" -m pytest -q -m "gpu or kernels" -p no:cacheprovider --continue-on-collection-errors tests
fi
if [[ $steps == *,kernels,* ]]; then
  run "$py" benchmarks/bench_moe_routing.py
  run "$py" benchmarks/bench_qk_norm_rope.py
  run "$py" benchmarks/bench_skinny_gemm.py --time-budget 80
  run "$py" benchmarks/bench_prefill_attention.py --sweep
  run "$py" benchmarks/bench_moe_tiles.py
fi
if [[ $steps == *,bench,* ]]; then
  run "$py" -m qwen3coder.cli bench --preset 30b-a3b --compare-transformers --profile
fi
if [[ $steps == *,ab,* ]]; then
  run "$py" benchmarks/bench_decode_variants.py --variants "${QWEN3CODER_AB:-all}"
fi
if [[ $steps == *,probes,* ]]; then
  probes=baseline,sol_no_attention,sol_no_experts,sol_no_attention+sol_no_experts
  run "$py" benchmarks/bench_decode_variants.py --batches 1,16 --variants "$probes"
  run "$py" benchmarks/bench_decode_variants.py --batches 10 --prompt-len 2048 --variants "$probes"
  run "$py" benchmarks/bench_decode_variants.py --batches 64 --prompt-len 1024 --out-len 128 --variants "$probes"
fi
exit $rc
