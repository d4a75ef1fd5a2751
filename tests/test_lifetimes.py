"""A dropped model or engine frees its memory by reference counting alone. An engine's warm-up freezes the garbage
collector's heap (`gc.freeze`, so full collections stop walking the long-lived objects): anything caught in a
reference cycle at that point is never collected, so a cycle through a model would keep its weights (and its
graphs' memory pool) for the life of the process once the `LLM` holding it is gone."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from conftest import random_model

from cpm4 import LLM, SamplingParams
from cpm4.engine.prefill_graphs import PrefillGraphs


@contextmanager
def frozen_heap() -> Iterator[None]:
    """What `LLMEngine.warm_up` leaves on CUDA: the garbage collected, then every live object frozen (restored
    after)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def test_prefill_graphs_hold_no_cycle_through_the_model():
    """The model holds its PrefillGraphs; they must not hold the model strongly back (the run still finds it)."""
    m = random_model("tiny", dtype=torch.float32)
    m.prefill_graphs = PrefillGraphs(m, 64, capture=False)
    assert m.prefill_graphs.model is m
    model, weight = weakref.ref(m), weakref.ref(m.model.embed_tokens.weight)
    with frozen_heap():
        del m
        gc.collect()
        assert model() is None and weight() is None


def test_a_dropped_llm_frees_its_model_and_engine(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), max_num_seqs=4)
    outs = llm.generate(["hello there", "abc"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4, 4]
    eng = llm.engine.engine  # (built by the first generate)
    refs = {"llm": weakref.ref(llm), "model": weakref.ref(llm.model), "tokenizer": weakref.ref(llm.tokenizer),
            "engine": weakref.ref(eng), "cache": weakref.ref(eng.cache)}
    del eng, outs
    with frozen_heap():
        del llm
        gc.collect()
        assert [n for n, r in refs.items() if r() is not None] == []


@pytest.mark.gpu
def test_a_dropped_cuda_llm_frees_its_model_engine_and_memory(tiny_checkpoint):
    """On CUDA (bf16: paged decode, decode graphs, prefill graphs, a warm-up that freezes the heap): once dropped,
    the model, engine and cache are gone by reference counting, and the device memory they held with them."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    # A cache of 2^20 tokens (512 bytes each: 512 MB) so what the process keeps for good (cuBLAS workspaces of the
    # capture streams, the kernels' counters: a few MB) stays small beside what must be given back.
    llm = LLM(str(tiny_checkpoint), device="cuda", dtype="bfloat16", max_num_seqs=4, kv_cache_tokens=1 << 20)
    outs = llm.generate(["hello there", "abc"], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    assert [len(o.token_ids) for o in outs] == [4, 4]
    eng = llm.engine.engine
    assert eng.graphs is not None and gc.get_freeze_count() > 0  # the warm-up froze the heap
    refs = {"llm": weakref.ref(llm), "model": weakref.ref(llm.model), "engine": weakref.ref(eng),
            "cache": weakref.ref(eng.cache), "graphs": weakref.ref(eng.graphs)}
    held = torch.cuda.memory_allocated() - before
    del eng, outs, llm
    gc.collect()  # (the frozen objects are out of its reach: only reference counting frees them)
    assert [n for n, r in refs.items() if r() is not None] == []
    torch.cuda.synchronize()
    freed = before + held - torch.cuda.memory_allocated()
    assert held > 256 << 20 and freed >= held - (64 << 20), (held, freed)
