"""`qwen3coder bench` on the tiny preset (CPU smoke run): every scenario runs and the JSON is complete;
the kernel-family names of the profiler; the CPU mode of benchmarks/bench_qk_norm_rope.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3coder.bench.profile import family_of


def test_bench_quick_cpu_with_profile(tmp_path):
    r = subprocess.run([sys.executable, "-m", "qwen3coder.cli", "bench", "--preset", "tiny", "--device", "cpu",
                        "--quick", "--profile", "--online-concurrency", "4", "--skip", "decode_bs64,offline_64x1024x128",
                        "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = tmp_path.glob("bench_decode_tiny-*.json")
    record = json.loads(path.read_text())
    for key in ("device", "date", "commit", "command", "preset", "metrics"):
        assert key in record
    assert not record["errors"], record["errors"]
    m = record["metrics"]
    for key in ("decode_bs1_tok_s", "decode_bs16_tok_s", "ttft_ms_1k", "offline_10x2048x1024_output_tok_s",
                "offline_10x2048x1024_prefill_s", "offline_10x2048x1024_decode_step_ms",
                "online_output_tok_s", "online_ttft_ms_p50"):
        assert m[key] > 0, key
    prof = record["profile"]["decode_bs1"]
    assert prof["steps"] > 0 and abs(sum(prof["families_share"].values()) - 1.0) < 0.01
    pre = record["profile"]["prefill_2x128"]
    assert pre["steps"] >= 1 and pre["prefill_tok_s"] > 0 and pre["families_ms_per_step"]
    assert "decode, batch 1 (128-token prompt)" in r.stdout and "kernel family" in r.stdout  # the table
    # the saved run's table again, as Markdown, without measuring anything
    again = subprocess.run([sys.executable, "-m", "qwen3coder.cli", "bench", "--report", str(path), "--markdown"],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "| decode, batch 16 |" in again.stdout and "|---|" in again.stdout
    bad = subprocess.run([sys.executable, "-m", "qwen3coder.cli", "bench", "--report", str(tmp_path / "nope.json")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "cannot read benchmark result" in bad.stderr and "Traceback" not in bad.stderr


def test_graph_replay_takes_the_batch_bucket(monkeypatch):
    """`graph_replay_ms(llm, batch)` replays the graph of the smallest bucket that holds `batch`, on
    the step its static inputs hold; None without graphs or without a bucket that large."""
    from types import SimpleNamespace

    from qwen3coder.bench import profile, timing

    events = []

    class Runner:
        graphs = {1: "graph-1", 2: "graph-2", 16: "graph-16"}

    llm = SimpleNamespace(llm_engine=SimpleNamespace(runner=Runner()))
    monkeypatch.setattr(timing, "replay_ms", lambda graph, iters: events.append(("replay", graph)) or 1.23456)
    assert profile.graph_replay_ms(llm, 10) == 1.235
    assert events == [("replay", "graph-16")]
    events.clear()
    assert profile.graph_replay_ms(llm, 1) == 1.235 and events == [("replay", "graph-1")]
    assert profile.graph_replay_ms(llm, 17) is None  # no bucket that large
    Runner.graphs = {}
    assert profile.graph_replay_ms(llm, 1) is None


def test_replay_with_pdl_recaptures_around_the_replay(monkeypatch):
    """The PDL replay of a profiled step: graphs recaptured with PDL (the static inputs, i.e. the step,
    kept), one replay measure, then recaptured without PDL again, even when the measure fails."""
    from types import SimpleNamespace

    from qwen3coder.bench import profile, timing
    from qwen3coder.kernels import pdl

    events = []

    class Runner:
        graphs = {16: "graph-16"}

        def recapture_graphs(self):
            events.append(("recapture", pdl.pdl_enabled()))

    llm = SimpleNamespace(llm_engine=SimpleNamespace(runner=Runner()))
    before = pdl.pdl_enabled()
    try:
        pdl.set_pdl_enabled(False)
        monkeypatch.setattr(timing, "replay_ms", lambda graph, iters: events.append(("replay", pdl.pdl_enabled()))
                            or 2.0)
        assert profile._replay_with_pdl(llm, 10) == 2.0
        assert events == [("recapture", True), ("replay", True), ("recapture", False)]
        assert not pdl.pdl_enabled()
        events.clear()
        monkeypatch.setattr(timing, "replay_ms", lambda graph, iters: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            profile._replay_with_pdl(llm, 10)
        assert events == [("recapture", True), ("recapture", False)] and not pdl.pdl_enabled()
    finally:
        pdl.set_pdl_enabled(before)


def test_kernel_families():
    assert family_of("_paged_decode_kernel") == "attention"
    assert family_of("_paged_prefill_kernel") == "attention"
    assert family_of("_qk_norm_rope_store_kernel") == "attention"  # the fused prologue, not a norm
    assert family_of("_grouped_gemm_kernel") == "fused_moe"
    assert family_of("_gate_up_swiglu_kernel") == "fused_moe"
    assert family_of("_down_proj_kernel") == "fused_moe"
    assert family_of("_fused_route_align_kernel") == "moe_routing"
    assert family_of("_norm_router_route_kernel") == "moe_routing"  # norm + router GEMV + routing
    assert family_of("_gemv_kernel") == "gemm"
    assert family_of("_moe_gate_up_gemv_kernel") == family_of("_moe_down_gemv_kernel") == "fused_moe"
    assert family_of("_gate_up_gemv_kernel") == family_of("_down_gemv_kernel") == "fused_moe"  # older names
    for name in ("_route_align_topk_kernel", "_route_align_scan_kernel", "_route_align_scatter_kernel"):
        assert family_of(name) == "moe_routing"
    assert family_of("nvjet_tst_128x64_64x4_1x1_v_bz_coopA_NTN") == "gemm"
    assert family_of("void at::native::sbtopk::gatherTopK<float>") == "moe_routing"
    assert family_of("_add_rmsnorm_kernel") == "norm"
    assert family_of("_skinny_gemm_kernel") == "gemm"
    assert family_of("_skinny_gemm_reduce_kernel") == "gemm"


def test_bench_qk_norm_rope_cpu_smoke(tmp_path):
    """benchmarks/bench_qk_norm_rope.py in its CPU mode (Triton's interpreter, two token counts, a
    two-tile sweep): it runs, the fused kernel agrees with the unfused path, the JSON is complete."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "bench_qk_norm_rope.py"), "--device", "cpu",
                        "--quick", "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=600,
                       cwd=root, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    (path,) = tmp_path.glob("qk_norm_rope_30b-a3b-*.json")
    record = json.loads(path.read_text())
    assert record["shape"]["heads"] == 32 and set(record["metrics"]) == {"n1", "n3"}
    for row in record["metrics"].values():
        assert row["launch"] == "t1h1k1w1"
        assert row["max_abs_diff_q"] <= 2e-3 and row["max_abs_diff_kv"] <= 2e-3  # fp16: an ulp or two
        for key in ("fused_us", "fused_per_row_us", "unfused_us"):
            assert row[key] > 0
        assert set(row["sweep_us"]) == {"t8h4k4w8", "t16h4k4w8"}


