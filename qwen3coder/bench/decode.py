"""Engine speed at a preset's real shapes with dummy weights: decode, time to first token, offline runs.

    qwen3coder bench --preset 30b-a3b --compare-transformers
    qwen3coder bench --preset tiny --device cpu --quick        # smoke run
    qwen3coder bench --preset 30b-a3b --profile                # where decode time goes

Metrics (keys of the JSON under benchmarks/results/): decode_bs{1,16,64}_tok_s (output tokens/s of the
decode phase: 128-token prompts; decode_bs1_sync_tok_s without async scheduling,
decode_bs{1,16}_nopdl_tok_s with graphs captured without programmatic dependent launch), hbm_fraction_bs1
(bytes a batch-1 decode step must read / step time / the copy bandwidth measured in the same run),
ttft_ms_{1k,8k,32k}, offline_10x2048x1024_output_tok_s, offline_64x1024x128_total_tok_s (each after a
warm-up call of the same shapes: Triton's compiles are a start-up cost; with offline_*_prefill_s, a call
of the same shapes with one output token, and offline_*_decode_step_ms, the rest of the run per decode
step), online_* (streaming clients through the server at a given concurrency), and with
--compare-transformers transformers_decode_bs{1,16}_tok_s on the same shape (transformers' fastest
experts implementation available).
"""

from __future__ import annotations

import argparse
import gc
import time
import traceback

import torch

from qwen3coder.bench.report import report_file
from qwen3coder.bench.results import write_result
from qwen3coder.config import ModelConfig
from qwen3coder.engine import LLM, SamplingParams
from qwen3coder.kernels import pdl
from qwen3coder.loader import build_dummy_model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    return [{"prompt_token_ids": torch.randint(0, vocab, (length,), generator=g).tolist()} for _ in range(n)]


def _timed_generate(llm: LLM, prompts: list[dict], max_tokens: int, device: str) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    _sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync(device)
    elapsed = time.perf_counter() - t0
    for o in outs:  # a request that failed must not count as a fast one
        if getattr(o, "error", None) or len(o.outputs[0].token_ids) != max_tokens:
            raise RuntimeError(f"request {o.request_id} did not complete: finish_reason="
                               f"{o.outputs[0].finish_reason}, error={getattr(o, 'error', None)}")
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def decode_tok_s(llm: LLM, batch: int, vocab: int, out_len: int, device: str, prompt_len: int = 128) -> float:
    """Output tokens/s of the decode phase: (run with out_len tokens) - (run with 1 token), prompts of
    `prompt_len` tokens. The 1-token run is the faster of two (fresh prompts each: no prefix-cache hit),
    so one stall in it cannot make the decode look faster (or, on a CPU, leave nothing to subtract from)."""
    _timed_generate(llm, _prompts(batch, prompt_len, vocab, seed=batch + 2000), 2, device)  # warm-up
    t_first = min(_timed_generate(llm, _prompts(batch, prompt_len, vocab, seed=batch + s), 1, device)[0]
                  for s in (0, 3000))
    t_all, n_out = _timed_generate(llm, _prompts(batch, prompt_len, vocab, seed=batch + 1000), out_len, device)
    if t_all <= t_first:
        raise RuntimeError(f"decode time not measurable: {out_len} tokens took {t_all:.4f}s, the first "
                           f"token alone {t_first:.4f}s (use more output tokens)")
    return (n_out - batch) / (t_all - t_first)


def measure_copy_bandwidth(device: str) -> float | None:
    if device != "cuda":
        return None
    x = torch.empty(2 * 2**30 // 2, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    torch.cuda.synchronize()
    bw = 10 * 2 * x.numel() * 2 / (time.perf_counter() - t0)
    del x, y
    torch.cuda.empty_cache()
    return bw


def decode_step_bytes(cfg: ModelConfig, context: int = 192) -> int:
    """Bytes one batch-1 decode step must read (bf16): attention + norms + router + top-k experts of every
    layer, one embedding row, the LM head, and the KV of `context` tokens."""
    h, d = cfg.hidden_size, cfg.head_dim
    attn = h * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d + cfg.num_attention_heads * d * h
    experts = cfg.num_experts_per_tok * 3 * h * cfg.moe_intermediate_size
    router = cfg.num_experts * h
    per_layer = attn + experts + router + 2 * h + 2 * d
    kv = context * 2 * cfg.num_key_value_heads * d * len(cfg.attention_layer_ids)
    return 2 * (cfg.num_hidden_layers * per_layer + h + cfg.vocab_size * h + h + kv)


def transformers_decode(cfg: ModelConfig, batches: list[int], out_len: int) -> dict[str, float]:
    import transformers

    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    results: dict[str, float] = {}
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cuda").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.uniform_(-0.03, 0.03)
        for name, mod in model.named_modules():
            if "norm" in name and hasattr(mod, "weight"):
                mod.weight.fill_(1.0)
    impl = "default"
    for candidate in ("grouped_mm", "batched_mm"):
        try:
            model.set_experts_implementation(candidate)
            impl = candidate
            break
        except Exception:  # not available in this version / on this device
            continue
    results["transformers_experts_implementation"] = impl
    for bs in batches:
        ids = torch.randint(0, cfg.vocab_size, (bs, 128), device="cuda")
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=out_len, min_new_tokens=out_len, **kw)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
        results[f"transformers_decode_bs{bs}_tok_s"] = round(bs * (out_len - 1) / ((t2 - t1) - (t1 - t0)), 2)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return results


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--preset", default="30b-a3b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compare-transformers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    ap.add_argument("--skip", default="", help="comma-separated scenario names to skip")
    ap.add_argument("--profile", action="store_true",
                    help="also profile batch-1 and batch-16 decode steps by kernel family")
    ap.add_argument("--online-concurrency", type=int, default=16,
                    help="clients of the online scenario (through the server); 0 skips it")
    ap.add_argument("--online-requests", type=int, default=64)
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    ap.add_argument("--report", default=None, metavar="RUN.json",
                    help="measure nothing: print a saved run's table (with --markdown, as Markdown)")
    ap.add_argument("--markdown", action="store_true", help="the table as Markdown")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(ap)
    run(ap.parse_args(argv))


