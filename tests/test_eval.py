"""qwen3coder.eval: pass@k, the HumanEval data and harness (canonical solutions in our sandbox), the
tool-call validator, FIM examples, and a smoke run of run_all on a random tiny checkpoint."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from qwen3coder.eval import PROFILES, EvalProfile, read_train_meta, run_all
from qwen3coder.eval.heldout import load_texts, make_fim_examples
from qwen3coder.eval.humaneval import (STOP_SEQUENCES, HumanEvalConfig, build_program, execute_completions,
                                       humaneval_data_path, load_problems, pass_at_k, truncate_completion)
from qwen3coder.eval.tools import TOOLS, default_cases, is_wellformed, validate_arguments
from qwen3coder.train.sandbox import SandboxPool
from tests.conftest import reference_dir


def _codex_estimator(n: int, c: int, k: int) -> float:
    """The numerically stable form from the Codex paper (Chen et al. 2021, Fig. 3)."""
    if n - c < k:
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


@pytest.mark.parametrize("n,c,k,expected", [
    (10, 0, 1, 0.0), (10, 10, 1, 1.0), (10, 1, 1, 0.1), (10, 3, 1, 0.3), (10, 1, 10, 1.0),
    (10, 2, 5, 1 - 56 / 252), (5, 3, 2, 0.9), (2, 1, 2, 1.0), (200, 10, 100, None),
])
def test_pass_at_k(n, c, k, expected):
    got = pass_at_k(n, c, k)
    assert math.isclose(got, _codex_estimator(n, c, k), rel_tol=1e-9, abs_tol=1e-12)
    if expected is not None:
        assert math.isclose(got, expected, abs_tol=1e-12)


def test_pass_at_k_rejects_bad_counts():
    for args in ((5, 6, 1), (5, 1, 6), (5, 1, 0), (5, -1, 1)):
        with pytest.raises(ValueError):
            pass_at_k(*args)


@pytest.fixture(scope="module")
def problems():
    try:
        humaneval_data_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    return load_problems()


def test_loader_yields_164_problems(problems):
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    for p in problems:
        assert p.prompt and p.test and p.entry_point and "def check" in p.test
        assert f"def {p.entry_point}" in p.prompt


def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    chosen = [problems[i] for i in (0, 2, 12, 53, 100, 163)]
    completions = {p.task_id: [p.canonical_solution, "    return None\n", "    while True:\n        pass\n"]
                   for p in chosen}
    completions[chosen[1].task_id].append(chosen[0].canonical_solution)  # another problem's solution
    with SandboxPool(4) as pool:
        records = execute_completions(chosen, completions, pool, timeout_s=2.0)
    for p in chosen:
        canonical, none, loop, *other = records[p.task_id]
        assert canonical["passed"], (p.task_id, canonical)
        assert not none["passed"] and none["status"] == "failed"
        assert not loop["passed"] and loop["status"] == "timeout"
        assert all(not r["passed"] for r in other)


def test_truncate_completion_and_program():
    text = "    return x + 1\n\n\ndef other():\n    pass\n"
    assert truncate_completion(text) == "    return x + 1\n\n"
    assert truncate_completion("    y = 1\n# comment\n") == "    y = 1"
    assert truncate_completion("    return 1\nprint(f(2))") == "    return 1"
    assert STOP_SEQUENCES == ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")


def test_build_program_runs_check(problems):
    p = problems[0]
    program = build_program(p, p.canonical_solution)
    assert program.startswith(p.prompt + p.canonical_solution) and program.endswith(f"check({p.entry_point})\n")


def test_tool_call_validation():
    tools = [TOOLS["get_weather"], TOOLS["add_numbers"]]
    call = "<tool_call>\n<function={}>\n{}</function>\n</tool_call>"
    param = "<parameter={}>\n{}\n</parameter>\n"
    ok = call.format("get_weather", param.format("city", "Paris") + param.format("unit", "celsius"))
    assert is_wellformed(ok, tools) == (True, "ok")
    assert is_wellformed("Sure! It is sunny.", tools) == (False, "no tool call")
    assert is_wellformed(call.format("delete_all", ""), tools)[1] == "unknown tool 'delete_all'"
    assert "missing" in is_wellformed(call.format("get_weather", param.format("unit", "celsius")), tools)[1]
    assert "wrong type" in is_wellformed(call.format("get_weather", param.format("city", "Paris")
                                                     + param.format("unit", "kelvin")), tools)[1]
    assert is_wellformed(call.format("add_numbers", param.format("a", "1.5") + param.format("b", "2")), tools)[0]
    schema = TOOLS["add_numbers"]["function"]["parameters"]
    assert validate_arguments('{"a": 1, "b": true}', schema) is not None  # bool is not a number
    assert validate_arguments('{"a": 1, "b": 2, "c": 3}', schema) is not None
    assert validate_arguments("[1, 2]", schema) is not None
    assert len(default_cases()) == 16 and len(default_cases(3)) == 3


def test_fim_examples_cut_whole_lines(tmp_path):
    text = "".join(f"line_{i} = {i}\n" for i in range(30))
    (tmp_path / "a.py").write_text(text)
    texts = load_texts([tmp_path / "a.py", str(tmp_path / "a.py"), "x = 1\ny = 2\n"])
    assert texts[0] == texts[1] == text and texts[2] == "x = 1\ny = 2\n"
    examples = make_fim_examples(texts[:1], 20, seed=1, max_lines=3)
    assert len(examples) == 20
    for e in examples:
        assert e.prefix + e.middle + e.suffix == text
        assert e.middle.endswith("\n") and 1 <= e.middle.count("\n") <= 3
    assert make_fim_examples(["\n\n"], 5) == []


def test_train_meta(tmp_path):
    assert read_train_meta(tmp_path) is None
    (tmp_path / "train_meta.json").write_text('{"train_tokens": 123}')
    assert read_train_meta(tmp_path) == {"train_tokens": 123}
    (tmp_path / "train_meta.json").write_text("[1]")
    with pytest.raises(ValueError, match="JSON object"):
        read_train_meta(tmp_path)


def test_cli_register():
    from qwen3coder.eval.cli import cmd_eval, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--model", "/m", "--profile", "gpu", "--out", "x.json"])
    assert (args.model, args.profile, args.out, args.func) == ("/m", "gpu", "x.json", cmd_eval)
    assert parser.parse_args(["eval", "--model", "/m"]).profile == "cpu-smoke"
    assert set(PROFILES) == {"cpu-smoke", "gpu"} and PROFILES["gpu"].humaneval.num_problems is None


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    ref = reference_dir() / "qwen3-coder-30b-a3b-instruct"
    from qwen3coder.chat.tokenizer import load_tokenizer
    from tests.hf_models import hf_model, save_hf

    out = tmp_path_factory.mktemp("tiny_eval_ckpt")
    model = hf_model("qwen3_moe", seed=0, vocab_size=151936, hidden_size=32, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, head_dim=16, intermediate_size=32,
                     moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2)
    save_hf(model, str(out), shard=False)
    load_tokenizer(ref).save(out)
    (out / "train_meta.json").write_text(json.dumps({"train_tokens": 4096}))
    return out


def test_run_all_smoke(tiny_checkpoint, tmp_path, problems):
    profile = replace(PROFILES["cpu-smoke"], name="test",
                      humaneval=HumanEvalConfig(num_problems=2, n_samples=2, max_tokens=4, timeout_s=5.0, workers=2),
                      heldout_window=64, heldout_max_windows=2, heldout_max_texts=2, fim_examples=2,
                      fim_max_tokens=4, tool_cases=1, tool_max_tokens=4)
    assert isinstance(profile, EvalProfile)
    out = tmp_path / "res" / "eval.json"
    result = run_all(tiny_checkpoint, out, profile)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["errors"] == {}
    for key in ("humaneval_pass@1", "fim_exact_match", "tool_call_wellformed_rate"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["humaneval_pass@10"] is None  # n=2 < 10: not estimable
    assert set(result["humaneval_sampled"]) == {"pass@1", "pass@2"}
    assert result["humaneval_num_problems"] == 2 and sum(result["humaneval_statuses"].values()) == 2 * 3
    assert 0 < result["heldout_loss"] < 50 and result["heldout_tokens"] > 0
    assert result["params_total"] >= result["params_active"] > 0
    assert result["train_tokens"] == 4096 and result["device"] == "cpu"
    assert result["sandbox"]["status"] == "passed"
    assert result["timing_s"]["total"] > 0
    lines = (tmp_path / "res" / "eval.humaneval.jsonl").read_text().splitlines()
    assert [json.loads(line)["task_id"] for line in lines] == ["HumanEval/0", "HumanEval/1"]
    assert all(len(json.loads(line)["samples"]) == 2 for line in lines)
