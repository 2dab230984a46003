"""`qwen3coder bench` on the tiny preset (CPU smoke run): every scenario runs and the JSON is complete."""

from __future__ import annotations

import json
import subprocess
import sys

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
                "online_output_tok_s", "online_ttft_ms_p50"):
        assert m[key] > 0, key
    prof = record["profile"]["decode_bs1"]
    assert prof["steps"] > 0 and abs(sum(prof["families_share"].values()) - 1.0) < 0.01
    pre = record["profile"]["prefill_2x128"]
    assert pre["steps"] >= 1 and pre["prefill_tok_s"] > 0 and pre["families_ms_per_step"]


def test_kernel_families():
    assert family_of("_paged_decode_kernel") == "attention"
    assert family_of("_paged_prefill_kernel") == "attention"
    assert family_of("_qk_norm_rope_store_kernel") == "attention"  # the fused prologue, not a norm
    assert family_of("_grouped_gemm_kernel") == "fused_moe"
    assert family_of("_gate_up_swiglu_kernel") == "fused_moe"
    assert family_of("_down_proj_kernel") == "fused_moe"
    assert family_of("_fused_route_align_kernel") == "moe_routing"
    for name in ("_route_align_topk_kernel", "_route_align_scan_kernel", "_route_align_scatter_kernel"):
        assert family_of(name) == "moe_routing"
    assert family_of("nvjet_tst_128x64_64x4_1x1_v_bz_coopA_NTN") == "gemm"
    assert family_of("void at::native::sbtopk::gatherTopK<float>") == "moe_routing"
    assert family_of("_add_rmsnorm_kernel") == "norm"
