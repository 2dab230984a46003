"""`qwen3coder serve`, `chat` and `complete` as real subprocesses: clear start-up errors, the terminal
chat (streaming, multi-line input, /reset, /exit, tool calls) and FIM completion to stdout."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from tests.test_server_helpers import DEFAULT_REPLY, FIM_REPLY, ROOT, WEATHER_TOOL, get_server, tiny_checkpoint


def _run(*args: str, stdin: str | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3coder.cli", *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout, cwd=ROOT)


def _clean_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("qwen3coder: error:"), r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


def test_serve_startup_errors(tmp_path):
    _clean_error(_run("serve", "--model", "/nonexistent/ckpt", "--port", "0"), "does not exist")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = str(busy.getsockname()[1])
        _clean_error(_run("serve", "--preset", "tiny", "--load-format", "dummy", "--port", port), "already in use",
                     port)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "qwen3_moe", "vocab_size": 256, "hidden_size": 64,
                                                 "num_hidden_layers": 1, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2, "head_dim": 16,
                                                 "max_position_embeddings": 512}))
    (bad / "model.safetensors").write_bytes(b"this is not a safetensors file")
    r = _run("serve", "--model", str(bad), "--port", "0", "--skip-tokenizer-init")
    _clean_error(r, str(bad))
    _clean_error(_run("serve", "--preset", "tiny", "--load-format", "dummy", "--chat-template", "/no/such.jinja",
                      "--port", "0"), "--chat-template")


def test_missing_default_model_is_a_clear_error(monkeypatch, tmp_path):
    """A clone without the bundled weights: `serve`/`chat` with no --model name the problem."""
    import argparse

    import qwen3coder
    from qwen3coder.cli import CLIError, _check_model_path

    monkeypatch.setattr(qwen3coder, "_ASSETS", str(tmp_path))
    with pytest.raises(CLIError, match="bundled default model is not present"):
        _check_model_path(argparse.Namespace(model=None, preset=None))


def test_chat_against_a_server(tmp_path):
    server = get_server("scripted")
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER_TOOL]))
    script = "hi there\n/reset\nwhat is the \\\nweather?\n/exit\n"
    r = _run("chat", "--url", server.base_url, "--tools", str(tools), stdin=script)
    assert r.returncode == 0, r.stderr
    assert DEFAULT_REPLY in r.stdout
    assert '[tool call] get_weather({"city": "Paris", "days": 3})' in r.stdout
    assert "(conversation cleared)" in r.stderr and "finish: tool_calls" in r.stderr
    r = _run("chat", "--url", "http://127.0.0.1:9", stdin="hello\n")
    _clean_error(r, "cannot reach the server")


def test_complete_fim_against_a_server(tmp_path):
    server = get_server("scripted")
    r = _run("complete", "--url", server.url, "--prefix", "def add(a, b):\n    ", "--suffix", "\n")
    assert r.returncode == 0 and r.stdout == FIM_REPLY + "\n", (r.stdout, r.stderr)
    src = tmp_path / "m.py"
    src.write_text("def add(a, b):\n\nprint(add(1, 2))\n")
    r = _run("complete", "--url", server.url, "--file", str(src), "--line", "2")
    assert r.returncode == 0 and r.stdout == FIM_REPLY + "\n", r.stderr
    _clean_error(_run("complete", "--url", server.url, "--file", str(src), "--line", "99"), "--line")
    _clean_error(_run("complete", "--url", server.url, "--file", str(tmp_path / "none.py"), "--line", "1"),
                 "none.py")


def test_complete_and_chat_in_process():
    ckpt = str(tiny_checkpoint())
    r = _run("complete", "--model", ckpt, "--device", "cpu", "--max-model-len", "256", "--prefix", "x = ",
             "--suffix", "\n", "--max-tokens", "3")
    assert r.returncode == 0, r.stderr
    r = _run("chat", "--model", ckpt, "--device", "cpu", "--max-model-len", "256", "--max-tokens", "3",
             stdin='"""\nline one\nline two\n"""\n/exit\n')
    assert r.returncode == 0, r.stderr
    assert "completion tokens, finish: length" in r.stderr


def test_read_message_multiline(monkeypatch):
    from qwen3coder import cli

    lines = iter(["first \\", "second", '"""', "a", "", "b", '"""', "single"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert cli._read_message() == "first \nsecond"
    assert cli._read_message() == "a\n\nb"
    assert cli._read_message() == "single"

    def eof(prompt: str = "") -> str:
        raise EOFError

    monkeypatch.setattr("builtins.input", eof)
    assert cli._read_message() is None


@pytest.mark.parametrize("cmd", ["serve", "chat", "complete"])
def test_help(cmd, capsys):
    from qwen3coder.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([cmd, "--help"])
    assert exc.value.code == 0 and "--model" in capsys.readouterr().out
