"""Command line: `generate` (offline), `serve` (the OpenAI-compatible server), `chat`, `complete`.

    qwen3coder generate --model PATH --prompt "def fib(n):" --max-tokens 64
    qwen3coder generate --preset tiny --load-format dummy --prompt-token-ids 1,2,3
    qwen3coder serve --model PATH --port 8000 [--api-key KEY] [--served-model-name NAME]
    qwen3coder chat [--model PATH | --url http://127.0.0.1:8000]
    qwen3coder complete --model PATH --prefix "def add(a, b):\n" --suffix "\nprint(add(1, 2))"
    qwen3coder complete --url URL --file src/x.py --line 12

`chat` and `complete` talk HTTP to `--url`, or start the same server in-process on a free loopback
port (docs/SERVING.md).

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

    from qwen3coder.config import ConfigError
    from qwen3coder.engine import LLM
    from qwen3coder.loader import CheckpointError, build_dummy_model_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else args.dtype
    try:
        if args.load_format == "dummy":
            model = build_dummy_model_for(args.preset, args.model, device, dtype, args.seed)
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


# ---------------------------------------------------------------------------------------- serving
def _launch_error(fn: Any) -> Any:
    """Run `fn`, turning the server's start-up errors into CLIError."""
    from qwen3coder.server.launcher import LaunchError

    try:
        return fn()
    except LaunchError as e:
        raise CLIError(str(e)) from e


def _check_model_path(args: argparse.Namespace) -> None:
    """Fail fast (before torch is imported) on a missing checkpoint or default model."""
    import os

    if args.model is None and not args.preset:
        _check_default_model()
    elif args.model is not None and not os.path.isdir(args.model):
        raise CLIError(f"model: checkpoint directory {args.model!r} does not exist")


def cmd_serve(args: argparse.Namespace) -> int:
    from qwen3coder.server.launcher import serve

    _check_model_path(args)
    return _launch_error(lambda: serve(args))


def _check_default_model() -> None:
    import qwen3coder

    try:
        qwen3coder.default_model_path()
    except FileNotFoundError as e:
        raise CLIError(f"no --model given and {e}") from e


def _with_server(args: argparse.Namespace, body: Any) -> int:
    """Run `body(client)` against --url, or against an in-process server on a free loopback port."""
    from qwen3coder.server.client import APIClient, ClientError
    from qwen3coder.server.launcher import LocalServer

    try:
        if args.url:
            return body(APIClient(args.url, args.api_key))
        _check_model_path(args)
        print("loading the model …", file=sys.stderr)
        local = LocalServer(args)
        _launch_error(local.__enter__)
        try:
            return body(APIClient(local.url))
        finally:
            local.__exit__(None, None, None)
    except ClientError as e:
        raise CLIError(str(e)) from e


def _read_message(prompt: str = ">>> ") -> str | None:
    """One user message. A line ending in a backslash continues on the next line; a line that is just
    \"\"\" starts a block that runs until the next \"\"\" line. None at end of input."""
    lines: list[str] = []
    block = False
    while True:
        try:
            line = input(prompt if not lines and not block else "... ")
        except EOFError:
            return "\n".join(lines) if lines else None
        if line.strip() == '"""':
            if block:
                return "\n".join(lines)
            block = True
            continue
        if block:
            lines.append(line)
        elif line.endswith("\\"):
            lines.append(line[:-1])
        else:
            lines.append(line)
            return "\n".join(lines)


def cmd_chat(args: argparse.Namespace) -> int:
    tools = None
    if args.tools:
        try:
            with open(args.tools, encoding="utf-8") as f:
                tools = json.load(f)
        except (OSError, ValueError) as e:
            raise CLIError(f"--tools {args.tools}: {e}") from e

    def run(client: Any) -> int:
        client.models()  # fail now, not after the first message, if the server is not there
        system = [{"role": "system", "content": args.system}] if args.system else []
        history: list[dict[str, Any]] = list(system)
        print("qwen3coder chat — /reset clears the conversation, /exit quits; end a line with \\ to continue it, "
              'or wrap a block in """ lines', file=sys.stderr)
        while True:
            text = _read_message()
            if text is None or text.strip() in ("/exit", "/quit"):
                return 0
            if not text.strip():
                continue
            if text.strip() == "/reset":
                history = list(system)
                print("(conversation cleared)", file=sys.stderr)
                continue
            history.append({"role": "user", "content": text})
            params: dict[str, Any] = {"max_tokens": args.max_tokens}
            if args.temperature is not None:
                params["temperature"] = args.temperature
            if tools:
                params["tools"] = tools
            content, calls, finish, used = [], {}, None, None
            for ev in client.stream_chat(history, **params):
                if ev.kind == "content":
                    content.append(ev.text)
                    print(ev.text, end="", flush=True)
                elif ev.kind == "tool_call":
                    calls[ev.index] = {"id": ev.data["id"], "type": "function",
                                       "function": {"name": ev.text, "arguments": ""}}
                elif ev.kind == "tool_args":
                    calls[ev.index]["function"]["arguments"] += ev.text
                elif ev.kind == "finish":
                    finish = ev.text
                elif ev.kind == "usage":
                    used = ev.data
            print()
            for call in calls.values():
                print(f"[tool call] {call['function']['name']}({call['function']['arguments']})")
            message: dict[str, Any] = {"role": "assistant", "content": "".join(content)}
            if calls:
                message["tool_calls"] = list(calls.values())
            history.append(message)
            if used:
                print(f"[{used['prompt_tokens']} prompt + {used['completion_tokens']} completion tokens, "
                      f"finish: {finish}]", file=sys.stderr)

    return _with_server(args, run)


