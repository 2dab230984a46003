"""Engine statistics for logging and the server's /metrics: queue sizes, KV usage, token counters,
and time-to-first-token / time-per-output-token observations."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0  # fraction of KV blocks referenced by live sequences
    num_kv_blocks: int = 0
    prefix_cache_queries: int = 0  # tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of which found
    num_preemptions: int = 0
    prompt_tokens_total: int = 0  # prompt tokens computed (cache hits excluded)
    generation_tokens_total: int = 0
    num_requests_finished: int = 0
    ttft_seconds: list[float] = field(default_factory=list)  # observations since the last drain
    tpot_seconds: list[float] = field(default_factory=list)
    e2e_seconds: list[float] = field(default_factory=list)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0


class StatsCollector:
    """Counters plus bounded buffers of latency observations (drained by whoever reports them)."""

    def __init__(self, max_observations: int = 10000):
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_requests_finished = 0
        self.ttft: deque[float] = deque(maxlen=max_observations)
        self.tpot: deque[float] = deque(maxlen=max_observations)
        self.e2e: deque[float] = deque(maxlen=max_observations)

    def snapshot(self, scheduler, drain: bool) -> EngineStats:
        bm = scheduler.block_manager
        stats = EngineStats(
            num_running=len(scheduler.running), num_waiting=len(scheduler.waiting),
            kv_cache_usage=bm.usage, num_kv_blocks=bm.num_blocks,
            prefix_cache_queries=bm.num_cache_queries, prefix_cache_hits=bm.num_cache_hits,
            num_preemptions=scheduler.num_preemptions, prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_requests_finished=self.num_requests_finished,
            ttft_seconds=list(self.ttft), tpot_seconds=list(self.tpot), e2e_seconds=list(self.e2e))
        if drain:
            self.ttft.clear()
            self.tpot.clear()
            self.e2e.clear()
        return stats
