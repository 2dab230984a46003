"""Where decode and prefill time goes: torch.profiler over engine steps, grouped by kernel family.

`profile_decode(llm, batch, vocab, steps)` runs `batch` 128-token prompts to the decode phase, records
`steps` further engine steps with the profiler; `profile_prefill(llm, num_prompts, prompt_len, vocab)`
records the steps that prefill `num_prompts` prompts (up to their first token). Both sum device time
(CUDA kernels on a GPU, CPU ops otherwise) per family: attention (with the fused QK-norm/RoPE/KV-store
prologue), fused MoE, MoE routing (with the fused post-attention norm + router), dense GEMMs, norms,
sampling, memory copies, other. It also reports the wall time per step, so the gap between kernel time
and wall time (host overhead, synchronisation) is visible. With programmatic dependent launch a kernel starts before its
predecessor ends and its recorded time includes that wait, so `qwen3coder bench --profile` records
with PDL off (`without_pdl`) and reports the decode graph's replay time both ways.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator
from typing import Any

import torch

from qwen3coder.engine import LLM, SamplingParams

# first match wins; names of Triton kernels, cuBLAS/CUTLASS GEMMs and aten ops
FAMILIES: list[tuple[str, re.Pattern[str]]] = [
    ("attention", re.compile(r"paged_decode|paged_prefill|qk_norm_rope|flash|fmha|attention|sdpa|efficient_attention",
                             re.I)),
    ("fused_moe", re.compile(r"grouped_gemm|fused_moe|gate_up_swiglu|down_proj_kernel|moe_\w*gemv|gate_up_gemv"
                             r"|down_gemv", re.I)),  # gate_up_gemv, down_gemv: names in c77eb65 results
    ("moe_routing", re.compile(r"route_align|norm_router|topk|sort|scatter|searchsorted|bincount|cumsum"
                               r"|softmax|radix", re.I)),
    ("norm", re.compile(r"rmsnorm|rsqrt|norm", re.I)),
    ("gemm", re.compile(r"gemm|gemv|matmul|mm|nvjet|cutlass|sm90|xmma|addmm|linear", re.I)),
    ("sampling", re.compile(r"argmax|multinomial|exponential|log_softmax|max_|sampl", re.I)),
    ("memcpy", re.compile(r"memcpy|memset|copy|index|gather|cat", re.I)),
]


def family_of(name: str) -> str:
    for family, pattern in FAMILIES:
        if pattern.search(name):
            return family
    return "other"


def profile_decode(llm: LLM, batch: int, vocab: int, steps: int = 32, prompt_len: int = 128,
                   replay_with_pdl: bool = False) -> dict[str, Any]:
    """The figures of `steps` recorded decode steps, and `graph_replay_ms`: the decode graph alone (its
    kernels plus the gaps between them) replayed on the last recorded step, while the run's requests
    still hold their KV blocks. `replay_with_pdl` (the profile runs with PDL off, `without_pdl`): the
    same step is also replayed through graphs recaptured with PDL (`graph_replay_pdl_ms`), then the
    no-PDL graphs are recaptured for the rest of the profile. Replaying a saved step later, after other
    requests reused its blocks, was not representative: a batch-16 step replayed in 5.6 ms instead of
    its ~10.7 (H200), most likely because its rows then attend over other sequences' keys and route to
    fewer distinct experts."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=steps + 64, ignore_eos=True)
    g = torch.Generator().manual_seed(batch)
    for i in range(batch):
        engine.add_request(f"profile-{batch}-{prompt_len}-{i}",
                           {"prompt_token_ids": torch.randint(0, vocab, (prompt_len,), generator=g).tolist()}, params)
    decoding: set[str] = set()  # prefill (chunked: batch x prompt_len may take many steps) outside the recording
    while len(decoding) < batch and engine.has_unfinished_requests():
        decoding.update(o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids)
    for _ in range(4):  # and a few decode steps
        engine.step()
    result = _record(llm, lambda: [engine.step() for _ in range(steps)], steps)
    replay = graph_replay_ms(llm, batch)  # the last recorded step: the static inputs still hold it
    if replay is not None:
        result["graph_replay_ms"] = replay
        if replay_with_pdl:
            result["graph_replay_pdl_ms"] = _replay_with_pdl(llm, batch)
    while engine.has_unfinished_requests():
        engine.step()
    return {"batch": batch, "prompt_len": prompt_len, **result}