def cmd_complete(args: argparse.Namespace) -> int:
    if args.file:
        if args.prefix is not None or args.suffix is not None:
            raise CLIError("give either --file/--line or --prefix/--suffix, not both")
        try:
            with open(args.file, encoding="utf-8") as f:
                lines = f.read().splitlines(keepends=True)
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--file {args.file}: {e.strerror if isinstance(e, OSError) else e}") from e
        if args.line is None or not 1 <= args.line <= len(lines) + 1:
            raise CLIError(f"--line must be between 1 and {len(lines) + 1} for {args.file}")
        prefix, suffix = "".join(lines[:args.line - 1]), "".join(lines[args.line - 1:])
    elif args.prefix is not None:
        prefix, suffix = args.prefix, args.suffix
    else:
        raise CLIError("give --prefix TEXT [--suffix TEXT] or --file PATH --line N")

    def run(client: Any) -> int:
        params: dict[str, Any] = {"max_tokens": args.max_tokens, "temperature": args.temperature}
        out = client.complete(prefix, suffix, **params)
        sys.stdout.write(out["choices"][0]["text"])
        sys.stdout.write("\n" if not out["choices"][0]["text"].endswith("\n") else "")
        return 0

    return _with_server(args, run)


def _add_serving_commands(sub: Any) -> None:
    from qwen3coder.server.launcher import add_engine_args, add_server_args

    s = sub.add_parser("serve", help="the OpenAI-compatible server (and the web chat at /)")
    _add_model_args(s)
    add_engine_args(s)
    add_server_args(s)
    s.add_argument("--warmup", choices=["auto", "on", "off"], default="auto",
                   help="before serving, run dummy requests so that kernels compile for prefill and mixed "
                        "steps (auto: on a GPU)")
    s.set_defaults(func=cmd_serve)
    for name, helptext, func in (("chat", "chat in the terminal", cmd_chat),
                                 ("complete", "plain or fill-in-the-middle completion to stdout", cmd_complete)):
        c = sub.add_parser(name, help=helptext)
        _add_model_args(c)
        add_engine_args(c)
        c.add_argument("--url", default=None, help="a running server (default: load the model in-process)")
        c.add_argument("--api-key", default=None)
        c.add_argument("--served-model-name", nargs="+", default=None, help=argparse.SUPPRESS)
        c.add_argument("--max-tokens", type=int, default=512 if name == "chat" else 128)
        c.add_argument("--temperature", type=float, default=None if name == "chat" else 0.0)
        if name == "chat":
            c.add_argument("--system", default=None, help="a system message")
            c.add_argument("--tools", default=None, help="a JSON file with a list of OpenAI tools to offer")
        else:
            c.add_argument("--prefix", default=None, help="the code before the cursor")
            c.add_argument("--suffix", default=None, help="the code after the cursor (fill-in-the-middle)")
            c.add_argument("--file", default=None, help="complete inside this file …")
            c.add_argument("--line", type=int, default=None, help="… at the start of this line (1-based)")
        c.set_defaults(func=func)


def cmd_bench(args: argparse.Namespace) -> int:
    from qwen3coder.bench.decode import run
    from qwen3coder.config import ConfigError

    try:
        path = run(args)
    except ConfigError as e:
        raise CLIError(str(e)) from e
    except ValueError as e:
        if not args.report:
            raise
        raise CLIError(str(e)) from e  # --report of a file that is not a benchmark result
    if not args.report:
        print(f"results: {path}", file=sys.stderr)
    return 0


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
    _add_serving_commands(sub)
    from qwen3coder.eval.cli import register as register_eval
    from qwen3coder.train.cli import register as register_train

    b = sub.add_parser("bench", help="engine speed at a preset's real shapes (decode, TTFT, offline, "
                                     "transformers comparison, --profile by kernel family)")
    from qwen3coder.bench.decode import add_arguments as add_bench_arguments

    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    register_eval(sub)
    register_train(sub)
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
