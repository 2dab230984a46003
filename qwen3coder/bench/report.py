"""A benchmark run as a table: the scenarios of `qwen3coder bench` with their units, the transformers
figures of the same run and, for the 30B-A3B preset, the targets set for it (issue 7, 1x H100); then
where the decode time goes (`--profile`), per kernel family.

`qwen3coder bench` prints it after every run; `qwen3coder bench --report RUN.json [--markdown]` prints
it for a saved run (Markdown for the README's "Measured" section).
"""

from __future__ import annotations

import json
from typing import Any

# (metric key, scenario, unit, transformers key of the same run)
SCENARIOS: list[tuple[str, str, str, str | None]] = [
    ("decode_bs1_tok_s", "decode, batch 1 (128-token prompt)", "tok/s", "transformers_decode_bs1_tok_s"),
    ("decode_bs1_nopdl_tok_s", "decode, batch 1, without PDL", "tok/s", None),
    ("decode_bs1_sync_tok_s", "decode, batch 1, async scheduling off", "tok/s", None),
    ("hbm_fraction_bs1", "batch-1 fraction of the copy bandwidth", "", None),
    ("decode_bs16_tok_s", "decode, batch 16", "tok/s", "transformers_decode_bs16_tok_s"),
    ("decode_bs16_nopdl_tok_s", "decode, batch 16, without PDL", "tok/s", None),
    ("decode_bs64_tok_s", "decode, batch 64", "tok/s", None),
    ("ttft_ms_1k", "time to first token, 1K prompt", "ms", None),
    ("ttft_ms_8k", "time to first token, 8K prompt", "ms", None),
    ("ttft_ms_32k", "time to first token, 32K prompt", "ms", None),
    ("offline_10x2048x1024_output_tok_s", "offline 10 x 2,048 in / 1,024 out", "output tok/s", None),
    ("offline_10x2048x1024_prefill_s", "  its prefill (one output token)", "s", None),
    ("offline_10x2048x1024_decode_step_ms", "  its decode steps", "ms / step", None),
    ("offline_64x1024x128_total_tok_s", "offline 64 x 1,024 in / 128 out", "total tok/s", None),
    ("offline_64x1024x128_prefill_s", "  its prefill (one output token)", "s", None),
    ("offline_64x1024x128_decode_step_ms", "  its decode steps", "ms / step", None),
    ("online_output_tok_s", "online through the server", "output tok/s", None),
    ("online_ttft_ms_p50", "online time to first token, p50", "ms", None),
    ("online_ttft_ms_p99", "online time to first token, p99", "ms", None),
]

# the targets for the 30B-A3B preset on 1x H100 (bf16, dummy weights)
TARGETS: dict[str, dict[str, float]] = {
    "30b-a3b": {"decode_bs1_tok_s": 350, "decode_bs16_tok_s": 1080, "offline_10x2048x1024_output_tok_s": 800,
                "offline_64x1024x128_total_tok_s": 20000},
}


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and value < 10:
        return f"{value:.3g}"
    if isinstance(value, (int, float)):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.1f}"
    return str(value)


def _render(header: list[str], rows: list[list[str]], markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return lines + ["| " + " | ".join(r) + " |" for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return [line(header), "-" * len(line(header))] + [line(r) for r in rows]


def format_report(record: dict[str, Any], markdown: bool = False) -> str:
    """The run's scenarios (those it measured), then its profile by kernel family, as text lines."""
    metrics = record.get("metrics", {})
    targets = TARGETS.get(record.get("preset", ""), {})
    has_tf = any(tf and metrics.get(tf) is not None for _, _, _, tf in SCENARIOS)
    header = ["scenario", "qwen3coder", "unit"] + (["transformers"] if has_tf else []) + \
        (["target (1x H100)"] if targets else [])
    rows = []
    for key, name, unit, tf in SCENARIOS:
        if metrics.get(key) is None:
            continue
        row = [name, _fmt(metrics[key]), unit]
        if has_tf:
            row.append(_fmt(metrics.get(tf)) if tf else "")
        if targets:
            row.append(f">= {targets[key]:,}" if key in targets else "")
        rows.append(row)
    out = [f"{record.get('name', 'bench')} on {record.get('device', '?')}, commit {record.get('commit', '?')}, "
           f"{record.get('date', '?')}"]
    out += _render(header, rows, markdown)
    for name, prof in (record.get("profile") or {}).items():
        families = prof.get("families_ms_per_step") or {}
        if not families:
            continue
        total = prof.get("kernel_ms_per_step") or sum(families.values())
        replay = [f"{label} {prof[k]} ms" for k, label in (("graph_replay_nopdl_ms", "graph replay without PDL"),
                                                           ("graph_replay_ms", "with PDL")) if prof.get(k)]
        out += ["", f"{name}: {total:.3f} ms of kernels per step" + (f" ({', '.join(replay)})" if replay else "")]
        rows = [[fam, f"{ms:.3f}", f"{100 * ms / total:.0f}%" if total else ""]
                for fam, ms in sorted(families.items(), key=lambda kv: -kv[1])]
        out += _render(["kernel family", "ms / step", "share"], rows, markdown)
    return "\n".join(out)


def report_file(path: str, markdown: bool = False) -> str:
    """`format_report` of a saved run (a `bench_decode_*.json`)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read benchmark result {path!r}: {e}") from e
    if not isinstance(record, dict) or not isinstance(record.get("metrics"), dict):
        raise ValueError(f"{path!r} is not a benchmark result (no 'metrics' object)")
    return format_report(record, markdown)
