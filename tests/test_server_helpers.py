"""Shared helpers for the serving tests: a tiny random checkpoint with the real Qwen3-Coder tokenizer
and chat template, a *scripted* model, and real server processes on loopback.

* `tiny_checkpoint()` — a random qwen3_moe checkpoint (hidden 64, vocab 151936, tied embeddings)
  plus the reference tokenizer and the official chat template; built once per test process.
* `ScriptedModel` — a stand-in for the weights: it stores each sequence's token ids in its paged
  "KV cache" (one float per token) and returns logits that force the next token of a scripted reply.
  The reply is chosen from the conversation (`RULES`), so the real engine, server, tool parser and
  HTTP stack run end to end with deterministic model output. `python -m tests.test_server_helpers
  serve …` serves it through `qwen3coder.server.launcher.serve`, the same path as `qwen3coder serve`.
* `get_server(kind)` — a server subprocess on a free port (`random` = `python -m qwen3coder.cli serve`
  on the random checkpoint, `scripted` = the scripted model), started once per test process and
  stopped at exit; `ServerProcess` for tests that need their own (api key, small queue).
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPTED_NAME = "qwen3coder-scripted"
RANDOM_NAME = "qwen3coder-tiny-random"

WEATHER_CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
TWO_CALLS = ("Let me check both.\n" + WEATHER_CALL + "\n<tool_call>\n<function=get_weather>\n<parameter=city>\n"
             "Tokyo\n</parameter>\n<parameter=days>\n1\n</parameter>\n</function>\n</tool_call>")
WRITE_CALL = ("<tool_call>\n<function=write_file>\n<parameter=path>\nsrc/app.py\n</parameter>\n<parameter=content>\n"
              "def main():\n    print(\"hi\")\n</parameter>\n</function>\n</tool_call>")
DEFAULT_REPLY = "Hello from the scripted model!\n\n```python\ndef add(a, b):\n    return a + b\n```\nDone."
RULES: list[tuple[str, str]] = [
    ("<tool_response>", "The weather in Paris is sunny."),
    ("weather in Paris and Tokyo", TWO_CALLS),
    ("weather", WEATHER_CALL),
    ("write a file", WRITE_CALL),
    ("json please", 'Sure: ```json\n{"answer": 42, "ok": true}\n```'),
    ("no json", "I will not write JSON."),
    ("stop test", "alpha beta STOP gamma"),
]
FIM_REPLY = "return a + b"
PLAIN_CYCLE = " lorem ipsum dolor sit amet,"

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
WRITE_TOOL = {"type": "function", "function": {
    "name": "write_file", "description": "Write a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}, "content": {"type": "string"}},
                   "required": ["path", "content"]}}}


# ---------------------------------------------------------------------------------------- checkpoint
_CACHE: dict[str, Any] = {}


def tiny_checkpoint() -> Path:
    """Random tiny qwen3_moe + the Qwen3-Coder tokenizer and chat template (skips without reference files)."""
    if "ckpt" in _CACHE:
        return _CACHE["ckpt"]
    from tests.conftest import reference_dir

    ref = reference_dir()
    from qwen3coder.chat.tokenizer import load_tokenizer
    from tests.hf_models import hf_model, save_hf

    path = Path(tempfile.mkdtemp(prefix="qwen3coder-serve-"))
    atexit.register(shutil.rmtree, path, True)
    model = hf_model("qwen3_moe", vocab_size=151936, num_hidden_layers=1, tie_word_embeddings=True,
                     max_position_embeddings=2048, eos_token_id=151645)
    save_hf(model, str(path), shard=False)
    tok = load_tokenizer(ref / "qwen3-coder-30b-a3b-instruct")
    tok.save(path)
    shutil.copy(ref / "qwen3_coder_chat_template.jinja", path / "chat_template.jinja")
    _CACHE["ckpt"] = path
    return path


# ---------------------------------------------------------------------------------------- scripted model
class _TokenStore(nn.Module):
    """Looks like a paged attention layer to the cache allocator; holds one token id per slot."""

    is_paged_attention = True
    num_kv_heads = 1
    head_dim = 1
    k_cache: torch.Tensor | None = None
    v_cache: torch.Tensor | None = None


class ScriptedModel(nn.Module):
    def __init__(self, tokenizer: Any, vocab_size: int = 151936, margin: float = 30.0):
        super().__init__()
        from qwen3coder.config import ModelConfig

        self.config = ModelConfig(model_type="qwen3_moe", vocab_size=vocab_size, hidden_size=1, num_hidden_layers=1,
                                  num_attention_heads=1, num_key_value_heads=1, head_dim=2,
                                  max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id,
                                  torch_dtype="float32")
        self.store = _TokenStore()
        self.anchor = nn.Parameter(torch.zeros(1), requires_grad=False)
        self.tok = tokenizer
        self.margin = margin
        self.im_end = tokenizer.token_to_id("<|im_end|>")
        self.endoftext = tokenizer.token_to_id("<|endoftext|>")
        self.plain = tokenizer.encode(PLAIN_CYCLE)

    def next_token(self, history: list[int]) -> int:
        text = self.tok.decode(history, skip_special_tokens=False)
        if "<|fim_middle|>" in text:
            target, so_far, end = FIM_REPLY, text.rsplit("<|fim_middle|>", 1)[1], self.endoftext
        elif "<|im_start|>assistant\n" in text:
            prompt, so_far = text.rsplit("<|im_start|>assistant\n", 1)
            user = prompt.rsplit("<|im_start|>user\n", 1)[-1]
            target = next((reply for key, reply in RULES if key in user), DEFAULT_REPLY)
            end = self.im_end
        else:
            return self.plain[len(history) % len(self.plain)]
        if not target.startswith(so_far) or len(so_far) >= len(target):
            return end
        return self.tok.encode(target[len(so_far):])[0]

    def forward_step(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: Any) -> torch.Tensor:
        flat = self.store.k_cache.view(-1)
        keep = ctx.slot_mapping >= 0
        flat[ctx.slot_mapping[keep]] = input_ids[keep].to(flat.dtype)
        block = self.store.k_cache.shape[1]
        hidden = torch.zeros(input_ids.shape[0], 1)
        starts = ctx.query_start_loc.tolist()
        for s, n in enumerate(ctx.seq_lens_cpu):
            table = ctx.block_tables[s].tolist()
            slots = [table[i // block] * block + i % block for i in range(n)]
            history = [int(x) for x in flat[torch.tensor(slots)].tolist()]
            hidden[starts[s]:starts[s + 1]] = float(self.next_token(history))
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.full((hidden.shape[0], self.config.vocab_size), -self.margin)
        logits[torch.arange(hidden.shape[0]), hidden[:, 0].long()] = self.margin
        return logits


def _serve_scripted(argv: list[str]) -> int:
    """`python -m tests.test_server_helpers serve --tokenizer DIR …`: the scripted model behind the real server."""
    from qwen3coder.chat.tokenizer import load_tokenizer
    from qwen3coder.cli import build_parser
    from qwen3coder.engine import AsyncLLMEngine, LLMEngine
    from qwen3coder.server.launcher import serve

    args = build_parser().parse_args(["serve", *argv])
    tok = load_tokenizer(args.tokenizer)
    engine = LLMEngine.from_pretrained(ScriptedModel(tok), tokenizer=tok, device="cpu",
                                       max_model_len=args.max_model_len or 2048, max_num_seqs=args.max_num_seqs,
                                       num_kv_blocks=args.num_kv_blocks, max_waiting_requests=args.max_queue)
    return serve(args, AsyncLLMEngine(engine))


# ---------------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], module: str = "qwen3coder.cli", timeout: float = 180.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.base_url = self.url + "/v1"
        fd, self.log_path = tempfile.mkstemp(prefix="qwen3coder-server-", suffix=".log")
        self._log = os.fdopen(fd, "w")
        cmd = [sys.executable, "-m", module, "serve", *args, "--port", str(self.port), "--disable-access-log"]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "2"}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log()}")
            time.sleep(0.2)

    def log(self) -> str:
        return Path(self.log_path).read_text(errors="replace")[-5000:]

    def alive(self) -> bool:
        try:
            return self.proc.poll() is None and httpx.get(self.url + "/health", timeout=10).status_code == 200
        except httpx.HTTPError:
            return False

    def metrics(self) -> dict[str, float]:
        """`name` -> value of the unlabelled-by-route series in /metrics (model_name label dropped)."""
        out: dict[str, float] = {}
        for line in httpx.get(self.url + "/metrics", timeout=10).text.splitlines():
            if line.startswith("#") or not line.strip():
                continue
            name, value = line.rsplit(" ", 1)
            key = name.split("{", 1)[0] if 'model_name="' in name and name.count("=") == 1 else name
            out[key] = float(value)
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()


_SERVERS: dict[str, ServerProcess] = {}


def _stop_all() -> None:
    for server in _SERVERS.values():
        server.stop()


atexit.register(_stop_all)


def get_server(kind: str) -> ServerProcess:
    """The shared `random` or `scripted` server (restarted if an earlier test killed it)."""
    server = _SERVERS.get(kind)
    if server is not None and server.proc.poll() is None:
        return server
    ckpt = tiny_checkpoint()
    if kind == "random":
        server = ServerProcess(["--model", str(ckpt), "--device", "cpu", "--max-model-len", "1024",
                                "--max-num-seqs", "64", "--served-model-name", RANDOM_NAME, "test-alias"])
    elif kind == "scripted":
        server = ServerProcess(["--tokenizer", str(ckpt), "--max-model-len", "2048", "--max-num-seqs", "16",
                                "--served-model-name", SCRIPTED_NAME], module="tests.test_server_helpers")
    else:
        raise ValueError(kind)
    _SERVERS[kind] = server
    return server


# ---------------------------------------------------------------------------------------- helper tests
def test_scripted_model_follows_its_script():
    from tests.conftest import reference_dir

    from qwen3coder.chat import load_tokenizer, render_chat
    from qwen3coder.engine import LLM, SamplingParams

    ref = reference_dir()
    tok = load_tokenizer(ref / "qwen3-coder-30b-a3b-instruct")
    template = (ref / "qwen3_coder_chat_template.jinja").read_text()
    llm = LLM(ScriptedModel(tok), tokenizer=tok, device="cpu", max_model_len=1024, num_kv_blocks=256)
    prompt = render_chat(template, [{"role": "user", "content": "what is the weather?"}], tools=[WEATHER_TOOL])
    prompt2 = render_chat(template, [{"role": "user", "content": "hi"}])
    outs = llm.generate([prompt, prompt2, prompt], SamplingParams(temperature=0.8, max_tokens=200), use_tqdm=False)
    assert outs[0].outputs[0].text == WEATHER_CALL and outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].text == DEFAULT_REPLY
    assert outs[2].outputs[0].text == WEATHER_CALL  # served from the prefix cache: the store is still right


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(_serve_scripted(sys.argv[2:]))
    pytest.main([__file__, "-q"])
