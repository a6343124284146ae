"""Benchmarks of gfpo-fast against torch, torch.compile, TRL and Liger-Kernel (``python -m bench``; see README.md)."""
