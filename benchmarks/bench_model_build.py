"""Build a preset with dummy weights on the GPU and run a forward: build time, memory, forward time.

    python benchmarks/bench_model_build.py --preset 30b-a3b --tokens 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qwen3coder.bench.results import write_result  # noqa: E402

from qwen3coder.config import ModelConfig  # noqa: E402
from qwen3coder.loader import build_dummy_model  # noqa: E402
from qwen3coder.models.cache import allocate_kv_cache, allocate_state_cache  # noqa: E402
from qwen3coder.models.context import ForwardContext  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="30b-a3b")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    cfg = ModelConfig.preset(args.preset)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = build_dummy_model(cfg, device="cuda", dtype=args.dtype)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    weights_gib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), device="cuda")
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids)
        torch.cuda.synchronize()
        forward_ms = (time.perf_counter() - t0) * 1000
        assert torch.isfinite(logits.float()).all()
        # one cached prefill + decode step through the paged path (reference kernels)
        allocate_kv_cache(model, 64, 16, model.lm_head.weight.dtype, "cuda")
        allocate_state_cache(model, 2, model.lm_head.weight.dtype, "cuda")
        ctx = ForwardContext.build([args.tokens], [args.tokens], [list(range(1, 1 + (args.tokens + 15) // 16 + 1))],
                                   16, state_indices=[0], has_initial_state=[False], device="cuda")
        model.forward_step(ids[0], torch.arange(args.tokens, device="cuda"), ctx)
        ctx = ForwardContext.build([1], [args.tokens + 1], [list(range(1, 1 + (args.tokens + 16) // 16 + 1))],
                                   16, state_indices=[0], has_initial_state=[True], device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = model.forward_step(ids[0, :1], torch.tensor([args.tokens], device="cuda"), ctx)
        model.compute_logits(h)
        torch.cuda.synchronize()
        decode_ms = (time.perf_counter() - t0) * 1000
    total, active = cfg.num_params()
    write_result(f"model_build_{args.preset}", {
        "build_dummy_s": round(build_s, 2),
        "weights_gib": round(weights_gib, 2),
        "max_memory_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        f"reference_forward_{args.tokens}_tokens_ms": round(forward_ms, 1),
        "reference_decode_step_ms": round(decode_ms, 1),
        "params_total": total, "params_active": active,
    }, extra={"preset": args.preset, "dtype": args.dtype,
              "note": "plain-PyTorch reference path (no Triton kernels, no CUDA graphs)"})


if __name__ == "__main__":
    main()
