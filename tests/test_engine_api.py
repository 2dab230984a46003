"""The user-facing engine API: input validation (ValueError naming the field), token-id prompts
without a tokenizer, text prompts, stop strings across token boundaries with streaming hold-back,
stop token ids, EOS, min_tokens, logprobs, prompt_logprobs, output kinds, default sampling params,
and failure isolation (one request's processing error does not touch the others)."""

from __future__ import annotations

import json

import pytest

from qwen3coder.engine import LLM, RequestOutputKind, SamplingParams
from qwen3coder.engine.llm_engine import LLMEngine
from tests.test_engine_helpers import ToyTokenizer, assert_all_free, random_model, reference_greedy


@pytest.fixture(scope="module")
def model():
    return random_model("tiny", seed=3)


def make(model, **kw):
    args = dict(skip_tokenizer_init=True, max_model_len=128, num_kv_blocks=32, max_num_seqs=8)
    args.update(kw)
    return LLM(model, **args)


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"), (dict(top_k=-2), "top_k"), (dict(n=0), "n"), (dict(max_tokens=0), "max_tokens"),
    (dict(min_tokens=5, max_tokens=4), "min_tokens"), (dict(logprobs=21), "logprobs"),
    (dict(prompt_logprobs=-1), "prompt_logprobs"), (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(stop=[""]), "stop"), (dict(temperature=float("nan")), "temperature"),
])
def test_invalid_sampling_params(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_invalid_requests(model):
    llm = make(model)
    eng = llm.llm_engine
    ok = SamplingParams(max_tokens=4)
    cases = [
        ({"prompt_token_ids": []}, ok, "prompt"),
        ({"prompt_token_ids": [1, 512]}, ok, "prompt_token_ids"),
        ({"prompt_token_ids": [-1]}, ok, "prompt_token_ids"),
        ({"prompt_token_ids": [1, "a"]}, ok, "prompt_token_ids"),
        ("text", ok, "prompt"),  # no tokenizer
        ({"prompt_token_ids": [1] * 120}, SamplingParams(max_tokens=9), "max_tokens"),
        ({"prompt_token_ids": [1] * 128}, ok, "prompt"),
        ({"prompt_token_ids": [1]}, SamplingParams(stop=["x"]), "stop"),
        (42, ok, "prompt"),
    ]
    for prompt, params, field in cases:
        with pytest.raises(ValueError, match=field):
            eng.add_request("x", prompt, params)
    small = make(model, num_kv_blocks=2, block_size=4)
    with pytest.raises(ValueError, match="max_tokens"):
        small.llm_engine.add_request("y", {"prompt_token_ids": [1] * 6}, SamplingParams(max_tokens=4))
    eng.add_request("dup", {"prompt_token_ids": [1]}, ok)
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("dup", {"prompt_token_ids": [1]}, ok)
    eng.abort_request("dup")
    # a bad prompt in a batch rejects the call and leaves nothing behind
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": []}], ok, use_tqdm=False)
    assert not eng.has_unfinished_requests()
    assert_all_free(eng)


def test_skip_tokenizer_init_and_finish_reasons(model):
    llm = make(model)
    prompt = [5, 6, 7, 8]
    ref = reference_greedy(model, prompt, 8)
    outs = llm.generate([{"prompt_token_ids": prompt}] * 3, [
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[ref[3]], ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=8, logprobs=3),
    ], use_tqdm=False)
    a, b, c = (o.outputs[0] for o in outs)
    assert a.text == "" and a.token_ids == ref and a.finish_reason == "length"
    cut = ref.index(ref[3]) + 1
    assert b.token_ids == ref[:cut] and b.finish_reason == "stop" and b.stop_reason == ref[3]
    assert c.logprobs is not None and len(c.logprobs) == len(c.token_ids)
    for tok, entry in zip(c.token_ids, c.logprobs):
        assert tok in entry and entry[tok].rank == 1 and len(entry) == 3  # greedy: sampled = top-1
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))


def test_eos_and_min_tokens(model):
    llm = make(model)
    prompt = [9, 10, 11]
    ref = reference_greedy(model, prompt, 6)
    eng = llm.llm_engine
    eng.eos_token_ids = {ref[1]}  # pretend the 2nd greedy token is EOS
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref[:2] and out.finish_reason == "stop" and out.stop_reason is None
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, min_tokens=3),
                       use_tqdm=False)[0].outputs[0]
    assert ref[1] not in out.token_ids[:3] and len(out.token_ids) >= 3


