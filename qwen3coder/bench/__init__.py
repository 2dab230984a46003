"""Benchmarks at the real model shapes: `qwen3coder bench` (decode, TTFT, offline, transformers
comparison, profile by kernel family). `benchmarks/` holds the scripts and their JSON results."""
