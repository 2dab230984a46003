"""Command line: `qwen3coder generate` (offline generation through the engine).

    qwen3coder generate --model PATH --prompt "def fib(n):" --max-tokens 64
    qwen3coder generate --preset tiny --load-format dummy --prompt-token-ids 1,2,3

`--model` is a Hugging Face checkpoint directory (default: the bundled model, once present);
`--preset NAME --load-format dummy` runs random weights at a named shape (no tokenizer: token ids).
User errors (a wrong path, a checkpoint that will not load, bad values) print one line naming the
problem and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Sequence


class CLIError(Exception):
    """A user-facing error: printed as `qwen3coder: error: ...`, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint directory (default: the bundled model)")
    p.add_argument("--preset", help="named model shape (with --load-format dummy): tiny, tiny-next, "
                                    "30b-a3b, 480b-a35b, next-80b-a3b")
    p.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                   help="dummy: random weights at the model's real shapes (benchmarks)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-tokenizer-init", action="store_true",
                   help="no tokenizer: prompts and outputs are token ids")


def _build_llm(args: argparse.Namespace) -> Any:
    import torch

    from qwen3coder.config import ConfigError, ModelConfig
    from qwen3coder.engine import LLM
    from qwen3coder.loader import CheckpointError, build_dummy_model

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        if args.load_format == "dummy":
            if args.preset:
                config = ModelConfig.preset(args.preset)
            elif args.model:
                config = ModelConfig.from_hf(args.model)
            else:
                raise CLIError("--load-format dummy needs --preset NAME or --model PATH (for its config.json)")
            model = build_dummy_model(config, device=device,
                                      dtype=dtype or ("bfloat16" if device == "cuda" else "float32"),
                                      seed=args.seed)
            return LLM(model, device=device, skip_tokenizer_init=True, max_model_len=args.max_model_len,
                       seed=args.seed)
        if args.preset:
            raise CLIError("--preset needs --load-format dummy (a preset has shapes, not weights)")
        return LLM(args.model, device=device, dtype=dtype, max_model_len=args.max_model_len, seed=args.seed,
                   skip_tokenizer_init=args.skip_tokenizer_init)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        raise CLIError(str(e)) from e


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError as e:
        raise CLIError(f"--prompt-token-ids must be comma-separated integers, got {text!r}") from e


def cmd_generate(args: argparse.Namespace) -> int:
    from qwen3coder.engine import SamplingParams

    prompts: list[Any] = list(args.prompt or [])
    prompts += [{"prompt_token_ids": _parse_ids(t)} for t in (args.prompt_token_ids or [])]
    if not prompts:
        raise CLIError("give at least one --prompt TEXT or --prompt-token-ids 1,2,3")
    llm = _build_llm(args)
    base = llm.get_default_sampling_params()
    overrides = {k: v for k, v in dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                      max_tokens=args.max_tokens, seed=args.seed).items() if v is not None}
    try:
        params = SamplingParams(**{**_params_dict(base), **overrides})
        outputs = llm.generate(prompts, params, use_tqdm=False)
    except ValueError as e:
        raise CLIError(str(e)) from e
    for out in outputs:
        for comp in out.outputs:
            if args.json:
                print(json.dumps({"prompt": out.prompt, "prompt_token_ids": out.prompt_token_ids,
                                  "text": comp.text, "token_ids": comp.token_ids,
                                  "finish_reason": comp.finish_reason}, ensure_ascii=False))
            else:
                shown = out.prompt if out.prompt else f"<token ids {out.prompt_token_ids}>"
                body = comp.text if comp.text else f"<token ids {comp.token_ids}>"
                print(f"--- prompt: {shown}\n{body}\n--- finish_reason: {comp.finish_reason}")
    return 0


def _params_dict(params: Any) -> dict[str, Any]:
    import dataclasses

    return {f.name: getattr(params, f.name) for f in dataclasses.fields(params) if f.init}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwen3coder", description="Qwen3-Coder models, engine and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="offline generation for one or more prompts")
    _add_model_args(g)
    g.add_argument("--prompt", action="append", help="a text prompt (repeatable)")
    g.add_argument("--prompt-token-ids", action="append", help="a prompt as comma-separated token ids")
    g.add_argument("--max-tokens", type=int, default=None)
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--json", action="store_true", help="one JSON object per output")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as e:
        print(f"qwen3coder: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
