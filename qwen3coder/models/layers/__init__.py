"""Building blocks shared by the Qwen3-MoE and Qwen3-Next models."""
