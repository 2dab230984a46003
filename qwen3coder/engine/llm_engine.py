"""`LLMEngine`: the synchronous core. Validates and queues requests, runs scheduler -> model
runner -> scheduler update -> output processing once per `step()`, and returns `RequestOutput`s.

One bad request never takes the others down: inputs are checked in `add_request` (a
`ValueError` naming the field), and a failure while processing one request's output finishes only
that request (finish_reason "abort", `RequestOutput.error` set). A failure of the forward pass
aborts the requests of that step and the engine carries on.
"""

from __future__ import annotations

import logging
import time
import traceback
from typing import Any

from torch import nn

from qwen3coder.engine.block_manager import cdiv
from qwen3coder.engine.config import EngineConfig
from qwen3coder.engine.metrics import EngineStats, StatsCollector
from qwen3coder.engine.output_processor import OutputProcessor
from qwen3coder.engine.outputs import RequestOutput
from qwen3coder.engine.sampling_params import SamplingParams
from qwen3coder.engine.model_runner import StepHandle
from qwen3coder.engine.scheduler import Scheduler, SchedulerOutput
from qwen3coder.engine.sequence import Request

logger = logging.getLogger("qwen3coder.engine")

PromptType = str | dict[str, Any]


class LLMEngine:
    def __init__(self, config: EngineConfig, model: nn.Module, tokenizer: Any = None):
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.model_config = model.config
        self.vocab_size = self.model_config.vocab_size
        if config.device.type == "cuda":
            from qwen3coder.engine.cuda_runner import CudaModelRunner

            self.runner = CudaModelRunner(config, model)
        else:
            from qwen3coder.engine.model_runner import ModelRunner

            self.runner = ModelRunner(config, model)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.num_kv_blocks,
                                   self.runner.num_state_slots, self.runner.num_snapshots)
        self.eos_token_ids = config.eos_token_ids(tokenizer)
        detok_cls = None
        if tokenizer is not None:
            from qwen3coder.chat.detokenizer import IncrementalDetokenizer

            detok_cls = IncrementalDetokenizer
        self.output_processor = OutputProcessor(tokenizer, detok_cls)
        self.stats = StatsCollector()
        self._errored: list[Request] = []
        self._inflight: StepHandle | None = None  # async scheduling: a launched step not yet collected

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model: str | nn.Module | None = None, tokenizer: Any = None,
                        **kwargs: Any) -> "LLMEngine":
        if isinstance(model, nn.Module):
            config = EngineConfig.create(model.config, None, **kwargs)
            model.to(device=config.device, dtype=config.dtype)
            return cls(config, model.eval(), tokenizer)
        path = resolve_model_path(model)
        from qwen3coder.config import ModelConfig
        from qwen3coder.loader import load_model

        config = EngineConfig.create(ModelConfig.from_hf(path), path, **kwargs)
        module = load_model(path, device=config.device, dtype=config.dtype)
        if tokenizer is None and not config.skip_tokenizer_init:
            from qwen3coder.chat.tokenizer import load_tokenizer

            tokenizer = load_tokenizer(path)
        return cls(config, module.eval(), tokenizer)

    def get_default_sampling_params(self) -> SamplingParams:
        return SamplingParams.from_generation_config(self.config.generation_config)

    # ------------------------------------------------------------------ requests
    def process_prompt(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt: a text prompt needs a tokenizer (the engine was made with "
                                 "skip_tokenizer_init=True); pass {'prompt_token_ids': [...]}")
            text, ids = prompt, self.tokenizer.encode(prompt, add_special_tokens=False)
        elif isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            text, ids = prompt.get("prompt"), prompt["prompt_token_ids"]
            # set(map(type, ...)) runs in C: an agent's 32K-token prompt is checked in ~1 ms, not ~3.5
            if not isinstance(ids, (list, tuple)) or not set(map(type, ids)) <= {int}:
                raise ValueError("prompt_token_ids: must be a list of integers")
            ids = list(ids)
        else:
            raise ValueError(f"prompt: must be a string or a dict with 'prompt_token_ids', got {type(prompt).__name__}")
        if not ids:
            raise ValueError("prompt: is empty (0 tokens)")
        if min(ids) < 0 or max(ids) >= self.vocab_size:
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            raise ValueError(f"prompt_token_ids: token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})")
        return text, ids

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> Request:
        req = self.make_request(request_id, prompt, params, arrival_time)
        self.scheduler.add_request(req)
        return req

    def make_request(self, request_id: str, prompt: PromptType, params: SamplingParams | None = None,
                     arrival_time: float | None = None) -> Request:
        """Validate and build a request without queueing it (the async engine queues it later)."""
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id: must be a non-empty string, got {request_id!r}")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        params = (params or self.get_default_sampling_params()).clone()
        params.validate()
        text, ids = self.process_prompt(prompt)
        sched = self.config.scheduler
        if len(ids) >= sched.max_model_len:
            raise ValueError(f"prompt: {len(ids)} tokens leave no room to generate within "
                             f"max_model_len={sched.max_model_len}")
        total = len(ids) + (params.max_tokens if params.max_tokens is not None else sched.max_model_len)
        if params.max_tokens is not None and total > sched.max_model_len:
            raise ValueError(f"max_tokens: prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds max_model_len={sched.max_model_len}")
        total = min(total, sched.max_model_len)
        need = cdiv(total, self.config.cache.block_size)
        if need > self.runner.num_kv_blocks:
            raise ValueError(f"max_tokens: prompt + max_tokens = {total} tokens need {need} KV blocks, more than "
                             f"the whole cache ({self.runner.num_kv_blocks}); lower max_tokens or grow the cache")
        if params.stop and self.tokenizer is None:
            raise ValueError("stop: stop strings need a tokenizer (skip_tokenizer_init=True); use stop_token_ids")
        params.all_stop_token_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        return Request(request_id, text, ids, params, arrival_time)

    def abort_request(self, request_id: str | list[str]) -> None:
        for rid in [request_id] if isinstance(request_id, str) else request_id:
            if self.scheduler.abort_request(rid) is not None:
                self.scheduler.pop_finished_request(rid)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._errored)

    def get_num_unfinished_requests(self) -> int:
        return len(self.scheduler.requests)

    def get_stats(self, drain: bool = False) -> EngineStats:
        return self.stats.snapshot(self.scheduler, drain)

    def warmup(self, prompt_lens: list[int] | None = None, max_tokens: int = 3) -> float:
        """Run dummy requests through the normal step loop before serving, so the kernels that are
        compiled on first use (Triton JIT, per shape class) are compiled for prefill, chunked-prefill
        and mixed prefill + decode steps (decode is compiled when the CUDA graphs are captured).
        The prompts run together, so short ones decode while long ones are still being chunked.
        Without `prompt_lens`, a second round then runs two prompts of just over half the largest
        prefill graph together: an eager step of short sequences, whose attention takes other tiles
        than the long first round's (`kernels.paged_prefill.prefill_block_n`), and of an odd token
        count (Triton compiles integer arguments divisible by 16 and the others apart; the first
        round's full-budget step is the former).
        Leaves the engine as it was: no request, every block free, nothing added to the prefix
        cache, statistics unchanged. Returns the seconds it took. Only for an idle engine."""
        if self.has_unfinished_requests():
            raise RuntimeError("warmup: the engine has unfinished requests")
        sched = self.config.scheduler
        rounds = [prompt_lens]
        if prompt_lens is None:
            rounds = [[1, 17, 100, 700, sched.max_num_batched_tokens + 300]]
            graph_tokens = self.config.max_prefill_graph_tokens
            half = graph_tokens // 2 + 1
            if 0 < graph_tokens and 2 * half + 1 <= sched.max_num_batched_tokens:
                rounds.append([half, half + 1])
        t0 = time.monotonic()
        for lens in rounds:
            self._warmup_round(lens, max_tokens)
        return time.monotonic() - t0

    def _warmup_round(self, prompt_lens: list[int], max_tokens: int) -> None:
        """One batch of `warmup` prompts (run together; equal lengths get distinct ids)."""
        sched = self.config.scheduler
        limit = sched.max_model_len - max_tokens - 1
        lens = sorted(min(max(1, n), limit) for n in prompt_lens if limit >= 1)
        cap = self.runner.num_kv_blocks * self.config.cache.block_size
        bm, old_stats, preemptions = self.scheduler.block_manager, self.stats, self.scheduler.num_preemptions
        queries, hits = bm.num_cache_queries, bm.num_cache_hits
        caching = self.scheduler.enable_prefix_caching
        self.scheduler.enable_prefix_caching = bm.enable_prefix_caching = False  # no dummy prefixes kept
        self.stats = StatsCollector()
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        try:
            used = 0
            for i, n in enumerate(lens):
                used += n + max_tokens
                if used > cap or i >= sched.max_num_seqs:
                    break
                ids = [(7919 * (i + 1) + 104729 * j) % self.vocab_size for j in range(n)]
                self.add_request(f"__warmup-{i}", {"prompt_token_ids": ids}, params)
            while self.has_unfinished_requests():
                self.step()
        finally:
            self.abort_request([r for r in list(self.scheduler.requests) if r.startswith("__warmup-")])
            self.scheduler.enable_prefix_caching = bm.enable_prefix_caching = caching
            self.stats, self.scheduler.num_preemptions = old_stats, preemptions
            bm.num_cache_queries, bm.num_cache_hits = queries, hits

    # ------------------------------------------------------------------ the loop
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule, run, apply the sampled tokens, make outputs.

        With async scheduling (CUDA default) the next decode step is planned and launched before
        this step's sampled tokens are read back (`Scheduler.schedule_lookahead`), so the host's
        scheduling, input preparation and output processing overlap the GPU's forward pass; the
        launched step is carried to the next `step()` call."""
        outputs = [self._finish_errored(r) for r in self._errored]
        self._errored = []
        cur, self._inflight = self._inflight, None
        if cur is None:
            sched = self.scheduler.schedule()
            if sched.is_empty:
                return outputs
            try:
                cur = self.runner.launch(sched)
            except Exception as e:  # noqa: BLE001 - the engine must survive; the step's requests fail
                return outputs + self._step_failed(sched, e)
        sched = cur.sched
        nxt, nxt_failed = None, None
        if self.config.async_scheduling:
            ahead = self.scheduler.schedule_lookahead(sched)
            if ahead is not None:
                try:
                    nxt = self.runner.launch(ahead, prev=cur)
                except Exception as e:  # noqa: BLE001 - fail its requests once this step's tokens are in
                    nxt_failed = (ahead, e)
        try:
            result = self.runner.collect(cur)
        except Exception as e:  # noqa: BLE001
            if nxt is not None or nxt_failed is not None:
                ahead = nxt.sched if nxt is not None else nxt_failed[0]
                for entry in ahead.seqs:  # their pending tokens will never be read
                    entry.seq.drop_pending()
            return outputs + self._step_failed(sched, e)
        now = time.monotonic()
        for e in sched.seqs:
            if e.start < e.seq.num_prompt_tokens:
                self.stats.prompt_tokens_total += min(e.num_new_tokens, e.seq.num_prompt_tokens - e.start)
            m = e.seq.request.metrics
            if m.first_scheduled_time is None:
                m.first_scheduled_time = now
        updated, snapshots = self.scheduler.update_from_output(sched, result, self.eos_token_ids)
        self.runner.copy_state_slots(snapshots)
        touched: dict[str, Request] = {}
        for seq in updated:
            req = seq.request
            touched[req.request_id] = req
            self.stats.generation_tokens_total += 1
            try:
                stop = self.output_processor.update_text(seq)
                if stop is not None:
                    self.scheduler.finish_seq(seq, *stop)
            except Exception as e:  # noqa: BLE001 - confine the failure to this request
                logger.error("output processing failed for %s: %s", req.request_id, traceback.format_exc())
                self._fail(req, f"output processing failed: {type(e).__name__}: {e}")
        for req in touched.values():
            if req.error is not None:
                continue
            m = req.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                self.stats.ttft.append(now - m.arrival_time)
            m.last_token_time = now
            try:
                out = self.output_processor.make_output(req)
            except Exception as e:  # noqa: BLE001
                logger.error("output processing failed for %s: %s", req.request_id, traceback.format_exc())
                self._fail(req, f"output processing failed: {type(e).__name__}: {e}")
                continue
            if req.is_finished:
                self._on_finished(req, now)
            if out is not None:
                outputs.append(out)
        if nxt_failed is not None:
            logger.error("model step failed: %s", "".join(traceback.format_exception(nxt_failed[1])))
            for req in {e.seq.request.request_id: e.seq.request for e in nxt_failed[0].seqs}.values():
                if not req.is_finished:
                    self._fail(req, f"model step failed: {type(nxt_failed[1]).__name__}: {nxt_failed[1]}")
        if nxt is not None and any(not e.seq.is_finished for e in nxt.sched.seqs):
            self._inflight = nxt  # else every sequence of it finished: its results are not needed
        outputs.extend(self._finish_errored(r) for r in self._take_errored())
        return outputs

    def _step_failed(self, sched: SchedulerOutput, e: Exception) -> list[RequestOutput]:
        logger.error("model step failed: %s", traceback.format_exc())
        reqs = {e_.seq.request.request_id: e_.seq.request for e_ in sched.seqs}
        for req in reqs.values():
            self._fail(req, f"model step failed: {type(e).__name__}: {e}")
        return [self._finish_errored(r) for r in self._take_errored()]

    def _on_finished(self, req: Request, now: float) -> None:
        m = req.metrics
        m.finished_time = now
        self.stats.num_requests_finished += 1
        self.stats.e2e.append(now - m.arrival_time)
        n_out = max(s.num_output_tokens for s in req.seqs)
        if n_out > 1 and m.first_token_time is not None:
            self.stats.tpot.append((now - m.first_token_time) / (n_out - 1))
        self.scheduler.pop_finished_request(req.request_id)

    def _fail(self, req: Request, message: str) -> None:
        req.error = message
        self.scheduler.abort_request(req.request_id)
        self._errored.append(req)

    def _take_errored(self) -> list[Request]:
        errored, self._errored = self._errored, []
        return errored

    def _finish_errored(self, req: Request) -> RequestOutput:
        self.scheduler.pop_finished_request(req.request_id)
        self.stats.num_requests_finished += 1
        from qwen3coder.engine.outputs import CompletionOutput

        outs = [CompletionOutput(s.index, "", list(s.output_token_ids), None, None, "abort", None)
                for s in req.seqs]
        return RequestOutput(req.request_id, req.prompt, list(req.prompt_token_ids), outs, True,
                             metrics=req.metrics, error=req.error)


def resolve_model_path(model: str | None) -> str:
    import os

    if model is None:
        import qwen3coder

        finder = getattr(qwen3coder, "default_model_path", None)
        if finder is None:
            raise ValueError("model: no path given and qwen3coder.default_model_path() is not available; "
                             "pass LLM(model='/path/to/checkpoint')")
        model = finder()
        if model is None or not os.path.isdir(model):
            raise ValueError(f"model: no path given and the default checkpoint {model!r} does not exist; "
                             "download it or pass LLM(model='/path/to/checkpoint')")
    model = os.fspath(model)
    if not os.path.isdir(model):
        raise ValueError(f"model: checkpoint directory {model!r} does not exist")
    return model
