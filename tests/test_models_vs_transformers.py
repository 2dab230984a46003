"""Models against transformers: logits, greedy continuations, and the cached (paged) decode path.

Each variant is a random tiny config written by transformers' `save_pretrained` (sharded), loaded by
qwen3coder; also with its config.json rewritten the transformers-4.5x way (as real checkpoints are).
"""

from __future__ import annotations

import pytest
import torch

from qwen3coder.config import ModelConfig
from qwen3coder.loader import load_model
from qwen3coder.models.cache import allocate_kv_cache, allocate_state_cache
from qwen3coder.models.context import ForwardContext
from tests.hf_models import hf_model, rewrite_config_45x, save_hf

pytest.importorskip("transformers")

YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 32}

VARIANTS = {
    # qwen3_moe: GQA 2:1, head_dim (32) != hidden/heads (16), renormalised top-k
    "moe-gqa": ("qwen3_moe", {}),
    # one KV head, no top-k renormalisation, tied embeddings
    "moe-mqa-tied-nonorm": ("qwen3_moe", dict(num_key_value_heads=1, norm_topk_prob=False, tie_word_embeddings=True)),
    # dense layers from mlp_only_layers and decoder_sparse_step, attention biases
    "moe-dense-layers": ("qwen3_moe", dict(num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=2,
                                           attention_bias=True)),
    # YaRN, tested at positions past the original window (32)
    "moe-yarn": ("qwen3_moe", dict(rope_parameters=YARN)),
    "qwen3-dense": ("qwen3", dict(num_key_value_heads=1)),
    # qwen3_next: default layout (3 DeltaNet + 1 gated attention), sequences longer than the 64 chunk
    "next-default": ("qwen3_next", {}),
    # custom layer_types, a dense layer, one KV head, half-rotary, YaRN
    "next-custom": ("qwen3_next", dict(
        layer_types=["full_attention", "linear_attention", "full_attention", "linear_attention"],
        mlp_only_layers=[1], num_key_value_heads=1,
        rope_parameters={**YARN, "partial_rotary_factor": 0.5})),
}

SEQ_LEN = 80  # > 64 (DeltaNet chunk) and > 32 (YaRN original window)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def pair(request, tmp_path_factory):
    model_type, overrides = VARIANTS[request.param]
    ref = hf_model(model_type, **overrides)
    path = str(tmp_path_factory.mktemp(request.param))
    save_hf(ref, path, shard=True)
    ours = load_model(path, progress=False)
    return request.param, ref, ours, path


def _prompts(vocab: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, SEQ_LEN), generator=g)


@torch.no_grad()
def test_logits_match_transformers(pair):
    name, ref, ours, _ = pair
    x = _prompts(ref.config.vocab_size)
    expected = ref(x).logits
    got = ours(x)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4, msg=f"{name}: logits differ")


@torch.no_grad()
def test_config_45x_spelling_loads_identically(pair, tmp_path):
    name, ref, ours, path = pair
    import shutil

    old = str(tmp_path / "ckpt45")
    shutil.copytree(path, old)
    rewrite_config_45x(old)
    cfg_new, cfg_old = ModelConfig.from_hf(path), ModelConfig.from_hf(old)
    cfg_old.torch_dtype = cfg_new.torch_dtype
    assert cfg_old == cfg_new, name
    x = _prompts(ref.config.vocab_size, seed=2)
    assert torch.equal(load_model(old, progress=False)(x), ours(x))


def _greedy_reference(model, prompt: list[int], steps: int) -> list[int]:
    ids = list(prompt)
    for _ in range(steps):
        ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


@torch.no_grad()
def test_greedy_continuation_matches_transformers(pair):
    name, ref, ours, _ = pair
    prompt = _prompts(ref.config.vocab_size, seed=3)[0, :12]
    out = ref.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                       max_new_tokens=20, do_sample=False, min_new_tokens=20, pad_token_id=0,
                       eos_token_id=None)
    expected = out[0, prompt.numel():].tolist()
    assert _greedy_reference(ours, prompt.tolist(), 20) == expected, name


def cached_greedy(model, prompts: list[list[int]], steps: int, block_size: int = 8,
                  chunk: int | None = None) -> list[list[int]]:
    """Greedy decode of several sequences at once through the paged cache path.

    Prefill runs in chunks of `chunk` tokens (all sequences in one flattened batch per step), then
    every sequence decodes one token per step. Block tables are handed out in interleaved order so
    a sequence's blocks are not contiguous.
    """
    cfg = model.config
    n = len(prompts)
    max_len = max(len(p) for p in prompts) + steps
    blocks_per_seq = (max_len + block_size - 1) // block_size
    allocate_kv_cache(model, n * blocks_per_seq + 1, block_size, torch.float32, "cpu")
    allocate_state_cache(model, n + 2, torch.float32, "cpu")
    tables = [[1 + s + i * n for i in range(blocks_per_seq)] for s in range(n)]  # block 0 unused
    slots = [n + 1 - s for s in range(n)]
    seqs = [list(p) for p in prompts]
    done = [0] * n  # tokens already in the cache
    outs: list[list[int]] = [[] for _ in range(n)]
    while any(len(o) < steps for o in outs):
        ids, pos, q_lens, s_lens, active = [], [], [], [], []
        for s in range(n):
            if len(outs[s]) >= steps:
                continue
            todo = len(seqs[s]) - done[s]
            take = todo if chunk is None else min(chunk, todo)
            ids += seqs[s][done[s]:done[s] + take]
            pos += list(range(done[s], done[s] + take))
            q_lens.append(take)
            s_lens.append(done[s] + take)
            active.append(s)
        ctx = ForwardContext.build(q_lens, s_lens, [tables[s] for s in active], block_size,
                                   state_indices=[slots[s] for s in active],
                                   has_initial_state=[done[s] > 0 for s in active])
        hidden = model.forward_step(torch.tensor(ids), torch.tensor(pos), ctx)
        logits = model.compute_logits(hidden[ctx.logits_indices])
        for row, s in enumerate(active):
            done[s] += q_lens[row]
            if done[s] == len(seqs[s]):  # prompt fully in cache: this step's last logits are valid
                tok = int(logits[row].argmax())
                seqs[s].append(tok)
                outs[s].append(tok)
    return outs


@torch.no_grad()
@pytest.mark.parametrize("chunk", [None, 7])
def test_cached_decode_matches_reference(pair, chunk):
    name, ref, ours, _ = pair
    x = _prompts(ref.config.vocab_size, seed=4)
    prompts = [x[0, :70].tolist(), x[1, :9].tolist()]  # one prompt spans two DeltaNet chunks
    got = cached_greedy(ours, prompts, steps=12, chunk=chunk)
    for p, g in zip(prompts, got):
        assert g == _greedy_reference(ours, p, 12), f"{name} chunk={chunk}"
