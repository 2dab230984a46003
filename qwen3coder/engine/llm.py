"""`LLM`: the offline batch API (vLLM's `LLM`): load a checkpoint once, `generate` many prompts."""

from __future__ import annotations

import itertools
from typing import Any, Sequence as Seq

from torch import nn

from qwen3coder.engine.llm_engine import LLMEngine, PromptType
from qwen3coder.engine.outputs import RequestOutput
from qwen3coder.engine.sampling_params import RequestOutputKind, SamplingParams


class LLM:
    """Offline inference.

    `model` is a checkpoint directory (None: `qwen3coder.default_model_path()`), or an in-memory
    qwen3coder model (`build_model(config)`), e.g. for benchmarks with random weights.
    """

    def __init__(self, model: str | nn.Module | None = None, *, device: str | None = None,
                 dtype: Any = None, max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 enable_prefix_caching: bool = True, skip_tokenizer_init: bool = False, block_size: int = 16,
                 num_kv_blocks: int | None = None, max_num_seqs: int = 256,
                 max_num_batched_tokens: int | None = None, seed: int = 0, enforce_eager: bool = False,
                 tokenizer: Any = None, **kwargs: Any):
        self.llm_engine = LLMEngine.from_pretrained(
            model, tokenizer=tokenizer, device=device, dtype=dtype, max_model_len=max_model_len,
            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
            skip_tokenizer_init=skip_tokenizer_init, block_size=block_size, num_kv_blocks=num_kv_blocks,
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, seed=seed,
            enforce_eager=enforce_eager, **kwargs)
        self._ids = itertools.count()

    def get_tokenizer(self) -> Any:
        return self.llm_engine.tokenizer

    def get_default_sampling_params(self) -> SamplingParams:
        """The checkpoint's recommended settings (generation_config.json)."""
        return self.llm_engine.get_default_sampling_params()

    def generate(self, prompts: PromptType | Seq[PromptType],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in input order."""
        if isinstance(prompts, (str, dict)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = self.get_default_sampling_params()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"sampling_params: {len(params_list)} given for {len(prompts)} prompts")
        engine = self.llm_engine
        ids: list[str] = []
        try:
            for prompt, params in zip(prompts, params_list):
                params = params.clone()
                params.output_kind = RequestOutputKind.FINAL_ONLY
                rid = str(next(self._ids))
                engine.add_request(rid, prompt, params)
                ids.append(rid)
        except Exception:
            engine.abort_request(ids)  # all or nothing: a bad prompt rejects the whole call
            raise
        return self._run(ids, use_tqdm)

    def chat(self, messages: Seq[dict[str, Any]] | Seq[Seq[dict[str, Any]]],
             sampling_params: SamplingParams | Seq[SamplingParams] | None = None, use_tqdm: bool = True,
             chat_template: str | None = None, add_generation_prompt: bool = True,
             tools: Seq[dict[str, Any]] | None = None, **template_kwargs: Any) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of messages) or to a list of conversations,
        rendered with the checkpoint's chat template (or `chat_template`, a path or Jinja text) as
        vLLM's `LLM.chat` does. Tool calls in the replies are left as text; parse them with
        `qwen3coder.chat.parse_tool_calls`."""
        from qwen3coder.chat.template import render_chat, resolve_chat_template

        tokenizer = self.get_tokenizer()
        if tokenizer is None:
            raise ValueError("chat: the engine has no tokenizer (skip_tokenizer_init=True); use generate()")
        template = resolve_chat_template(tokenizer, chat_template, source="this checkpoint")
        if not messages:
            raise ValueError("chat: no messages given")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts = [render_chat(template, conv, tools=tools, add_generation_prompt=add_generation_prompt,
                               **template_kwargs) for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        from tqdm.auto import tqdm

        engine = self.llm_engine
        results: dict[str, RequestOutput] = {}
        wanted = set(ids)
        bar = tqdm(total=len(ids), desc="Processed prompts", dynamic_ncols=True, disable=not use_tqdm)
        try:
            while engine.has_unfinished_requests() and len(results) < len(ids):
                for out in engine.step():
                    if out.finished and out.request_id in wanted:
                        results[out.request_id] = out
                        bar.update(1)
        except BaseException:
            engine.abort_request([i for i in ids if i not in results])
            raise
        finally:
            bar.close()
        return [results[i] for i in ids]
