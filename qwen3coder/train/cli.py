"""`qwen3coder train`: run the training pipeline of the bundled model.

`register(subparsers)` adds the subcommand to the main CLI; `python -m qwen3coder.train` runs the
same parser standalone (how scripts/train_bundled.sh calls it on the GPU machine).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def _parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--set expects SECTION.FIELD=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from qwen3coder.train.profiles import PROFILES

    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu-smoke",
                        help="cpu-smoke: whole pipeline in ~1 min on 2 CPU cores; gpu: the bundled model on one H100")
    parser.add_argument("--out", required=True, help="output directory (model in OUT/model, reports in OUT/reports)")
    parser.add_argument("--resume", action="store_true", help="continue a run in OUT: skip finished stages, "
                        "resume training from the last checkpoint")
    parser.add_argument("--no-eval", action="store_true", help="do not run qwen3coder.eval after export")
    parser.add_argument("--set", dest="overrides", action="append", default=[], type=_parse_override,
                        metavar="SECTION.FIELD=VALUE",
                        help="override a profile field, e.g. --set pretrain.time_budget_s=60 (repeatable)")


def run(args: argparse.Namespace) -> int:
    from qwen3coder.train.pipeline import run_pipeline
    from qwen3coder.train.profiles import get_profile

    try:
        profile = get_profile(args.profile, **dict(args.overrides))
        summary = run_pipeline(profile, args.out, resume=args.resume, run_eval=False if args.no_eval else None)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as e:
        print(f"qwen3coder train: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({k: summary.get(k) for k in ("params_total", "pretrain_tokens", "pretrain_val_loss",
                                                  "sft_val_loss", "seconds")}, indent=1))
    return 0


def register(subparsers: Any) -> argparse.ArgumentParser:
    """Add `train` to the main CLI's subparsers; the handler is set as `func`."""
    parser = subparsers.add_parser("train", help="train the bundled default model (data → tokenizer → "
                                   "pretrain → SFT → export)", description=__doc__)
    add_arguments(parser)
    parser.set_defaults(func=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m qwen3coder.train", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
