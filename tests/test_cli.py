"""The command line, run as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3coder.cli", *args], capture_output=True, text=True,
                          timeout=300)


def test_generate_on_dummy_preset():
    r = _run("generate", "--preset", "tiny", "--load-format", "dummy", "--device", "cpu",
             "--prompt-token-ids", "1,2,3", "--max-tokens", "5", "--temperature", "0", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["prompt_token_ids"] == [1, 2, 3] and len(out["token_ids"]) == 5
    assert out["finish_reason"] == "length"


def test_generate_on_checkpoint(tmp_path):
    from tests.hf_models import hf_model, save_hf

    save_hf(hf_model("qwen3_moe"), str(tmp_path))
    args = ["generate", "--model", str(tmp_path), "--device", "cpu", "--prompt-token-ids", "5,6,7",
            "--max-tokens", "4", "--temperature", "0", "--json"]
    r = _run(*args)  # this checkpoint has no tokenizer: a message that says so
    assert r.returncode == 2 and "tokenizer" in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = _run(*args, "--skip-tokenizer-init")
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout.strip().splitlines()[-1])["token_ids"]) == 4


def test_clear_errors():
    r = _run("generate", "--model", "/nonexistent/ckpt", "--prompt", "hi")
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    r = _run("generate", "--preset", "nope", "--load-format", "dummy", "--prompt", "hi")
    assert r.returncode == 2 and "unknown preset" in r.stderr
    r = _run("generate", "--preset", "tiny", "--load-format", "dummy", "--prompt-token-ids", "1,x")
    assert r.returncode == 2 and "comma-separated integers" in r.stderr
    r = _run("generate", "--preset", "tiny", "--load-format", "dummy")
    assert r.returncode == 2 and "at least one" in r.stderr
