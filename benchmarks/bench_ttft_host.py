"""Time to first token of one prompt with and without prefill CUDA graphs, against the GPU time of the
prefill's kernels: is a prefill host-bound, and what do the graphs take off?

    python benchmarks/bench_ttft_host.py [--preset 30b-a3b] [--lengths 16,128,1024,2048,8192]
        [--context 8192] [--repeats 5] [--out-dir DIR]

An eager prefill issues every kernel of every layer (~9 Triton launches and 3 cuBLAS calls per layer
of the 30B-A3B) through Python; prefill graphs (`engine.cuda_runner`, steps of up to
`max_prefill_graph_tokens` tokens) replay them. For each engine (`graphs`: the default;
`eager_prefill`: `max_prefill_graph_tokens=0`; decode graphs in both) and each prompt length this
times `--repeats` single-prompt `generate(max_tokens=1)` calls after a warm-up of the same length (no
compilation timed):
* `prompt_<n>`: a fresh prompt of n tokens;
* `turn_<n>` (with `--context C`): n new tokens after C tokens the prefix cache already holds — an
  agent's next turn (tool output appended to a cached conversation).
Once per case, under the PyTorch profiler, the device time of the kernels of such a call is summed
(`kernels_ms`): a time to first token well above it means the host is the bound. The sum is the GPU's
work only when kernels run one after another, as in a host-bound eager prefill; in a graph replay with
programmatic dependent launch a kernel starts before its predecessor ends and its recorded time
includes that wait, so for the `graphs` engine `kernels_ms` overstates the work (a 16-token turn after
8K: 10.5 ms summed, 5.9 ms per replay of its graph). Dummy weights at the
preset's shapes; JSON under benchmarks/results/ (`ttft_host_<preset>-*.json`). Needs CUDA.
"""

from __future__ import annotations

import argparse
import gc

import torch


def measure(llm, vocab: int, lengths: list[int], context: int, repeats: int) -> dict[str, dict]:
    from torch.profiler import ProfilerActivity, profile

    from qwen3coder.bench.decode import _prompts, _timed_generate

    def prompt(n: int, seed: int, prefix: list[int] | None) -> list[dict]:
        p = _prompts(1, n, vocab, seed)
        if prefix is not None:
            p[0]["prompt_token_ids"] = prefix + p[0]["prompt_token_ids"]
        return p

    prefix = _prompts(1, context, vocab, seed=99)[0]["prompt_token_ids"] if context else None
    if prefix is not None:
        _timed_generate(llm, [{"prompt_token_ids": prefix}], 1, "cuda")  # into the prefix cache
    out: dict[str, dict] = {}
    cases = [(f"prompt_{n}", n, None) for n in lengths] + [(f"turn_{n}", n, prefix) for n in lengths if prefix]
    for key, n, pre in cases:
        _timed_generate(llm, prompt(n, n + 1, pre), 1, "cuda")  # compile, warm up
        ttft = [_timed_generate(llm, prompt(n, n + 10 + i, pre), 1, "cuda")[0] * 1000 for i in range(repeats)]
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            _timed_generate(llm, prompt(n, n + 5, pre), 1, "cuda")
        kernels_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1000
        best = min(ttft)
        out[key] = {"ttft_ms": [round(t, 2) for t in ttft], "ttft_ms_best": round(best, 2),
                    "kernels_ms": round(kernels_ms, 2),
                    "ttft_over_kernels": round(best / kernels_ms, 2) if kernels_ms else None}
        print(f"[ttft-host] {key}: time to first token {best:.1f} ms (best of {repeats}), kernels "
              f"{kernels_ms:.1f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="30b-a3b")
    ap.add_argument("--lengths", default="16,128,1024,2048,8192", help="prompt lengths, comma-separated")
    ap.add_argument("--context", type=int, default=8192, help="cached tokens before each turn (0: no turns)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out-dir", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_ttft_host needs a CUDA device")
    from qwen3coder.bench.results import write_result
    from qwen3coder.config import ModelConfig
    from qwen3coder.engine import LLM
    from qwen3coder.loader import build_dummy_model
    from qwen3coder.models.cache import free_caches

    cfg = ModelConfig.preset(args.preset)
    lengths = [int(x) for x in args.lengths.split(",") if x]
    model = build_dummy_model(cfg, device="cuda", dtype="bfloat16")
    metrics: dict[str, dict] = {}
    for engine, graph_tokens in (("graphs", None), ("eager_prefill", 0)):
        print(f"[ttft-host] engine: {engine}", flush=True)
        llm = LLM(model, device="cuda", skip_tokenizer_init=True, max_model_len=args.context + max(lengths) + 64,
                  max_num_seqs=16, max_num_batched_tokens=max(8192, max(lengths)),
                  max_prefill_graph_tokens=graph_tokens)
        metrics[engine] = measure(llm, cfg.vocab_size, lengths, args.context, args.repeats)
        metrics[engine]["prefill_graph_tokens"] = list(llm.llm_engine.runner.prefill_graph_sizes)
        del llm
        free_caches(model)  # the next engine sizes its KV cache from free memory
        gc.collect()
        torch.cuda.empty_cache()
    write_result(f"ttft_host_{args.preset}", metrics,
                 extra={"preset": args.preset, "repeats": args.repeats, "context": args.context},
                 out_dir=args.out_dir)


if __name__ == "__main__":
    main()