def run(args: argparse.Namespace) -> str:
    """Measure every scenario, write the JSON and print its table; with `--report`, only print the table
    of that saved run (ValueError when it is not one). Returns the JSON's path."""
    if getattr(args, "report", None):
        print(report_file(args.report, args.markdown))
        return args.report
    cfg = ModelConfig.preset(args.preset)
    dev = args.device
    skip = set(filter(None, args.skip.split(",")))
    quick = args.quick
    metrics: dict[str, object] = {}
    errors: dict[str, str] = {}

    def scenario(name: str, fn) -> None:
        if name in skip:
            return
        try:
            t0 = time.perf_counter()
            fn()
            print(f"[bench] {name}: {time.perf_counter() - t0:.1f}s", flush=True)
        except Exception as e:  # record and go on: one failing scenario must not lose the others
            errors[name] = f"{type(e).__name__}: {e}"
            traceback.print_exc()

    metrics["copy_bandwidth_GBps"] = None if (bw := measure_copy_bandwidth(dev)) is None else round(bw / 1e9, 1)
    if args.compare_transformers and dev == "cuda":  # first, while the GPU holds nothing else
        scenario("transformers", lambda: metrics.update(transformers_decode(cfg, [1, 16], 32)))
    max_len = 4096 if quick else 32768 + 64
    model = build_dummy_model(cfg, device=dev, dtype="bfloat16" if dev == "cuda" else "float32")
    llm = LLM(model, device=dev, skip_tokenizer_init=True, max_model_len=max_len, max_num_seqs=64,
              enable_prefix_caching=False, max_num_batched_tokens=8192 if not quick else 2048)
    out_len = 16 if quick else 256
    runner = llm.llm_engine.runner
    engine_info = {"runner": type(runner).__name__,
                   "async_scheduling": llm.llm_engine.config.async_scheduling,
                   "pdl": pdl.use_pdl(torch.device(dev)),
                   "cuda_graph_batch_sizes": sorted(getattr(runner, "graphs", {}) or {}),
                   "kernels": "triton" if (dev == "cuda" and getattr(model, "supports_cuda_graphs", False))
                   else "torch"}

    def bs(n: int):
        return lambda: metrics.__setitem__(f"decode_bs{n}_tok_s", round(decode_tok_s(llm, n, cfg.vocab_size,
                                                                                        out_len, dev), 2))

    scenario("decode_bs1", bs(1))
    if "decode_bs1_tok_s" in metrics and metrics.get("copy_bandwidth_GBps"):
        step_bytes = decode_step_bytes(cfg, 128 + out_len // 2)
        metrics["decode_step_bytes_bs1"] = step_bytes
        metrics["hbm_fraction_bs1"] = round(step_bytes * metrics["decode_bs1_tok_s"]
                                            / (metrics["copy_bandwidth_GBps"] * 1e9), 3)
    if dev == "cuda" and llm.llm_engine.config.async_scheduling and not quick:
        def bs1_sync() -> None:  # what async scheduling brings: the same run with it switched off
            llm.llm_engine.config.async_scheduling = False
            try:
                metrics["decode_bs1_sync_tok_s"] = round(decode_tok_s(llm, 1, cfg.vocab_size, out_len, dev), 2)
            finally:
                llm.llm_engine.config.async_scheduling = True
        scenario("decode_bs1_sync", bs1_sync)
    scenario("decode_bs16", bs(16))
    if not quick:
        def no_pdl() -> None:  # what programmatic dependent launch brings: graphs captured without it
            from qwen3coder.bench.profile import without_pdl

            with without_pdl(llm) as switched:
                if switched:
                    for n in (1, 16):
                        metrics[f"decode_bs{n}_nopdl_tok_s"] = round(
                            decode_tok_s(llm, n, cfg.vocab_size, out_len, dev), 2)
        scenario("decode_nopdl", no_pdl)
    scenario("decode_bs64", bs(64))
    for label, n in (("1k", 1024), ("8k", 8192), ("32k", 32768)):
        if quick and n > 2048:
            continue

        def ttft(n=n, label=label):
            prompt = _prompts(1, n, cfg.vocab_size, seed=n)
            # warm with another prompt of the same length: kernels compiled for new sizes are not timed
            _timed_generate(llm, _prompts(1, n, cfg.vocab_size, seed=n + 1), 1, dev)
            t, _ = _timed_generate(llm, prompt, 1, dev)
            metrics[f"ttft_ms_{label}"] = round(t * 1000, 1)
        scenario(f"ttft_{label}", ttft)

    def offline(n, inp, out, key, total):
        def run():
            if quick:
                n_, inp_, out_ = max(2, n // 8), min(inp, 256), min(out, 16)
            else:
                n_, inp_, out_ = n, inp, out
            # warm-up call of the same shapes (other prompts, 4 output tokens): Triton compiles a
            # kernel once per process for each new specialisation (prefill / mixed steps), which a
            # server pays at start-up; it must not count as throughput
            _timed_generate(llm, _prompts(n_, inp_, cfg.vocab_size, seed=8), min(out_, 4), dev)
            t, n_out = _timed_generate(llm, _prompts(n_, inp_, cfg.vocab_size, seed=7), out_, dev)
            metrics[key] = round(((n_out + n_ * inp_) if total else n_out) / t, 1)
            # the run by phase: the same shapes with one output token (the prefill, which samples the
            # first), and the rest per decode step
            t_prefill, _ = _timed_generate(llm, _prompts(n_, inp_, cfg.vocab_size, seed=9), 1, dev)
            base = key.rsplit("_", 3)[0]  # offline_<n>x<in>x<out>
            metrics[f"{base}_prefill_s"] = round(t_prefill, 3)
            if out_ > 1:
                metrics[f"{base}_decode_step_ms"] = round(max(0.0, t - t_prefill) * 1000 / (out_ - 1), 2)
        return run

    scenario("offline_10x2048x1024", offline(10, 2048, 1024, "offline_10x2048x1024_output_tok_s", False))
    scenario("offline_64x1024x128", offline(64, 1024, 128, "offline_64x1024x128_total_tok_s", True))
    profiles: dict[str, object] = {}
    if args.profile:
        from qwen3coder.bench.profile import profile_decode, profile_prefill, without_pdl

        # kernel attribution without programmatic dependent launch: with it, a kernel's recorded time
        # includes the wait for its predecessor, so per-family times overlap and exceed the step
        with without_pdl(llm) as pdl_off:
            for n in (1, 16):
                scenario(f"profile_bs{n}", lambda n=n: profiles.__setitem__(f"decode_bs{n}", profile_decode(
                    llm, n, cfg.vocab_size, steps=8 if quick else 32, replay_with_pdl=pdl_off)))
            if not quick:  # the decode steps of the offline scenarios (10 x 2048 -> 1024, 64 x 1024 -> 128)
                scenario("profile_bs10_ctx2k", lambda: profiles.__setitem__("decode_bs10_ctx2048", profile_decode(
                    llm, 10, cfg.vocab_size, steps=16, prompt_len=2048, replay_with_pdl=pdl_off)))
                scenario("profile_bs64_ctx1k", lambda: profiles.__setitem__("decode_bs64_ctx1024", profile_decode(
                    llm, 64, cfg.vocab_size, steps=16, prompt_len=1024, replay_with_pdl=pdl_off)))
            n_p, p_len = (2, 128) if quick else (8, 1024)
            scenario("profile_prefill", lambda: profiles.__setitem__(
                f"prefill_{n_p}x{p_len}", profile_prefill(llm, n_p, p_len, cfg.vocab_size)))
        for prof in profiles.values():  # the decode graphs as they run: with PDL where it is on
            prof["pdl_during_profile"] = not pdl_off and engine_info["pdl"]
            if "graph_replay_pdl_ms" in prof:  # the same step replayed without and with PDL
                prof["graph_replay_nopdl_ms"] = prof.pop("graph_replay_ms")
                prof["graph_replay_ms"] = prof.pop("graph_replay_pdl_ms")
    if args.online_concurrency > 0:  # last: serving the engine shuts it down afterwards
        from qwen3coder.bench.online import online_throughput

        n_req = max(2, args.online_requests // 8) if quick else args.online_requests
        scenario("online", lambda: metrics.update(online_throughput(
            llm, cfg.vocab_size, n_req, 128 if quick else 1024, 16 if quick else 128, args.online_concurrency)))
    params_total, params_active = cfg.num_params()
    path = write_result(f"bench_decode_{args.preset}", metrics,
                        extra={"preset": args.preset, "dtype": "bfloat16" if dev == "cuda" else "float32",
                               "engine": engine_info, "params_total": params_total,
                               "params_active": params_active, "errors": errors, "quick": quick,
                               "profile": profiles or None},
                        out_dir=args.out_dir)
    print("\n" + report_file(path, getattr(args, "markdown", False)), flush=True)
    return path


if __name__ == "__main__":
    main()
