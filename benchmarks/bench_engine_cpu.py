"""CPU throughput benchmark of the engine on a random-weight preset (no checkpoint needed) or a checkpoint.

Generates `--num-prompts` requests with random prompt lengths through `LLM.generate` and reports
request / prompt / output token throughput, steps, prefix-cache hit rate and preemptions. Writes
JSON (device, date, git commit, command, config, metrics) to benchmarks/results/.

    python benchmarks/bench_engine_cpu.py --preset tiny --num-prompts 64 --output-len 64
    python benchmarks/bench_engine_cpu.py --model bundled   # the bundled qwen3coder-tiny (or a checkpoint path)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import subprocess
import sys
import time

import torch

from qwen3coder import default_model_path
from qwen3coder.config import ModelConfig
from qwen3coder.engine import LLM, SamplingParams
from qwen3coder.models import build_model


def git_commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:  # noqa: BLE001 - no git or no commit yet
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="random-weight model shape (without --model)")
    ap.add_argument("--model", default=None, help="a checkpoint directory, or `bundled` for qwen3coder-tiny")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128, help="mean prompt length (uniform 0.5x..1.5x)")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--shared-prefix", type=int, default=0, help="tokens every prompt starts with")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-kv-blocks", type=int, default=None)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    if args.model is None:
        model = build_model(ModelConfig.preset(args.preset)).float()
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.05)
    else:
        model = default_model_path() if args.model == "bundled" else args.model
        args.preset = None  # the record names the checkpoint, not a preset
    max_len = args.shared_prefix + int(args.input_len * 1.5) + args.output_len + 16
    llm = LLM(model, device="cpu", skip_tokenizer_init=True, max_model_len=max_len,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              num_kv_blocks=args.num_kv_blocks, enable_prefix_caching=not args.no_prefix_caching,
              seed=args.seed)
    vocab = llm.llm_engine.vocab_size
    rng = random.Random(args.seed)
    prefix = [rng.randrange(2, vocab) for _ in range(args.shared_prefix)]
    prompts = []
    for _ in range(args.num_prompts):
        n = max(1, int(args.input_len * rng.uniform(0.5, 1.5)))
        prompts.append({"prompt_token_ids": prefix + [rng.randrange(2, vocab) for _ in range(n)]})
    params = SamplingParams(temperature=args.temperature, max_tokens=args.output_len, ignore_eos=True, seed=None)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    engine = llm.llm_engine
    before = engine.get_stats(drain=True)
    steps = 0
    step = engine.step

    def counting_step():
        nonlocal steps
        steps += 1
        return step()

    engine.step = counting_step
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    engine.step = step
    stats = engine.get_stats(drain=True)
    n_in = sum(len(p["prompt_token_ids"]) for p in prompts)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = sorted(stats.ttft_seconds)
    metrics = {
        "elapsed_s": elapsed, "steps": steps, "requests_per_s": len(prompts) / elapsed,
        "prompt_tokens": n_in, "output_tokens": n_out, "output_tokens_per_s": n_out / elapsed,
        "total_tokens_per_s": (n_in + n_out) / elapsed,
        "prompt_tokens_computed": stats.prompt_tokens_total - before.prompt_tokens_total,
        "prefix_cache_hit_rate": (stats.prefix_cache_hits - before.prefix_cache_hits)
        / max(1, stats.prefix_cache_queries - before.prefix_cache_queries),
        "preemptions": stats.num_preemptions - before.num_preemptions,
        "ttft_p50_s": ttft[len(ttft) // 2] if ttft else None,
        "num_kv_blocks": engine.runner.num_kv_blocks,
    }
    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "benchmark": "bench_engine_cpu", "date": now.isoformat(timespec="seconds"), "git_commit": git_commit(),
        "command": " ".join([sys.executable.split("/")[-1]] + sys.argv),
        "device": {"type": "cpu", "processor": platform.processor() or platform.machine(),
                   "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                   "torch": torch.__version__, "python": platform.python_version()},
        "config": vars(args), "metrics": metrics,
    }
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_engine_cpu_{now.strftime('%Y%m%dT%H%M%SZ')}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(metrics, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
