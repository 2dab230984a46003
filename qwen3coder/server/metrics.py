"""`GET /metrics` in the Prometheus text exposition format (hand-written, no dependency).

Engine-side figures come from `AsyncLLMEngine.get_stats()`; latency observations are drained from
the engine into cumulative histograms here (on every scrape and every few seconds in the
background, so nothing is lost between scrapes). Server-side counters count HTTP requests by
route and status. Names follow vLLM's, under the `qwen3coder:` prefix:

    qwen3coder:num_requests_running / num_requests_waiting       gauges
    qwen3coder:kv_cache_usage_perc (0..1), qwen3coder:num_kv_blocks, qwen3coder:num_kv_blocks_used
    qwen3coder:prompt_tokens_total / generation_tokens_total        counters
    qwen3coder:request_success_total, qwen3coder:num_preemptions_total, qwen3coder:prefix_cache_*_total
    qwen3coder:time_to_first_token_seconds, time_per_output_token_seconds, e2e_request_latency_seconds
    qwen3coder:http_requests_total{route,method,status}
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Any

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0)
PREFIX = "qwen3coder:"


class Histogram:
    def __init__(self, name: str, help_text: str, buckets: tuple[float, ...]):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        running = 0
        for bound, count in zip(self.buckets, self.counts):
            running += count
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {running}')
        lines.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.n}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.total}")
        lines.append(f"{self.name}_count{{{labels}}} {self.n}")
        return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    def __init__(self, engine: Any, model_name: str):
        self.engine = engine
        self.labels = f'model_name="{_escape(model_name)}"'
        self.http: Counter[tuple[str, str, int]] = Counter()
        self._lock = threading.Lock()
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Time per output token.", TPOT_BUCKETS)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)

    def record_http(self, route: str, method: str, status: int) -> None:
        with self._lock:
            self.http[(route, method, status)] += 1

    def drain(self) -> Any:
        stats = self.engine.get_stats(drain=True)
        with self._lock:
            for hist, values in ((self.ttft, stats.ttft_seconds), (self.tpot, stats.tpot_seconds),
                                 (self.e2e, stats.e2e_seconds)):
                for v in values:
                    hist.observe(v)
        return stats

    def render(self) -> str:
        s = self.drain()
        lab = self.labels
        lines: list[str] = []

        def metric(name: str, kind: str, help_text: str, value: float) -> None:
            lines.extend([f"# HELP {PREFIX}{name} {help_text}", f"# TYPE {PREFIX}{name} {kind}",
                          f"{PREFIX}{name}{{{lab}}} {value}"])

        metric("num_requests_running", "gauge", "Requests running on the engine.", s.num_running)
        metric("num_requests_waiting", "gauge", "Requests waiting to be scheduled.", s.num_waiting)
        metric("kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", s.kv_cache_usage)
        metric("num_kv_blocks", "gauge", "KV-cache blocks in the pool.", s.num_kv_blocks)
        metric("num_kv_blocks_used", "gauge", "KV-cache blocks held by live sequences.",
               round(s.kv_cache_usage * s.num_kv_blocks))
        metric("prompt_tokens_total", "counter", "Prompt tokens computed (prefix-cache hits excluded).",
               s.prompt_tokens_total)
        metric("generation_tokens_total", "counter", "Generated tokens.", s.generation_tokens_total)
        metric("request_success_total", "counter", "Requests finished by the engine.", s.num_requests_finished)
        metric("num_preemptions_total", "counter", "Sequences preempted.", s.num_preemptions)
        metric("prefix_cache_queries_total", "counter", "Tokens looked up in the prefix cache.",
               s.prefix_cache_queries)
        metric("prefix_cache_hits_total", "counter", "Tokens found in the prefix cache.", s.prefix_cache_hits)
        with self._lock:
            for hist in (self.ttft, self.tpot, self.e2e):
                lines.extend(hist.render(lab))
            name = PREFIX + "http_requests_total"
            lines += [f"# HELP {name} HTTP requests by route, method and status.", f"# TYPE {name} counter"]
            for (route, method, status), count in sorted(self.http.items()):
                lines.append(f'{name}{{{lab},route="{_escape(route)}",method="{method}",status="{status}"}} {count}')
        return "\n".join(lines) + "\n"
