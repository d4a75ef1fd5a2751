"""InfLLM v2 sparse attention: one entry point for the model code.

The Triton kernels (kernel issue) will be picked here on CUDA; until then every device runs the
plain-PyTorch reference, which is the definition the kernels are tested against.
"""

from __future__ import annotations

import torch

from cpm4.model.config import SparseConfig

from .reference import compress_keys, infllm_v2_attention, kernel_means, num_kernels

__all__ = ["sparse_attention", "compress_keys", "kernel_means", "num_kernels"]


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: SparseConfig,
                     scale: float | None = None, k1: torch.Tensor | None = None,
                     k2: torch.Tensor | None = None) -> torch.Tensor:
    """InfLLM v2 attention of the last q.shape[0] tokens of one sequence (see reference.py)."""
    return infllm_v2_attention(q, k, v, cfg, scale=scale, k1=k1, k2=k2)
