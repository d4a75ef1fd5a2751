"""A preallocated, contiguous KV cache for batch generation (one allocation up front, reused).

Per layer it holds post-RoPE keys and values `[batch, max_len, kv_heads, head_dim]` and, for models with
InfLLM v2, the semantic-kernel keys, which grow incrementally: each attention call pools only the
kernels completed since the previous call, never the whole cache again.
"""

from __future__ import annotations

import torch

from cpm4.kernels.infllm_v2 import kernel_means, num_kernels
from cpm4.model.config import MiniCPM4Config, SparseConfig
from cpm4.model.transfer import to_device


class CacheFullError(ValueError):
    pass


class KVCache:
    def __init__(self, config: MiniCPM4Config, batch_size: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"KV cache needs batch_size >= 1 and max_len >= 1, got {batch_size}, {max_len}")
        shape = (batch_size, max_len, config.num_key_value_heads, config.dim_head)
        n_layers = config.num_hidden_layers
        self.max_len = max_len
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.lens = torch.zeros(batch_size, dtype=torch.long, device=device)
        sc = config.sparse_config
        self.fine = self.coarse = None
        if sc is not None:
            n1 = num_kernels(max_len, sc.kernel_size, sc.kernel_stride)
            n2 = num_kernels(max_len, sc.coarse_kernel_size, sc.coarse_kernel_stride)
            self.fine = [torch.zeros((batch_size, max(n1, 1)) + shape[2:], device=device, dtype=dtype)
                         for _ in range(n_layers)]
            self.coarse = [torch.zeros((batch_size, max(n2, 1)) + shape[2:], device=device, dtype=dtype)
                           for _ in range(n_layers)]
            # How many kernels of each sequence are pooled already, per layer.
            self.n_fine = [[0] * batch_size for _ in range(n_layers)]
            self.n_coarse = [[0] * batch_size for _ in range(n_layers)]

    @property
    def batch_size(self) -> int:
        return self.lens.shape[0]

    def check_room(self, starts: torch.Tensor, n_new: int, new_lens: torch.Tensor | None = None,
                   host: tuple[list[int], list[int]] | None = None) -> None:
        """Rows with new tokens write n_new positions (padding included) from their start. `host`: starts and
        new_lens as lists (read from the device otherwise)."""
        if host is not None:
            active_starts = [s for s, n in zip(*host) if n > 0]
            need = max(active_starts) + n_new if active_starts else 0
        else:
            active = starts if new_lens is None else starts[new_lens.to(starts.device) > 0]
            need = int(active.max()) + n_new if active.numel() else 0
        if need > self.max_len:
            raise CacheFullError(f"KV cache full: {need} positions needed, capacity {self.max_len}")

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, starts: torch.Tensor, new_lens: torch.Tensor,
              host: tuple[list[int], list[int]] | None = None, skip_pages: int = 0
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new k/v [B, T, hkv, d] at each active sequence's offset (rows with no new tokens are left
        alone); return the cache up to the longest end. `host`: starts and new_lens as lists (each layer read
        them from the device otherwise). skip_pages: as the paged cache's, which alone shares pages (0 here)."""
        if skip_pages:
            raise ValueError("a contiguous KV cache shares no pages: skip_pages must be 0")
        b, t = k.shape[:2]
        if host is None:
            host = (starts.tolist(), new_lens.tolist())
        end = min(max(host[0]) + t, self.max_len)
        if all(n > 0 for n in host[1]) and len(set(host[0])) == 1:
            s = host[0][0]
            self.k[layer][:, s:s + t] = k
            self.v[layer][:, s:s + t] = v
        else:
            rows = to_device([i for i, n in enumerate(host[1]) if n > 0], k.device, torch.long)
            cols = starts[rows, None] + torch.arange(t, device=k.device)[None, :]
            self.k[layer][rows[:, None], cols] = k[rows]
            self.v[layer][rows[:, None], cols] = v[rows]
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def advance(self, new_lens: torch.Tensor, host: tuple[list[int], list[int]] | None = None) -> None:
        self.lens += new_lens.to(self.lens.device)

    def compressed_keys(self, layer: int, seq: int, length: int, sc: SparseConfig
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Semantic-kernel keys of sequence `seq` over its first `length` tokens, pooling only new kernels."""
        keys = self.k[layer][seq, :length]
        n1 = _extend(self.fine[layer][seq], self.n_fine[layer][seq], keys, sc.kernel_size, sc.kernel_stride)
        self.n_fine[layer][seq] = n1
        k1 = self.fine[layer][seq, :n1]
        if sc.variant != "gen-b":
            return k1, None
        n2 = _extend(self.coarse[layer][seq], self.n_coarse[layer][seq], keys, sc.coarse_kernel_size,
                     sc.coarse_kernel_stride)
        self.n_coarse[layer][seq] = n2
        return k1, self.coarse[layer][seq, :n2]


def _extend(store: torch.Tensor, done: int, keys: torch.Tensor, size: int, stride: int) -> int:
    """Pool the kernels of `keys` completed since `done` into `store`; returns the new count."""
    n = num_kernels(keys.shape[0], size, stride)
    if n > done:
        store[done:n] = kernel_means(keys, size, stride, done, n)
    return n