def test_decode_variants_cpu_smoke(tmp_path):
    """benchmarks/bench_decode_variants.py on the tiny preset (CPU): the baseline first and last, every
    requested variant measured, the patched settings restored."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_decode_variants as bdv
    finally:
        sys.path.pop(0)
    from qwen3coder.kernels import fused_moe, gemv, pdl

    before = (pdl._MODE, fused_moe._DECODE_TINY, gemv.TUNED)
    path = bdv.main(["--preset", "tiny", "--device", "cpu", "--variants",
                     "pdl_wait_first,baseline,moe_tiles_down128+no_gemv", "--batches", "1,2", "--out-len", "16",
                     "--prompt-len", "40", "--max-model-len", "256", "--out-dir", str(tmp_path)])
    record = json.loads(Path(path).read_text())
    assert list(record["metrics"]) == ["baseline", "pdl_wait_first", "baseline_2", "moe_tiles_down128+no_gemv",
                                       "baseline_end"]  # repeats keep their own keys
    assert record["prompt_len"] == 40
    assert not record["errors"]
    assert all(v["decode_bs1_tok_s"] > 0 and v["decode_bs2_tok_s"] > 0 for v in record["metrics"].values())
    assert (pdl._MODE, fused_moe._DECODE_TINY, gemv.TUNED) == before
    with pytest.raises(SystemExit):
        bdv.main(["--variants", "nope", "--device", "cpu"])


def test_bench_decode_attention_configs():
    """benchmarks/bench_decode_attention.py's launch grid: split policies (graph, programs per SM, a fixed
    count) x stages x warps x floors, their labels, and the split count each policy gives."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    try:
        import bench_decode_attention as bda
    finally:
        sys.path.pop(0)
    from qwen3coder.kernels import paged_attention as pa

    configs = bda.parse_configs("graph,pps4,1", "1,3", "4", "1,2")
    assert len(configs) == 12 and configs[0] == ("graph", 1, 4, 1) and configs[-1] == ("1", 3, 4, 2)
    assert [bda.config_label(c) for c in configs[:2]] == ["graph/st1/w4", "graph/st1/w4/mt2"]
    with pytest.raises(SystemExit):
        bda.parse_configs("pps", "3", "4", "1")
    cpu = torch.device("cpu")  # 8 stand-in SMs
    before = pa.PROGRAMS_PER_SM
    assert bda.split_count("graph", 1, 32768, cpu) == pa.choose_num_splits(1, 4, 32768, cpu) == 4
    assert bda.split_count("pps8", 1, 32768, cpu) == 16 and pa.PROGRAMS_PER_SM == before  # restored
    assert bda.split_count("7", 16, 32768, cpu) == 7


def test_report_table_columns():
    """`bench.report.format_report`: only measured scenarios, the transformers column where the run has it,
    the H100 targets for the 30B-A3B preset only, the profile's families by time."""
    from qwen3coder.bench.report import format_report

    record = {"name": "bench_decode_30b-a3b", "preset": "30b-a3b", "device": "GPU", "commit": "abc",
              "date": "today", "metrics": {"decode_bs1_tok_s": 383.2, "transformers_decode_bs1_tok_s": 9.28,
                                           "ttft_ms_1k": 60.0, "offline_64x1024x128_total_tok_s": 21223.9},
              "profile": {"decode_bs1": {"families_ms_per_step": {"gemm": 0.5, "fused_moe": 1.5},
                                         "kernel_ms_per_step": 2.0, "graph_replay_ms": 2.5}}}
    text = format_report(record)
    lines = text.splitlines()
    assert lines[1].split()[:3] == ["scenario", "qwen3coder", "unit"] and "transformers" in lines[1]
    row = next(line for line in lines if line.startswith("decode, batch 1 "))
    assert "383" in row and "9.28" in row and ">= 350" in row
    assert "21,224" in next(line for line in lines if line.startswith("offline 64"))
    assert "decode, batch 16" not in text  # not measured: no row
    assert text.index("fused_moe") < text.index("gemm ") and "75%" in text
    md = format_report({**record, "preset": "tiny", "metrics": {"decode_bs1_tok_s": 50.0}}, markdown=True)
    assert "target" not in md and "transformers" not in md and "| decode, batch 1 (128-token prompt) | 50.0 |" in md
