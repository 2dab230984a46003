"""Per-step batch layout shared by every layer: vLLM's "attention metadata".

The engine flattens the tokens of all scheduled sequences into one 1-D batch (`input_ids [N]`,
`positions [N]`). A `ForwardContext` says which tokens belong to which sequence, where their keys
and values go in the paged KV cache (`slot_mapping`), which cache blocks each sequence owns
(`block_tables`), and which recurrent-state slot each sequence uses in the Gated DeltaNet layers
(`state_indices`). Without a cache (`slot_mapping is None`) every sequence attends only to its own
new tokens: that is the plain reference forward.

Sequence s owns tokens `query_start_loc[s] : query_start_loc[s+1]`; they sit at the last
`query_len` positions of a sequence that is `seq_lens[s]` tokens long after this step, so
`seq_lens[s] - query_len` tokens were already cached (a prefix-cache hit, an earlier prefill chunk,
or the decode history).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def host_to_device(data: list, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A tensor of host values on `device`. On CUDA the values go through pinned memory with a
    non-blocking copy, so building a step's inputs never waits for the GPU (async scheduling
    prepares step n+1 while step n runs); `torch.tensor(..., device="cuda")` would synchronise."""
    if torch.device(device).type == "cuda":
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


@dataclass
class ForwardContext:
    query_start_loc: torch.Tensor  # [S+1] int32, cumulative new-token counts
    seq_lens: torch.Tensor  # [S] int32, tokens per sequence after this step (cached + new)
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    # paged KV cache (None: no cache, sequences attend within their new tokens only)
    slot_mapping: torch.Tensor | None = None  # [N] int64, cache slot of each new token (-1: don't store)
    block_tables: torch.Tensor | None = None  # [S, max_blocks] int32, -1 padded
    # Gated DeltaNet recurrent + conv state (None: zero state, not stored)
    state_indices: torch.Tensor | None = None  # [S] int64 state slot per sequence
    has_initial_state_cpu: list[bool] | None = None  # continue from the slot's state (else start at zero)
    # rows of the hidden states whose logits are wanted (None: all)
    logits_indices: torch.Tensor | None = None
    # prefill CUDA graphs: the varlen attention's work list (`kernels.paged_prefill.build_tile_map`, with
    # `tile_block_m` query rows per tile); None: the grid follows `query_lens_cpu`
    tile_map: torch.Tensor | None = None
    tile_block_m: int = 0

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens_cpu)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens_cpu)

    @property
    def uses_cache(self) -> bool:
        return self.slot_mapping is not None

    @property
    def is_decode(self) -> bool:
        """Every sequence adds exactly one token on top of a cached history."""
        return all(q == 1 for q in self.query_lens_cpu) and self.uses_cache

    @property
    def context_lens_cpu(self) -> list[int]:
        """Tokens already cached before this step, per sequence."""
        return [s - q for s, q in zip(self.seq_lens_cpu, self.query_lens_cpu)]

    @classmethod
    def no_cache(cls, query_lens: list[int], device: torch.device | str) -> "ForwardContext":
        """Layout for a plain forward over whole sequences (no KV cache, zero recurrent state)."""
        loc = [0]
        for q in query_lens:
            loc.append(loc[-1] + q)
        return cls(
            query_start_loc=torch.tensor(loc, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(query_lens, dtype=torch.int32, device=device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(query_lens),
        )

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]] | None,
        block_size: int,
        state_indices: list[int] | None = None,
        has_initial_state: list[bool] | None = None,
        device: torch.device | str = "cpu",
        only_last_logits: bool = True,
    ) -> "ForwardContext":
        """Build a cached-step layout from host lists (used by the model runner and tests).

        Token t of sequence s (position `seq_lens[s] - query_lens[s] + t`) is stored at
        `block_tables[s][pos // block_size] * block_size + pos % block_size`.
        """
        assert len(query_lens) == len(seq_lens)
        loc = [0]
        for q in query_lens:
            loc.append(loc[-1] + q)
        slot_mapping = bt = None
        if block_tables is not None:
            slots: list[int] = []
            for q, s, table in zip(query_lens, seq_lens, block_tables):
                for pos in range(s - q, s):
                    slots.append(table[pos // block_size] * block_size + pos % block_size)
            width = max((len(t) for t in block_tables), default=0) or 1
            padded = [list(t) + [-1] * (width - len(t)) for t in block_tables]
            slot_mapping = host_to_device(slots, torch.int64, device)
            bt = host_to_device(padded, torch.int32, device)
        logits_indices = None
        if only_last_logits:
            logits_indices = host_to_device([x - 1 for x in loc[1:]], torch.int64, device)
        return cls(
            query_start_loc=host_to_device(loc, torch.int32, device),
            seq_lens=host_to_device(seq_lens, torch.int32, device),
            query_lens_cpu=list(query_lens),
            seq_lens_cpu=list(seq_lens),
            slot_mapping=slot_mapping,
            block_tables=bt,
            state_indices=None if state_indices is None
            else host_to_device(state_indices, torch.int64, device),
            has_initial_state_cpu=None if has_initial_state is None else list(has_initial_state),
            logits_indices=logits_indices,
        )