def _replay_with_pdl(llm: LLM, batch: int) -> float | None:
    """`graph_replay_ms` of the step in the static inputs through graphs recaptured with PDL (recapture
    keeps the static inputs); the graphs are captured without PDL again afterwards. Capturing runs the
    graphs' warm-up steps, which write KV rows at the slots the static inputs hold: the profile's
    remaining steps are only drained, never measured."""
    from qwen3coder.kernels import pdl

    runner = llm.llm_engine.runner
    pdl.set_pdl_enabled(True)
    try:
        runner.recapture_graphs()
        return graph_replay_ms(llm, batch)
    finally:
        pdl.set_pdl_enabled(False)
        runner.recapture_graphs()


@contextlib.contextmanager
def without_pdl(llm: LLM) -> Iterator[bool]:
    """Run the body with programmatic dependent launch off (decode graphs recaptured without it, and
    again with it afterwards); yields whether it switched anything (PDL on, a graph runner)."""
    from qwen3coder.kernels import pdl

    runner = llm.llm_engine.runner
    if not (pdl.use_pdl(torch.device(llm.llm_engine.config.device)) and getattr(runner, "graphs", None)
            and hasattr(runner, "recapture_graphs")):
        yield False
        return
    pdl.set_pdl_enabled(False)
    runner.recapture_graphs()
    try:
        yield True
    finally:
        pdl.set_pdl_enabled(True)
        runner.recapture_graphs()


def graph_replay_ms(llm: LLM, batch: int, iters: int = 50) -> float | None:
    """ms per replay of the CUDA graph that serves decode batches of `batch` (None: no graphs), on the
    step its static inputs hold."""
    runner = llm.llm_engine.runner
    graphs = getattr(runner, "graphs", None)
    if not graphs:
        return None
    bucket = next((b for b in sorted(graphs) if b >= batch), None)
    if bucket is None:
        return None
    from qwen3coder.bench.timing import replay_ms

    return round(replay_ms(graphs[bucket], iters), 3)


def profile_prefill(llm: LLM, num_prompts: int, prompt_len: int, vocab: int) -> dict[str, Any]:
    """Per-step figures of the engine steps that prefill `num_prompts` random prompts of `prompt_len`
    tokens (one output token each, so no decode step is recorded)."""
    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    g = torch.Generator().manual_seed(prompt_len)

    def add(tag: str) -> None:
        for i in range(num_prompts):
            engine.add_request(f"profile-prefill-{tag}-{i}", {"prompt_token_ids": torch.randint(
                0, vocab, (prompt_len,), generator=g).tolist()}, params)

    add("warm")  # the same shapes once outside the recording (Triton compiles for new sizes)
    while engine.has_unfinished_requests():
        engine.step()
    add("rec")
    steps = [0]

    def run() -> None:
        while engine.has_unfinished_requests():
            engine.step()
            steps[0] += 1

    result = _record(llm, run, None, steps)
    return {"num_prompts": num_prompts, "prompt_len": prompt_len,
            "prefill_tok_s": round(num_prompts * prompt_len / (result["wall_ms_per_step"] * result["steps"] / 1000)),
            **result}


def _record(llm: LLM, body: Any, steps: int | None, counter: list[int] | None = None) -> dict[str, Any]:
    """Run `body()` under the profiler; figures per engine step (`steps`, or `counter[0]` after the run)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and next(iter(llm.llm_engine.runner.model.parameters())).is_cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        body()
        if cuda:
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    steps = steps if steps is not None else max(1, counter[0])
    per_family: dict[str, float] = {}
    per_kernel: list[tuple[float, int, str]] = []
    for evt in prof.key_averages():
        if cuda:
            # kernels and copies only: an aten op's device time is its kernels' time, counted there
            if evt.device_type != torch.autograd.DeviceType.CUDA or not evt.device_time_total:
                continue
            us = evt.device_time_total
        else:
            us = evt.self_cpu_time_total  # self time: nested ops are not counted twice
        per_family[family_of(evt.key)] = per_family.get(family_of(evt.key), 0.0) + us
        per_kernel.append((us, evt.count, evt.key))
    total = sum(per_family.values()) or 1.0
    return {
        "steps": steps, "wall_ms_per_step": round(wall * 1000 / steps, 3),
        "kernel_ms_per_step": round(total / 1000 / steps, 3),
        "families_ms_per_step": {k: round(v / 1000 / steps, 3) for k, v in sorted(per_family.items(),
                                                                                  key=lambda kv: -kv[1])},
        "families_share": {k: round(v / total, 3) for k, v in sorted(per_family.items(), key=lambda kv: -kv[1])},
        "clock": "device (CUDA kernels)" if cuda else "CPU (self time of ops)",
        # the 25 costliest kernels (or ops): name, ms and calls per step
        "top_kernels": [{"name": name[:120], "ms_per_step": round(us / 1000 / steps, 4),
                         "calls_per_step": round(count / steps, 2)}
                        for us, count, name in sorted(per_kernel, reverse=True)[:25]],
    }
