"""Pull a tensor's bytes into the GPU's L2 cache ahead of the kernel that reads them, three ways (MODE):

- 0 "load": programs read the words with the evict-last hint and throw them away (any GPU; the interpreter runs
  it, so CHECK — each program stores the int32 sum of the words it read — can prove every word is read once);
- 1 "line": one `prefetch.global.L2::evict_last` per 128-byte line (sm_80+; no registers wait on the data);
- 2 "bulk": one `cp.async.bulk.prefetch.L2` per CHUNK bytes with an evict-last cache policy (sm_90: the copy
  engine fetches, a few threads issue).

Launched on a side stream while a decode step's attention (latency-bound: HBM mostly idle) runs, so the o
projection after it reads its weights from L2 (`cpm4.kernels.prefetch.fork`)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODES = {"load": 0, "line": 1, "bulk": 2}
LINE_BYTES = 128
CHUNK_BYTES = 4096
LOAD_BLOCK = 2048  # words a program reads a step in mode "load" (16 a thread at 4 warps: vector loads)
ISSUE_BLOCK = 128  # lines or chunks a program issues a step in the other modes (one a thread)


@triton.jit
def _prefetch_kernel(ptr, n_words, sink_ptr, MODE: tl.constexpr, BLOCK: tl.constexpr, CHECK: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lanes = tl.arange(0, BLOCK)
    if MODE == 0:
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n_words, nprog * BLOCK):
            offs = start + lanes
            w = tl.load(ptr + offs, mask=offs < n_words, other=0, eviction_policy="evict_last")
            acc += w.to(tl.int32)
        s = tl.sum(acc, axis=0)
        if CHECK:
            tl.store(sink_ptr + pid, s)
        else:  # a store the compiler cannot prove dead keeps the loads; it never fires on real weights' sums
            tl.store(sink_ptr + pid, s, mask=s == -2147483647)
    elif MODE == 1:
        words_per_line: tl.constexpr = 64  # 128 bytes of 16-bit words
        last = (n_words - 1) // words_per_line
        n_lines = last + 1
        for start in range(pid * BLOCK, n_lines, nprog * BLOCK):
            line = tl.minimum(start + lanes, last)  # a repeated last line, not a masked one: asm takes no mask
            tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1]; // $0", "=r,l",
                                      [ptr + line * words_per_line], dtype=tl.int32, is_pure=False, pack=1)
    else:
        words_per_chunk: tl.constexpr = 2048  # CHUNK_BYTES of 16-bit words
        last = (n_words - 1) // words_per_chunk
        n_chunks = last + 1
        for start in range(pid * BLOCK, n_chunks, nprog * BLOCK):
            chunk = tl.minimum(start + lanes, last)
            size = (tl.minimum((chunk + 1) * words_per_chunk, n_words) - chunk * words_per_chunk) * 2
            tl.inline_asm_elementwise(
                "{ .reg .b64 pol; createpolicy.fractional.L2::evict_last.b64 pol, 1.0; "
                "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol; } // $0",
                "=r,l,r", [ptr + chunk * words_per_chunk, size], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(t: torch.Tensor, mode: str = "line", programs: int = 32, n_bytes: int | None = None,
             sink: torch.Tensor | None = None, check: bool = False) -> torch.Tensor:
    """Launch the prefetch of t's first n_bytes (all by default) on the current stream; returns the sink (int32
    [programs]: with check, mode "load" only, each program's sum of the words it read). t: contiguous, a whole
    number of 16-bit words (bulk: of 16-byte units, its start 16-byte aligned)."""
    if mode not in MODES:
        raise ValueError(f"prefetch mode must be one of {sorted(MODES)}, got {mode!r}")
    if not t.is_contiguous():
        raise ValueError("prefetch needs a contiguous tensor")
    total = t.numel() * t.element_size()
    n_bytes = total if n_bytes is None else n_bytes
    if not 0 < n_bytes <= total or n_bytes % 2:
        raise ValueError(f"prefetch of {n_bytes} bytes from a tensor of {total}: give an even count in (0, {total}]")
    if mode == "bulk" and (n_bytes % 16 or t.data_ptr() % 16):
        raise ValueError("the bulk prefetch needs a 16-byte aligned start and a multiple of 16 bytes")
    if check and mode != "load":
        raise ValueError("check reads the words: mode 'load' only")
    if sink is None or sink.numel() < programs:
        sink = torch.zeros(programs, dtype=torch.int32, device=t.device)
    words = t.view(-1).view(torch.uint8)[:n_bytes].view(torch.int16)
    block = LOAD_BLOCK if mode == "load" else ISSUE_BLOCK
    _prefetch_kernel[(programs,)](words, n_bytes // 2, sink, MODE=MODES[mode], BLOCK=block, CHECK=check,
                                  num_warps=4)
    return sink
