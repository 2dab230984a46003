"""Engine-side bookkeeping for requests: `Request` (one prompt, its params, its samples) and
`Sequence` (one sample: its tokens, how many are in the KV cache, its block table and state slot).

A request with `n > 1` starts as one sequence that runs the prefill; when the prompt is done the
other `n - 1` samples are forked from it (see `Scheduler`), sharing its KV blocks.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import time
from array import array
from typing import TYPE_CHECKING, Any

from qwen3coder.engine.outputs import RequestMetrics, SampleLogprobs
from qwen3coder.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    import torch

_seq_ids = itertools.count()
PENDING_TOKEN = -1  # placeholder id of a sampled token the host has not read yet (async scheduling)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not holding cache (new or preempted)
    RUNNING = "running"
    FINISHED = "finished"


def hash_block(parent: bytes | None, token_ids: "list[int] | tuple[int, ...] | memoryview") -> bytes:
    """Chained hash of one full block: identifies the whole prefix ending with this block. The tokens
    as a list, or already as int64 bytes (a slice of `array("q", tokens)`)."""
    h = hashlib.blake2b(digest_size=16)
    if parent is not None:
        h.update(parent)
    h.update(token_ids if isinstance(token_ids, memoryview) else array("q", token_ids).tobytes())
    return h.digest()


class Sequence:
    def __init__(self, request: "Request", index: int, token_ids: list[int]):
        self.seq_id = next(_seq_ids)
        self.request = request
        self.index = index  # sample index within the request (CompletionOutput.index)
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0  # tokens whose K/V (and recurrent state) are in the cache
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of token_ids
        self.num_registered_blocks = 0  # leading blocks already registered in the prefix cache
        self.state_slot = -1  # hybrid models: recurrent-state slot (-1: none)
        self.snapshot_at = 0  # hybrid prefix caching: token count at which to snapshot the state
        self.generator: "torch.Generator | None" = None
        self.logprobs: SampleLogprobs | None = [] if request.params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        # async scheduling: the last entry of `token_ids` is a placeholder for a token the GPU has
        # sampled but the host has not read yet (the next step is already running on it)
        self.has_pending_token = False

    # ------------------------------------------------------------------ sizes
    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def in_prefill(self) -> bool:
        """Prompt tokens (or recomputed history) still to be fed in chunks."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    def compute_block_hashes(self, block_size: int) -> list[bytes]:
        """Extend `block_hashes` to cover every full block of known `token_ids` (a pending
        placeholder is never hashed)."""
        full = (len(self.token_ids) - self.has_pending_token) // block_size
        done = len(self.block_hashes)
        if full <= done:
            return self.block_hashes
        # the new blocks' tokens as bytes in one conversion, hashed block by block (`hash_block`'s bytes)
        data = memoryview(array("q", self.token_ids[done * block_size:full * block_size]).tobytes())
        step = block_size * 8
        parent = self.block_hashes[-1] if done else None
        for i in range(full - done):
            parent = hash_block(parent, data[i * step:(i + 1) * step])
            self.block_hashes.append(parent)
        return self.block_hashes

    def append_token(self, token_id: int) -> None:
        """Add a sampled token, or resolve the pending placeholder with it."""
        if self.has_pending_token:
            self.token_ids[-1] = token_id
            self.has_pending_token = False
        else:
            self.token_ids.append(token_id)

    def append_pending(self) -> None:
        """Async scheduling: reserve the place of a token sampled on the GPU, not yet read."""
        assert not self.has_pending_token, "at most one token may be pending"
        self.token_ids.append(PENDING_TOKEN)
        self.has_pending_token = True

    def drop_pending(self) -> None:
        """Async scheduling: forget a pending placeholder whose token will never be read."""
        if self.has_pending_token:
            self.token_ids.pop()
            self.has_pending_token = False

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, req={self.request.request_id}, idx={self.index}, "
                f"len={len(self)}, computed={self.num_computed_tokens}, status={self.status.value})")


class Request:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.metrics = RequestMetrics(arrival_time=time.monotonic() if arrival_time is None else arrival_time)
        self.seqs: list[Sequence] = [Sequence(self, 0, prompt_token_ids)]
        self.pending_forks = params.n - 1  # samples still to fork from seqs[0] after its prefill
        self.prompt_logprobs: list[Any] | None = [None] if params.prompt_logprobs is not None else None
        self.error: str | None = None
        self.output_state: Any = None  # owned by the OutputProcessor

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.pending_forks == 0 and all(s.is_finished for s in self.seqs)

    def __repr__(self) -> str:
        return f"Request({self.request_id!r}, prompt_len={self.num_prompt_tokens}, n={self.params.n})"
