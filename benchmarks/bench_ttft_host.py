"""Time to first token of one prompt against the GPU time of its kernels: is a prefill host-bound?

    python benchmarks/bench_ttft_host.py [--preset 30b-a3b] [--lengths 128,1024,8192] [--repeats 5]
        [--out-dir DIR]

A prefill runs eagerly (decode steps replay CUDA graphs): the host issues every kernel of every layer
(~9 Triton launches and 3 cuBLAS calls per layer of the 30B-A3B) through Python. For each prompt length
this times `--repeats` single-prompt `generate(max_tokens=1)` calls (after a warm-up of the same length:
no compilation timed) and, once under the PyTorch profiler, sums the device time of the kernels of such
a call. When the time to first token is well above the kernels' time, the host is the bound. Dummy
weights at the preset's shapes; JSON under benchmarks/results/ (`ttft_host_<preset>-*.json`). Needs CUDA.
"""

from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="30b-a3b")
    ap.add_argument("--lengths", default="128,1024,8192", help="prompt lengths, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ttft_host needs a CUDA device")
    from torch.profiler import ProfilerActivity, profile

    from qwen3coder.bench.decode import _prompts, _timed_generate
    from qwen3coder.bench.results import write_result
    from qwen3coder.config import ModelConfig
    from qwen3coder.engine import LLM
    from qwen3coder.loader import build_dummy_model

    cfg = ModelConfig.preset(args.preset)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    model = build_dummy_model(cfg, device="cuda", dtype="bfloat16")
    llm = LLM(model, device="cuda", skip_tokenizer_init=True, max_model_len=max(lengths) + 64, max_num_seqs=16,
              enable_prefix_caching=False, max_num_batched_tokens=max(8192, max(lengths)))
    metrics: dict[str, dict] = {}
    for n in lengths:
        _timed_generate(llm, _prompts(1, n, cfg.vocab_size, seed=n + 1), 1, "cuda")  # compile, warm up
        ttft = [_timed_generate(llm, _prompts(1, n, cfg.vocab_size, seed=n + 10 + i), 1, "cuda")[0] * 1000
                for i in range(args.repeats)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _timed_generate(llm, _prompts(1, n, cfg.vocab_size, seed=n + 5), 1, "cuda")
        kernels_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1000
        best = min(ttft)
        metrics[f"prompt_{n}"] = {"ttft_ms": [round(t, 2) for t in ttft], "ttft_ms_best": round(best, 2),
                                  "kernels_ms": round(kernels_ms, 2),
                                  "ttft_over_kernels": round(best / kernels_ms, 2) if kernels_ms else None}
        print(f"[ttft-host] {n} tokens: time to first token {best:.1f} ms (best of {args.repeats}), "
              f"kernels {kernels_ms:.1f} ms", flush=True)
    write_result(f"ttft_host_{args.preset}", metrics, extra={"preset": args.preset, "repeats": args.repeats},
                 out_dir=args.out_dir)


if __name__ == "__main__":
    main()
