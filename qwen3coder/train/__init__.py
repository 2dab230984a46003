"""Training pipeline of the bundled default model (issue 6): data → tokenizer → pretrain → SFT → export.

Stages are importable modules, each usable on its own; `pipeline.run_pipeline(profile, out_dir)`
runs them all, `qwen3coder train --profile cpu-smoke|gpu --out DIR` from the command line.

* `data`        offline code corpus (stdlib, site-packages, system headers): filters, dedup, split
* `dedup`       exact hashing and MinHash/LSH near-duplicate detection
* `tokenizer`   byte-level BPE with Qwen3's control tokens; corpus → packed token stream
* `fim`         the fill-in-the-middle (PSM) transform used in pretraining
* `model_utils` weight init, training MoE dispatch, load-balancing loss, FLOPs
* `loop`        the shared optimisation loop (AdamW, schedule, budget, checkpoints, metrics)
* `pretrain`    packed-sequence pretraining
* `sft_data`    conversations generated from the corpus; `sft` the assistant-only fine-tuning
* `chat_template` the model's chat template (Qwen3-Coder format)
* `export`      the Hugging Face checkpoint directory
* `profiles`    `cpu-smoke` and `gpu` settings as dataclasses
"""
