"""Compute kernels. Each fast (Triton) kernel sits beside the plain-PyTorch reference it is tested against."""
