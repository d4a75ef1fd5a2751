"""Packed prefill steps replayed from CUDA graphs, piece by piece (vLLM's piecewise graphs).

A packed all-dense prefill step (several prompts' tokens end to end, `modeling.Packing`) launches ≈ 10 kernels a
layer between its attention calls (norms, q/k/v and RoPE, o, residual, gate/up, SiLU·up, down) and one cuBLAS or
Triton call costs 15-40 µs of Python on the host: a small model's small steps were host-bound (0.5B on an H200:
two prompts, 1,322 tokens, ≈ 15 ms a step against 5.3 ms through the graphs). Here the work between attention
calls is captured once per token-count bucket: one graph from the embedding to layer 0's rotated q/k/v, one per
layer boundary (the previous layer's o projection, residual, norm and MLP, this layer's norm, q/k/v and RoPE) and
one after the last layer. The attention itself (paged write, variable-length flash over each row's keys) runs
eagerly between them: its work and grid follow the rows' lengths. A step pads its tokens to the bucket; the
padding rows compute on the padding ids and are never read (every op between attention calls works row by row).

All graphs share one memory pool. Each piece's outputs are kept by address only (`_alias`), so a later piece or
bucket may reuse their memory: a chain replays in order and the step copies its result out before the next
chain runs. Captured from the largest bucket down (`warm_up`), or on a bucket's first use.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable

import torch

from cpm4.model.modeling import MiniCPM4ForCausalLM, Packing
from cpm4.model.varlen import varlen_flash_ok

from .capture import capture_graph

# `LLMEngine(prefill_graphs=None)` takes them with CUDA graphs while this is on (benchmarks' --no-prefill-graphs).
ENABLED = True

# Every prefill step of up to max_tokens tokens through the pieces, packed for them whatever its attention (one row,
# rows without padding, InfLLM v2 rows, cascades over shared prefixes: the attention between the pieces takes any of
# its paths); off: the packed all-dense steps with padding only. On the H200 (0.5B) a lone 4K prompt's prefill
# took 12.7 ms with, 28.0 ms without (benchmarks' --prefill-graphs-narrow turns it off).
WIDER = True

# Token counts a packed step is padded up to (then the largest captured, `capture_limit`); steps beyond it run
# eagerly. Every 256 to 2,048, then every 512: at most a few % padding where the step's kernels outweigh its launches.
BUCKETS = (256, 512, 768, 1024, 1280, 1536, 1792, 2048) + tuple(range(2560, 65537, 512))

# What `capture_limit` assumes: the layer loop's host time a layer (H200 host, the 0.5B's 24 layers: a small packed
# step took ≈ 15 ms eagerly) and the GPU's rate on a step's weight matmuls.
HOST_MS_PER_LAYER = 0.6
STEP_TFLOPS = 400.0


def capture_limit(model: MiniCPM4ForCausalLM, chunk_tokens: int) -> int:
    """The largest step worth capturing: about where a step's matmuls take as long on the GPU as its layer loop's
    launches on the host (beyond, the step is GPU-bound and graphs win nothing: on the H200 the 0.5B's 9,185-token
    step ran 1.02x, its 18,028-token one 0.97x), rounded up to a multiple of 512, at most chunk_tokens. 0.5B: 8,192;
    8B: 512."""
    c = model.config
    hq, hkv, d, h = c.num_attention_heads, c.num_key_value_heads, c.dim_head, c.hidden_size
    per_layer = h * (hq + 2 * hkv) * d + hq * d * h + 3 * h * c.intermediate_size
    gpu_ms_per_token = 2 * per_layer * c.num_hidden_layers / (STEP_TFLOPS * 1e9)
    tokens = HOST_MS_PER_LAYER * c.num_hidden_layers / gpu_ms_per_token
    return max(1, min(chunk_tokens, -(-int(tokens) // 512) * 512))


def _alias(t: torch.Tensor) -> torch.Tensor:
    """A tensor over t's memory that does not own it (as inductor's CUDA graph trees keep graph outputs): the
    pool may hand that memory to later captures, which is what lets every piece and bucket share it."""
    storage = torch._C._construct_storage_from_data_pointer(t.untyped_storage().data_ptr(), t.device,
                                                            t.untyped_storage().nbytes())
    return t.new_empty(0).set_(storage, t.storage_offset(), t.shape, t.stride())


class PrefillGraphs:
    def __init__(self, model: MiniCPM4ForCausalLM, max_tokens: int, capture: bool | None = None):
        """max_tokens: the largest step captured (the engine's: `capture_limit`). capture: record CUDA graphs
        (default on CUDA); False runs the same pieces directly on the same padded buffers (tests off the GPU). The
        graphs read the model's weights by address: chains captured before the projections were fused (or unfused)
        or the element-wise ops changed are dropped and captured again on use (`_current`); other weights replaced
        in place of the old need a new PrefillGraphs."""
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        # The model holds this object (`model.prefill_graphs`): a strong reference back would make a cycle, which
        # only a full collection frees, and none ever once the engine's warm-up has frozen the collector's heap
        # (`gc.freeze`): a dropped `LLM` would keep its weights and graph pool for the life of the process.
        self._model = weakref.ref(model)
        dev = model.device
        self.capture = dev.type == "cuda" if capture is None else capture
        if self.capture and dev.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.sizes = sorted({b for b in BUCKETS if b < max_tokens} | {max_tokens})
        n = self.sizes[-1]
        attn = model.model.layers[0].self_attn
        self.ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.attn_out = torch.zeros(1, n, attn.n_heads * attn.head_dim, dtype=model.dtype, device=dev)
        self._probe = torch.empty(0, attn.head_dim, dtype=model.dtype, device=dev)  # what `takes` checks of q
        self.chains: dict[int, list[tuple[torch.cuda.CUDAGraph, dict]]] = {}
        self.pool = None
        self._captured_for = None  # `_signature` when the chains were captured
        self.steps = 0  # steps run through the pieces (tests, benchmarks)
        self.disabled = False  # a capture ran out of device memory: every step runs the layer loop (`_give_up`)

    @property
    def model(self) -> MiniCPM4ForCausalLM:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of these prefill graphs was freed")
        return model

    @property
    def max_tokens(self) -> int:
        return self.sizes[-1]

    def takes(self, cache, host: tuple[list[int], list[int]], t: int) -> bool:
        """Whether a prefill step (rows of host[1] new tokens after host[0] cached ones, t a row as given) runs here:
        at most max_tokens tokens, every row with some; with `WIDER` any such step, else only those the layer loop
        packs (`Packing.worth`) whose rows are all dense (`Attention._packed_ok`, the same for every layer)."""
        new = host[1]
        if self.disabled or not new or sum(new) > self.max_tokens or min(new) <= 0:
            return False
        if WIDER:
            return True
        if not Packing.worth(new, t):
            return False
        attn = self.model.model.layers[0].self_attn
        _, sparse, groups = attn._row_modes(cache, self._probe, host)
        return attn._packed_ok(self._probe, cache, sparse, groups, any(host[0]))

    def _signature(self) -> tuple:
        """What the captured kernels bake in: the first layer's q/k/v and gate/up weights by address (fusing or
        unfusing the projections, moving the model, replaces every layer's) and the element-wise ops in use."""
        layer = self.model.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp

        def address(fused: torch.Tensor | None, lin: torch.nn.Module) -> int:
            w = fused if fused is not None else getattr(lin, "weight", None)  # (a replaced module: by identity)
            return w.data_ptr() if isinstance(w, torch.Tensor) else id(lin)

        return (address(attn.qkv, attn.q_proj), address(mlp.gate_up, mlp.gate_proj), id(layer.ops), id(attn.ops),
                id(mlp.ops))

    def _current(self) -> None:
        """Drop chains captured over weights or ops the model no longer uses (they would read freed memory)."""
        sig = self._signature()
        if self._captured_for != sig:
            self.chains.clear()
            self.pool = None
            self._captured_for = sig

    def _pieces(self, nb: int) -> list:
        """The step's work between attention calls at bucket nb: functions of the previous piece's outputs."""
        model, layers = self.model, self.model.model.layers
        ids, pos, a = self.ids[None, :nb], self.positions[None, :nb], self.attn_out[:, :nb]

        def first(_: dict) -> dict:
            cos, sin = model.rotary(pos, model.dtype)
            x = model.embed(ids)
            q, k, v = layers[0].self_attn.project(layers[0].input_layernorm(x), cos, sin)
            return dict(cos=cos, sin=sin, x=x, q=q, k=k, v=v)

        def between(i: int):
            def piece(s: dict) -> dict:
                prev = layers[i - 1]
                x = prev.after_attention(s["x"], prev.self_attn._out(a))
                if i == len(layers):
                    return dict(x=x)
                q, k, v = layers[i].self_attn.project(layers[i].input_layernorm(x), s["cos"], s["sin"])
                return dict(cos=s["cos"], sin=s["sin"], x=x, q=q, k=k, v=v)
            return piece

        return [first] + [between(i) for i in range(1, len(layers) + 1)]

    def _capture(self, nb: int) -> list[tuple[torch.cuda.CUDAGraph, dict]]:
        chain, state = [], {}
        cur = torch.cuda.current_stream()
        for fn in self._pieces(nb):
            side = torch.cuda.Stream()
            side.wait_stream(cur)
            with torch.cuda.stream(side):
                fn(state)  # warm-up outside the graph: Triton compiles and tunes, cuBLAS picks its kernels
            cur.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with capture_graph(graph, pool=self.pool):
                out = fn(state)
            chain.append((graph, {k: _alias(t) for k, t in out.items()}))
            state = out  # alive while the next piece is captured (it reads them); then only the aliases remain
        return chain

    def usable(self) -> bool:
        """Whether any step can take the pieces: with `WIDER` any; else the packed all-dense steps, whose attention
        is the variable-length flash call (fp16/bf16 on an sm80+ GPU; `Attention.varlen_on_cpu` for tests)."""
        attn = self.model.model.layers[0].self_attn
        return WIDER or varlen_flash_ok(self._probe) or attn.varlen_on_cpu

    def _give_up(self) -> None:
        """Out of device memory while capturing: drop every chain and its pool, and run the layer loop from now on
        (a step's work is the same either way, only its launches cost more)."""
        self.disabled = True
        self.chains.clear()
        self.pool = None
        torch.cuda.empty_cache()
        warnings.warn("no device memory left to capture the prefill graphs: prefill steps run layer by layer "
                      "(lower gpu_memory_utilization to keep them)", stacklevel=3)

    def ready(self, n: int) -> bool:
        """Whether a step of n tokens (at most max_tokens) can run through the pieces now: its bucket's chain is
        captured, capturing it first if need be; False (for good) when that ran out of device memory."""
        if self.disabled:
            return False
        if self.capture:
            self._current()
            nb = next(s for s in self.sizes if s >= n)
            if nb not in self.chains:
                try:
                    self.chains[nb] = self._capture(nb)
                except torch.cuda.OutOfMemoryError:
                    self._give_up()
                    return False
        return True

    @torch.inference_mode()
    def warm_up(self, stop: Callable[[], bool] | None = None) -> None:
        """Capture every bucket not captured yet, largest first (the smaller ones reuse its pool memory); nothing
        when no step could replay them (`usable`: a float32 model, say). stop: as `DecodeGraphs.warm_up`'s."""
        if self.capture and self.usable():
            for nb in reversed(self.sizes):
                if stop is not None and stop():
                    return
                if not self.ready(nb):
                    return

    def run(self, ids: torch.Tensor, positions: torch.Tensor, starts: torch.Tensor, new_lens: torch.Tensor, cache,
            host: tuple[list[int], list[int]], pack: Packing) -> torch.Tensor:
        """The trunk's output [1, n, H] (before the final norm, a tensor of its own) of a packed step: ids and
        positions [n] of the rows' new tokens end to end (`pack`'s layout); starts, new_lens, cache, host as
        `Attention.attend` takes them. The caller advances the cache, and calls `ready` first (the capture may
        fail for want of memory: then the step runs the layer loop)."""
        n = ids.shape[0]
        if not self.ready(n):
            raise RuntimeError("the prefill graphs gave up for want of device memory: run the layer loop")
        nb = next(s for s in self.sizes if s >= n)
        self.ids[:n].copy_(ids, non_blocking=True)
        self.positions[:n].copy_(positions, non_blocking=True)
        layers = self.model.model.layers
        state: dict = {}
        for i, fn in enumerate(self._pieces(nb) if not self.capture else [None] * (len(layers) + 1)):
            if self.capture:
                graph, state = self.chains[nb][i]
                graph.replay()
            else:
                state = fn(state)
            if i < len(layers):
                q, k, v = (state[name][:, :n] for name in "qkv")
                out = layers[i].self_attn.attend(q, k, v, starts, new_lens, cache, None, host, pack)
                self.attn_out[:, :n].copy_(out)
        self.steps += 1
        return state["x"][:, :n].clone()
