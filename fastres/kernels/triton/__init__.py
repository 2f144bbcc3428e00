"""Triton kernels (one file per kernel family) live here; none yet."""
