"""Shared helpers for the engine tests: a toy tokenizer, HF-checkpoint fixtures, engine drivers.

(Kept in a test module so it ships with the engine's tests; the few tests here check the helpers.)
"""

from __future__ import annotations

import torch

from qwen3coder.engine import LLM, LLMEngine, SamplingParams


class ToyTokenizer:
    """Token i decodes to a fixed piece of text (1-3 characters), so stop strings span tokens."""

    def __init__(self, vocab_size: int = 256, eos_token_id: int = 0):
        alphabet = "abcdefghijklmnopqrstuvwxyz"
        self.pieces = []
        for i in range(vocab_size):
            n = 1 + i % 3
            self.pieces.append("".join(alphabet[(i * 7 + j * 3) % 26] for j in range(n)))
        self.pieces[eos_token_id] = "<eos>"
        self.eos_token_id = eos_token_id
        self.vocab_size = vocab_size

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return "".join("" if (skip_special_tokens and i == self.eos_token_id) else self.pieces[i] for i in ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids, i = [], 0
        lookup = {p: t for t, p in enumerate(self.pieces) if t != self.eos_token_id}
        while i < len(text):
            for n in (3, 2, 1):
                if text[i:i + n] in lookup:
                    ids.append(lookup[text[i:i + n]])
                    i += n
                    break
            else:
                raise ValueError(f"cannot encode {text[i]!r}")
        return ids


def random_model(preset: str = "tiny", seed: int = 0, std: float = 0.15) -> torch.nn.Module:
    from qwen3coder.config import ModelConfig
    from qwen3coder.models import build_model

    torch.manual_seed(seed)
    cfg = ModelConfig.preset(preset)
    from tests.hf_models import randomize_

    return randomize_(build_model(cfg).float().eval(), std=std, norm_base=1.0)


def reference_greedy(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy continuation with the model's plain (no-cache) forward."""
    ids = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(max_tokens):
            tok = int(model(ids)[0, -1].argmax())
            out.append(tok)
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return out


def run_engine(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
               abort_after: dict[str, int] | None = None, check: bool = True) -> dict[str, list[int]]:
    """Drive `engine` step by step (checking scheduler invariants); returns request id -> tokens."""
    plist = params if isinstance(params, list) else [params] * len(prompts)
    for i, (p, sp) in enumerate(zip(prompts, plist)):
        engine.add_request(f"r{i}", {"prompt_token_ids": p}, sp)
    results: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                results[out.request_id] = out.outputs[0].token_ids
        steps += 1
        for rid, when in (abort_after or {}).items():
            if steps == when:
                engine.abort_request(rid)
        if check:
            engine.scheduler.check_invariants()
        assert steps < 10000, "engine did not finish"
    return results


def assert_all_free(engine: LLMEngine) -> None:
    sched = engine.scheduler
    bm = sched.block_manager
    assert not sched.running and not sched.waiting and not sched.requests
    assert bm.num_free_blocks == bm.num_blocks
    assert all(b.ref_count == 0 for b in bm.blocks)
    if sched.state_manager is not None:
        sm = sched.state_manager
        assert sm.num_seq_slots == 0
        assert len(sm.free_slots) + len(sm.snapshots) == sm.num_slots


def test_toy_tokenizer_round_trip():
    tok = ToyTokenizer()
    ids = [5, 17, 200, 3]
    assert tok.encode(tok.decode(ids)) != [] and tok.decode(tok.encode(tok.decode(ids))) == tok.decode(ids)


def test_reference_greedy_matches_engine_smoke():
    model = random_model("tiny")
    llm = LLM(model, skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=32, max_num_seqs=4)
    prompt = [3, 4, 5, 6, 7]
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                       use_tqdm=False)
    assert out[0].outputs[0].token_ids == reference_greedy(model, prompt, 6)


def test_prefill_graph_settings():
    """Token buckets of the prefill CUDA graphs, the engine default (2,048 tokens, capped by the step
    budget and the model length) and the CLI flags that set it."""
    import pytest

    from qwen3coder.cli import build_parser
    from qwen3coder.config import ModelConfig
    from qwen3coder.engine.config import EngineConfig
    from qwen3coder.engine.cuda_runner import prefill_graph_sizes
    from qwen3coder.server.launcher import build_engine

    assert prefill_graph_sizes(2048) == [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1536, 2048]
    assert prefill_graph_sizes(1500) == [16, 32, 64, 128, 256, 384, 512, 768, 1024, 1500]
    assert prefill_graph_sizes(100) == [16, 32, 64, 100]
    assert prefill_graph_sizes(8) == [8] and prefill_graph_sizes(1) == prefill_graph_sizes(0) == []
    cfg = ModelConfig.preset("tiny")
    assert EngineConfig.create(cfg, device="cpu", max_model_len=512).max_prefill_graph_tokens == 512
    assert EngineConfig.create(cfg, device="cpu", max_model_len=4096,
                               max_num_batched_tokens=1024).max_prefill_graph_tokens == 1024
    assert EngineConfig.create(cfg, device="cpu", max_prefill_graph_tokens=0).max_prefill_graph_tokens == 0
    with pytest.raises(ValueError, match="max_prefill_graph_tokens"):
        EngineConfig.create(cfg, device="cpu", max_prefill_graph_tokens=-1)
    args = build_parser().parse_args(["serve", "--device", "cpu", "--max-model-len", "256", "--enforce-eager",
                                      "--max-prefill-graph-tokens", "64"])
    config = build_engine(args).engine.config
    assert config.enforce_eager and config.max_prefill_graph_tokens == 64