def test_prompt_logprobs(model):
    llm = make(model, enable_prefix_caching=True)
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
    full = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2),
                        use_tqdm=False)[0]
    chunked = make(model, max_num_batched_tokens=5).generate(
        {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2), use_tqdm=False)[0]
    import torch

    with torch.no_grad():
        lsm = model(torch.tensor([prompt]))[0].log_softmax(-1)
    for out in (full, chunked):
        plp = out.prompt_logprobs
        assert plp[0] is None and len(plp) == len(prompt)
        for i in range(1, len(prompt)):
            assert plp[i][prompt[i]].logprob == pytest.approx(lsm[i - 1, prompt[i]].item(), abs=1e-4)
            assert len(plp[i]) in (2, 3)


def test_text_prompts_stop_strings_and_streaming(model):
    tok = ToyTokenizer(vocab_size=512, eos_token_id=0)
    llm = LLM(model, tokenizer=tok, max_model_len=128, num_kv_blocks=32)
    prompt_text = tok.decode([5, 6, 7])
    prompt_ids = tok.encode(prompt_text)
    ref = reference_greedy(model, prompt_ids, 12)
    full_text = tok.decode(ref)
    # a stop string straddling tokens 3 and 4
    start = len(tok.decode(ref[:3])) - 1
    stop = full_text[start:start + 3]
    params = SamplingParams(temperature=0, max_tokens=12, stop=[stop], ignore_eos=True)
    out = llm.generate(prompt_text, params, use_tqdm=False)[0]
    c = out.outputs[0]
    assert out.prompt_token_ids == prompt_ids
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.text == full_text[:full_text.index(stop)]
    assert stop not in c.text
    # streaming (delta) never shows a prefix of the stop string that later turns out to be the stop
    eng = llm.llm_engine
    dp = params.clone()
    dp.output_kind = RequestOutputKind.DELTA
    eng.add_request("s", {"prompt_token_ids": prompt_ids}, dp)
    pieces = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            pieces.append(o.outputs[0].text if o.outputs else "")
    assert "".join(pieces) == c.text
    include = llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(
        temperature=0, max_tokens=12, stop=[stop], include_stop_str_in_output=True), use_tqdm=False)[0]
    assert include.outputs[0].text == full_text[:full_text.index(stop) + len(stop)]


def test_cumulative_outputs_and_n(model):
    eng = make(model).llm_engine
    eng.add_request("c", {"prompt_token_ids": [1, 2, 3]}, SamplingParams(n=2, max_tokens=5, seed=1, ignore_eos=True))
    seen = []
    while eng.has_unfinished_requests():
        for o in eng.step():
            seen.append([len(c.token_ids) for c in o.outputs])
    assert seen[-1] == [5, 5] and seen[0] == [1, 1]
    assert [len(x) for x in seen] == [2] * len(seen)


def test_processing_error_fails_only_that_request(model):
    good_prompt = [3, 4, 5]
    ref = reference_greedy(model, good_prompt, 6)
    poison = next(t for t in range(400, 512) if t not in ref)

    class Flaky(ToyTokenizer):
        def decode(self, ids, skip_special_tokens=False):
            if poison in list(ids):
                raise RuntimeError("boom")
            return super().decode(ids, skip_special_tokens)

    eng = LLMEngine.from_pretrained(model, tokenizer=Flaky(512), max_model_len=128, num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eng.add_request("bad", {"prompt_token_ids": [1, poison]}, params)
    eng.add_request("good", {"prompt_token_ids": good_prompt}, params)
    results = {}
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                results[o.request_id] = o
    assert "boom" in results["bad"].error and results["bad"].outputs[0].finish_reason == "abort"
    assert results["good"].error is None and results["good"].outputs[0].token_ids == ref
    assert_all_free(eng)


def test_default_sampling_params_from_generation_config(tmp_path, model):
    from tests.hf_models import hf_model, save_hf

    path = save_hf(hf_model("qwen3_moe"), str(tmp_path / "ckpt"), shard=False)
    with open(f"{path}/generation_config.json", "w") as f:
        json.dump({"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05,
                   "eos_token_id": [5, 6]}, f)
    llm = LLM(path, skip_tokenizer_init=True, max_model_len=64, num_kv_blocks=16)
    d = llm.get_default_sampling_params()
    assert (d.temperature, d.top_p, d.top_k, d.repetition_penalty) == (0.7, 0.8, 20, 1.05)
    assert {5, 6} <= llm.llm_engine.eos_token_ids
    assert SamplingParams().temperature == 1.0  # explicit params are not overridden (vLLM)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, use_tqdm=False)[0]
    assert 1 <= len(out.outputs[0].token_ids) <= 16


def test_missing_model_path():
    with pytest.raises(ValueError, match="model"):
        LLM("/nonexistent/checkpoint", skip_tokenizer_init=True)
