"""Decode steps of the paged engine replayed from CUDA graphs.

A decode step of B sequences launches a few hundred small kernels (norms, projections, rope, the paged
attention stages); at small batch the GPU would wait on Python and the launch queue. Each batch-size
bucket is captured once, on first use, into a graph over static input buffers (token ids, block table,
cache lengths, new-token slots); a step copies its inputs in, replays, and reads the logits. Batches are
padded up to the bucket with rows that write and read only the cache's scratch page. All graphs share one
memory pool. `warm_up` captures every bucket up front.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from cpm4.kernels import pdl
from cpm4.model.modeling import DecoderLayer, MiniCPM4ForCausalLM

from . import paged
from .capture import capture_graph
from .paged import DecodeBatch, HostBlockTable, PagedKVCache, SeqPages, decode_inputs

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)

# Copy each step's inputs from pinned, double-buffered host tensors. A copy from pageable memory first waits
# for everything queued on the stream, so with async output a step's inputs wait for the step before it to
# finish; from pinned memory they queue behind it. Off until measured on the GPU (benchmarks'
# --pinned-inputs).
PINNED_INPUTS = False

# With compile: one compilation of the step for every bucket from DYNAMIC_FROM rows, the batch dimension of its
# inputs symbolic (as vLLM compiles once and captures each size), instead of one per bucket (15 buckets of the
# 0.5B model took 207 s to warm up, 60 s so). Batch 1 keeps its own (dynamo specializes sizes 0 and 1; the
# batch-1 step of a large model is the one tuned for latency). Inductor picks each generated kernel's launch
# configuration once, at its first launch, for every size: tuned at the largest bucket (WARM_LARGEST_FIRST) the
# buckets replay within -3/+5% of a compilation each (H200, 0.5B; RESULTS.md, "One compilation for the decode
# buckets").
DYNAMIC_BATCH = True
DYNAMIC_FROM = 2
# warm_up captures the largest bucket first (and `run`, without warm_up, captures it before the first bucket of
# the shared compilation it meets): the shared compilation's first launch, where inductor picks each
# kernel's launch configuration once for every size, then runs at the size where the choices differ measurably
# (at 2 rows the candidates time within noise: the SiLU·mul kernel picked 128- or 256-wide blocks from run to
# run, 110 vs 67 us at 192 rows). vLLM captures largest first too.
WARM_LARGEST_FIRST = True
# The buckets whose steps run fused decoder layers (`MiniCPM4ForCausalLM.use_gemv(fuse=True)`: every projection a
# GEMV of ours with its neighbours inside) captured with our kernels as programmatic dependent launches
# (`pdl.ours`; measured there: the 0.5B's batch-1 decode 0.83 -> 0.77 ms at 1K).
FUSED_PDL = True


def _copy_in(dst: torch.Tensor, src: torch.Tensor) -> None:
    """Host tensor into a static buffer without waiting for the stream: through pinned memory on a GPU (a copy
    from pageable memory first waits for the queued work)."""
    dst.copy_(src.pin_memory() if dst.is_cuda else src, non_blocking=True)


class DecodeGraphs:
    def __init__(self, model: MiniCPM4ForCausalLM, cache: PagedKVCache, max_batch: int, width: int,
                 compile: bool = False):
        """width: block-table columns, enough pages for the longest sequence (fixed: it shapes the graphs).
        compile: torch.compile the step before capturing it (norms, rope, residuals and activations fused
        into few kernels; the paged attention is one opaque custom op, see `paged.make_opaque_to_compile`).
        The step compiles once for batch 1 and once for the other buckets (`DYNAMIC_BATCH`), on first use or in
        `warm_up` (tens of seconds for a large model)."""
        if model.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self.init_buffers(cache, max_batch, width, model.device)
        self.step = model
        if compile:
            paged.make_opaque_to_compile()
            # Static shapes but the batch dimension (`_forward`); with DYNAMIC_BATCH off each bucket is its own
            # compilation. Past dynamo's recompile limit (8 by default) the remaining buckets would silently run
            # the step uncompiled. The limit counts per function, over every engine in the process (the server's
            # and a benchmark's engines compile the same model.forward), so each engine adds its buckets to it.
            cfg = torch._dynamo.config
            name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
            setattr(cfg, name, getattr(cfg, name) + len(self.sizes))
            self.step = torch.compile(model, dynamic=False)

    def init_buffers(self, cache: PagedKVCache, max_batch: int, width: int, device: torch.device) -> None:
        """The bucket sizes and the static input buffers (separate from the model so that the host side of a
        step can be exercised without a GPU: benchmarks/host_overhead.py)."""
        self.cache, self.width = cache, width
        self.sizes = sorted({b for b in BUCKETS if b < max_batch} | {max_batch})
        n = self.sizes[-1]
        self.ids = torch.zeros(n, 1, dtype=torch.long, device=device)
        self.ones = torch.ones(n, dtype=torch.long, device=device)
        self.table, self.starts, self.slots, self.ends = decode_inputs(cache, [], width, device, rows=n)
        self.host_table = HostBlockTable(n, width, cache.scratch)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.cascade_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # steps with a group
        # Steps whose rows are all below an InfLLM v2 model's dense_len, without a group (`paged.DENSE_STEPS`).
        self.dense_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        sc = cache.config.sparse_config
        self._dense_len = sc.dense_len if paged.DENSE_STEPS and sc is not None and sc.dense_len > 1 else None
        self.pool = None
        # Two sets of pinned staging tensors, used in turn; a set is refilled only once the copies that
        # last read it have run (its event).
        self._staging = None
        if PINNED_INPUTS and torch.device(device).type == "cuda":
            def pinned(*shape, dtype):
                return torch.empty(*shape, dtype=dtype, pin_memory=True)
            self._staging = [dict(table=pinned(n, width, dtype=torch.int32), starts=pinned(n, dtype=torch.long),
                                  slots=pinned(n, dtype=torch.long), ends=pinned(n, dtype=torch.int32),
                                  ids=pinned(n, 1, dtype=torch.long), event=None) for _ in range(2)]
            self._turn = 0
        # Cascade decode (paged.CASCADE_DECODE; dense rows): the groups' shared pages and counts and the member
        # rows as static buffers (CASCADE_DECODE_GROUPS group slots) the kernels of `cascade_graphs` read. A step
        # without groups (`paged.cascade_groups`) replays the plain graph: the cascade one costs 2-6 us a layer
        # more when nothing is shared.
        self.shared, self._shared_rows, self._cascade = None, -1, False
        self._below = paged.dense_rows_below(cache.config)
        if paged.cascade_on(cache):
            from cpm4.kernels.infllm_v2.triton_cascade import SharedPrefix

            self.shared = SharedPrefix.empty(width, n, cache.scratch, device, paged.CASCADE_DECODE_GROUPS)
        self._pad_starts = torch.zeros(n, dtype=torch.long)
        self._pad_slots = torch.full((n,), cache.scratch * cache.page_size, dtype=torch.long)

    @property
    def max_batch(self) -> int:
        return self.sizes[-1]

    def _forward(self, bs: int, cascade: bool = False) -> torch.Tensor:
        sh = None
        if self.shared is not None and (cascade or self.step is not self.model):
            # Compiled: both graphs of a bucket run the same compiled step (the shared buffers always passed,
            # so no second compilation); the plain one is captured under `paged.cascade_paused`.
            sh = type(self.shared)(self.shared.pages, self.shared.count, self.shared.member[:bs],
                                   self.shared.order[:bs])
        ids, table, starts, slots, ends, ones = (t[:bs] for t in (self.ids, self.table, self.starts, self.slots,
                                                                   self.ends, self.ones))
        if self._dynamic(bs):
            for t in (ids, table, starts, slots, ends, ones) + ((sh.member, sh.order) if sh is not None else ()):
                torch._dynamo.maybe_mark_dynamic(t, 0)
        view = DecodeBatch(self.cache, table, starts, slots, ends, sh)
        return self.step(ids, view, ones, last_only=True)

    def _dynamic(self, bs: int) -> bool:
        """Whether bucket `bs` runs the compilation with a symbolic batch dimension (`DYNAMIC_BATCH`)."""
        return DYNAMIC_BATCH and bs >= DYNAMIC_FROM and self.step is not self.model

    def _capture(self, bs: int, cascade: bool = False, dense: bool = False
                 ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        # Warm-up outside the graph (Triton compiles, cuBLAS picks kernels) on the scratch-only buffers.
        plain = paged.cascade_paused() if self.shared is not None and not cascade else nullcontext()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        fused = max((m.fused_rows or 0 for m in self.model.modules() if isinstance(m, DecoderLayer)), default=0)
        with plain, paged.dense_step() if dense else nullcontext(), pdl.ours(FUSED_PDL and bs <= fused):
            with torch.cuda.stream(side):
                for _ in range(2 if self.step is not self.model else 1):  # compiled: the 2nd call runs compiled code
                    self._forward(bs, cascade)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with capture_graph(graph, pool=self.pool):
                out = self._forward(bs, cascade)
        return graph, out

    @torch.inference_mode()
    def warm_up(self, stop: Callable[[], bool] | None = None) -> None:
        """Capture every bucket not captured yet (compiling the step for it first, with compile), with cascade
        decode its cascade variant too. Largest first (`WARM_LARGEST_FIRST`). stop: asked before each capture;
        True ends the warm-up there (an engine shut down meanwhile; the rest are captured on first use)."""
        for bs in sorted(self.sizes, reverse=WARM_LARGEST_FIRST):
            for cascade, dense, graphs in ((False, False, self.graphs), (True, False, self.cascade_graphs),
                                           (False, True, self.dense_graphs)):
                if stop is not None and stop():
                    return
                if bs not in graphs and (not cascade or self.shared is not None) and \
                        (not dense or self._dense_len is not None):
                    self._reset_inputs()
                    graphs[bs] = self._capture(bs, cascade, dense)

    def _rows(self, seqs: list[SeqPages], bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`paged.decode_rows` for `bs` rows, the slots read from the host block table (just updated) with a
        few tensor ops rather than a Python expression per row."""
        b, ps = len(seqs), self.cache.page_size
        starts = self._pad_starts[:bs].clone()
        slots = self._pad_slots[:bs].clone()
        if b:
            lens = torch.tensor([s.length for s in seqs], dtype=torch.long)
            starts[:b] = lens
            page = self.host_table.table[:b].gather(1, (lens // ps).unsqueeze(1)).squeeze(1)
            slots[:b] = page.long() * ps + lens % ps
        return starts, slots, (starts + 1).to(torch.int32)

    @torch.inference_mode()
    def run(self, tokens: list[int] | torch.Tensor, seqs: list[SeqPages]) -> torch.Tensor:
        """Logits [len(seqs), V] of one decode step; the caller advances the sequences' lengths. tokens: host
        ids, or ids [len(seqs)] already on the device (sampled by the previous step, not yet read back)."""
        b = len(seqs)
        bs = next(s for s in self.sizes if s >= b)
        if bs not in self.graphs:
            top = self.sizes[-1]
            if WARM_LARGEST_FIRST and self._dynamic(bs) and top not in self.graphs and \
                    not any(self._dynamic(s) for s in self.graphs):
                # Without warm_up: the shared compilation's first launch (its kernels' tuning) at the largest bucket
                self._reset_inputs()
                self.graphs[top] = self._capture(top)
            self._reset_inputs()
            self.graphs[bs] = self._capture(bs)
        cols = self.host_table.update(seqs, bs)
        starts, slots, ends = self._rows(seqs, bs)
        cascade = self.shared is not None and self._share(ends[:b], b, bs, cols)
        if cascade and bs not in self.cascade_graphs:  # captured on the first step with a group at this size
            self._reset_inputs()
            self.cascade_graphs[bs] = self._capture(bs, cascade=True)
            cols = self.host_table.update(seqs, bs)  # again: the capture pointed every row at the scratch page
            starts, slots, ends = self._rows(seqs, bs)
            self._share(ends[:b], b, bs, cols)
        dense = not cascade and self._dense_len is not None and b > 0 and int(ends[:b].max()) < self._dense_len
        if dense and bs not in self.dense_graphs:  # captured on the first all-dense step at this size
            self._reset_inputs()
            self.dense_graphs[bs] = self._capture(bs, dense=True)
            cols = self.host_table.update(seqs, bs)  # again: the capture pointed every row at the scratch page
            starts, slots, ends = self._rows(seqs, bs)
        table = self.host_table.table[:bs, :cols]
        ids = None
        if not isinstance(tokens, torch.Tensor):
            ids = torch.zeros(bs, 1, dtype=torch.long)
            ids[:b, 0] = torch.tensor(tokens, dtype=torch.long)
        stage = None
        if self._staging is not None:
            stage = self._staging[self._turn]
            self._turn ^= 1
            if stage["event"] is not None:
                stage["event"].synchronize()  # the copies that last read this set have run
            table = stage["table"][:bs, :cols].copy_(table)
            starts, slots, ends = (stage[k][:bs].copy_(v) for k, v in (("starts", starts), ("slots", slots),
                                                                       ("ends", ends)))
            if ids is not None:
                ids = stage["ids"][:bs].copy_(ids)
        self.table[:bs, :cols].copy_(table, non_blocking=True)
        self.starts[:bs].copy_(starts, non_blocking=True)
        self.slots[:bs].copy_(slots, non_blocking=True)
        self.ends[:bs].copy_(ends, non_blocking=True)
        if ids is None:
            self.ids[:b, 0].copy_(tokens)
            self.ids[b:bs].zero_()
        else:
            self.ids[:bs].copy_(ids, non_blocking=True)
        if stage is not None:
            stage["event"] = torch.cuda.Event()
            stage["event"].record()
        graph, out = (self.cascade_graphs if cascade else self.dense_graphs if dense else self.graphs)[bs]
        graph.replay()
        return out[:b]

    def _share(self, ends: torch.Tensor, b: int, bs: int, cols: int) -> bool:
        """Whether the step has groups (`paged.cascade_groups` over the host block table); their shared pages,
        counts and member rows into the static buffers. Unchanged while the rows hold the sequences they held
        last step (members that grow past an InfLLM v2 model's dense_len are left out by the kernel)."""
        if not self.host_table.replaced and b == self._shared_rows:
            return self._cascade  # the same sequences in the same rows: their leading pages, so the groups, stay
        self._shared_rows = b
        found = paged.cascade_groups(self.host_table.table[:b, :cols].numpy(), ends.numpy(), self.cache.page_size,
                                     self._below, self.shared.groups, paged.cascade_min_reads(self.cache.config)
                                     ) if b >= 2 else None
        member = np.zeros(bs, dtype=np.int32)
        counts = np.zeros(self.shared.groups, dtype=np.int32)
        if found is not None:
            member[:b] = found[0]
            for k, count in enumerate(found[1]):
                row = int(np.argmax(found[0] == k + 1))
                _copy_in(self.shared.pages[k, :count], self.host_table.table[row, :count])
                counts[k] = count
        _copy_in(self.shared.count, torch.from_numpy(counts))
        _copy_in(self.shared.member[:bs], torch.from_numpy(member))
        _copy_in(self.shared.order[:bs], self.shared.row_order(torch.from_numpy(member)))
        self._cascade = found is not None
        return self._cascade

    def _reset_inputs(self) -> None:
        """Point every row at the scratch page (a capture's warm-up writes where the buffers say)."""
        table, starts, slots, ends = decode_inputs(self.cache, [], self.width, "cpu", rows=self.max_batch)
        for dst, src in ((self.table, table), (self.starts, starts), (self.slots, slots), (self.ends, ends)):
            dst.copy_(src)
        self.host_table.reset()
        self.ids.zero_()
        if self.shared is not None:
            self.shared.count.zero_()
            self.shared.member.zero_()
            self.shared.order.copy_(torch.arange(len(self.shared.order)))
            self._shared_rows = -1
