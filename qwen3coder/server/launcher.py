"""Starting the server: the engine from CLI arguments, the listening socket, uvicorn.

The port is bound *before* the model loads, so "port in use" is reported at once, and the bound
socket is handed to uvicorn (no window in which another process can take it). `serve` accepts a
ready `AsyncLLMEngine`, so tests and embedders can serve any model through the same path.
"""

from __future__ import annotations

import argparse
import errno
import logging
import socket
import threading
from typing import Any

logger = logging.getLogger("qwen3coder.server")


class LaunchError(Exception):
    """A user-facing start-up problem (wrong path, port in use, checkpoint that will not load)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind and listen on host:port, or raise LaunchError saying why not."""
    if not 0 <= port <= 65535:
        raise LaunchError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise LaunchError(f"--host {host!r} cannot be resolved: {e.strerror}") from e
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise LaunchError(f"port {port} on {host} is already in use; stop the other server or pick "
                              f"another port with --port") from e
        if e.errno == errno.EACCES:
            raise LaunchError(f"no permission to listen on {host}:{port} (ports below 1024 need root)") from e
        raise LaunchError(f"cannot listen on {host}:{port}: {e.strerror}") from e
    sock.set_inheritable(True)
    return sock


def build_engine(args: argparse.Namespace) -> Any:
    """`AsyncLLMEngine` from the serve/chat/complete arguments; LaunchError for user mistakes."""
    import torch

    from qwen3coder.config import ConfigError
    from qwen3coder.engine import AsyncLLMEngine, LLMEngine
    from qwen3coder.loader import CheckpointError, build_dummy_model_for

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = None if args.dtype == "auto" else args.dtype
    kwargs = dict(device=device, max_model_len=args.max_model_len, seed=args.seed,
                  max_num_seqs=getattr(args, "max_num_seqs", 256),
                  num_kv_blocks=getattr(args, "num_kv_blocks", None),
                  max_waiting_requests=getattr(args, "max_queue", None))
    if getattr(args, "max_num_batched_tokens", None):
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    if getattr(args, "enforce_eager", False):
        kwargs["enforce_eager"] = True
    if getattr(args, "max_prefill_graph_tokens", None) is not None:
        kwargs["max_prefill_graph_tokens"] = args.max_prefill_graph_tokens
    try:
        tokenizer = None
        if getattr(args, "tokenizer", None):
            from qwen3coder.chat.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(args.tokenizer)
        if args.load_format == "dummy":
            model = build_dummy_model_for(args.preset, args.model, device, dtype, args.seed)
            engine = LLMEngine.from_pretrained(model, tokenizer=tokenizer, skip_tokenizer_init=tokenizer is None,
                                               **kwargs)
        else:
            if args.preset:
                raise LaunchError("--preset needs --load-format dummy (a preset has shapes, not weights)")
            engine = LLMEngine.from_pretrained(args.model, tokenizer=tokenizer, dtype=dtype,
                                               skip_tokenizer_init=args.skip_tokenizer_init, **kwargs)
    except LaunchError:
        raise
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        raise LaunchError(str(e)) from e
    except Exception as e:  # noqa: BLE001 - any other loader failure is a checkpoint that will not load
        where = args.model or "the default model"
        raise LaunchError(f"the checkpoint at {where} will not load: {type(e).__name__}: {e}") from e
    warmup = getattr(args, "warmup", "off")
    if warmup == "on" or (warmup == "auto" and engine.config.device.type == "cuda"):
        logger.info("warm-up: compiling kernels for prefill and mixed steps ...")
        logger.info("warm-up done in %.1f s", engine.warmup())
    return AsyncLLMEngine(engine)


def resolve_template(args: argparse.Namespace, engine: Any) -> str | None:
    from qwen3coder.chat.template import ChatTemplateError, load_chat_template

    if getattr(args, "chat_template", None):
        try:
            return load_chat_template(args.chat_template)
        except (ChatTemplateError, OSError) as e:
            raise LaunchError(f"--chat-template: {e}") from e
    tok = engine.tokenizer
    return getattr(tok, "chat_template", None) if tok is not None else None


def make_state(args: argparse.Namespace, engine: Any) -> Any:
    from qwen3coder.server.state import ServerState

    names = list(args.served_model_name or [])
    if not names:
        names = [args.model or (f"{args.preset}-dummy" if args.preset else "qwen3coder")]
    template = resolve_template(args, engine)
    if template is None and engine.tokenizer is not None:
        logger.warning("no chat template: /v1/chat/completions will answer 400 (pass --chat-template)")
    return ServerState(engine=engine, served_model_names=names, chat_template=template, api_key=args.api_key,
                       max_model_len=engine.engine.config.scheduler.max_model_len)


def _uvicorn_server(args: argparse.Namespace, engine: Any, quiet: bool = False) -> Any:
    import uvicorn

    from qwen3coder.server.app import build_app

    app = build_app(make_state(args, engine))
    config = uvicorn.Config(app, log_level="warning" if quiet else getattr(args, "uvicorn_log_level", "info"),
                            access_log=not (quiet or getattr(args, "disable_access_log", False)),
                            timeout_keep_alive=30, timeout_graceful_shutdown=5)
    return uvicorn.Server(config)


def serve(args: argparse.Namespace, engine: Any = None, sock: socket.socket | None = None) -> int:
    """Bind, build the engine (unless given), run uvicorn until interrupted."""
    if sock is None:
        sock = bind_socket(args.host, args.port)
    try:
        if engine is None:
            engine = build_engine(args)
        server = _uvicorn_server(args, engine)
        host, port = sock.getsockname()[:2]
        logger.warning("serving %s on http://%s:%d (web chat at /)", server.config.app.state.server_state.model_name, host, port)
        server.run(sockets=[sock])
    finally:
        sock.close()
        if engine is not None:
            engine.shutdown(timeout=5)
    return 0


class LocalServer:
    """The server in a background thread on a free loopback port (in-process `chat` / `complete`)."""

    def __init__(self, args: argparse.Namespace, engine: Any = None):
        self.args = args
        self.engine = engine
        self.server: Any = None
        self.thread: threading.Thread | None = None
        self.url = ""

    def __enter__(self) -> "LocalServer":
        import time

        sock = bind_socket("127.0.0.1", 0)
        if self.engine is None:
            try:
                self.engine = build_engine(self.args)
            except BaseException:
                sock.close()
                raise
        self.args.api_key = None
        self.server = _uvicorn_server(self.args, self.engine, quiet=True)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True,
                                       name="qwen3coder-local-server")
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise LaunchError("the in-process server did not start")
            time.sleep(0.02)
        self.url = "http://127.0.0.1:%d" % sock.getsockname()[1]
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.server is not None:
            self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(10)
        if self.engine is not None:
            self.engine.shutdown(timeout=5)


def add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on the API routes")
    p.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in 'model' (default: the --model path)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"])
    p.add_argument("--disable-access-log", action="store_true")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the checkpoint's)")
    p.add_argument("--chat-template", default=None, help="chat template file (or Jinja text) to use instead "
                                                         "of the tokenizer's")
    p.add_argument("--max-num-seqs", type=int, default=256, help="sequences decoded together")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="token budget per engine step")
    p.add_argument("--max-queue", type=int, default=None,
                   help="most requests waiting for a seat; more are answered 503 (default: unbounded)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="KV-cache blocks (default: sized automatically)")
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs (every step eager)")
    p.add_argument("--max-prefill-graph-tokens", type=int, default=None,
                   help="CUDA: prefill and mixed steps of up to this many tokens replay CUDA graphs "
                        "(default: 2048 or the token budget; 0: they run eagerly)")
