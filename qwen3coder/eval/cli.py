"""``qwen3coder eval``: run every eval on a checkpoint and write eval.json (wired in qwen3coder/cli.py
through ``register(subparsers)``)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["register", "cmd_eval"]


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``eval`` subcommand to an ``argparse`` subparsers object; returns its parser."""
    from qwen3coder.eval import PROFILES

    p = subparsers.add_parser(
        "eval", help="HumanEval pass@k (sandboxed), held-out loss, FIM exact match, tool-call well-formedness",
        description="Evaluate a checkpoint and write eval.json (see docs/EVAL.md).")
    p.add_argument("--model", required=True, help="checkpoint directory")
    p.add_argument("--profile", default="cpu-smoke", choices=sorted(PROFILES),
                   help="sizes: cpu-smoke (seconds, tiny subsets) or gpu (all 164 problems, n=10)")
    p.add_argument("--out", default="eval.json", help="output JSON (default: eval.json); per-problem HumanEval "
                   "records go beside it as <stem>.humaneval.jsonl")
    p.add_argument("--heldout", nargs="+", default=None, metavar="FILE",
                   help="held-out source files for loss and FIM (default: HumanEval canonical solutions)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 (default: bf16 on cuda, fp32 on cpu)")
    p.set_defaults(func=cmd_eval)
    return p


def cmd_eval(args: argparse.Namespace) -> int:
    from qwen3coder.eval import run_all

    try:
        result = run_all(args.model, args.out, args.profile, heldout_texts=args.heldout, device=args.device,
                         dtype=args.dtype)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        from qwen3coder.cli import CLIError

        raise CLIError(str(exc)) from exc
    keys = ("humaneval_pass@1", "humaneval_pass@10", "heldout_loss", "fim_exact_match", "tool_call_wellformed_rate",
            "params_total", "params_active", "train_tokens", "device", "errors")
    print(json.dumps({k: result.get(k) for k in keys}, indent=2))
    print(f"wrote {args.out} ({result['timing_s']['total']:.1f} s)", file=sys.stderr)
    return 1 if result["errors"] else 0
