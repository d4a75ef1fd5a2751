"""CUDA graph capture with Python's cyclic garbage collector held off.

A graph that dies inside a reference cycle (an engine dropped for a new one, a test's runner) is freed whenever
the collector next runs, and its destructor destroys the graph and its executable. If that falls inside another
graph's capture (the collector runs on allocation counts, so any Python code in the captured step can start it),
the destroy is an operation the capture forbids: it fails ("operation not permitted when stream is capturing")
and invalidates the capture in progress, so the step being captured raises or is lost. torch used to collect
before each capture (`torch.cuda.graph`); recent versions (2.11 on the device, 2.13 here) only with
`torch.compiler.config.force_cudagraph_gc`, off by default because a collection per capture is slow. Holding the
collector off while capturing costs nothing: the garbage is collected at its next run, outside the capture."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def gc_paused() -> Iterator[None]:
    """No automatic garbage collection inside (in any thread: the switch is the interpreter's); restored after,
    also on error. Nests (an inner pause leaves the outer one in force)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextmanager
def capture_graph(graph: torch.cuda.CUDAGraph, pool=None) -> Iterator[None]:
    """`torch.cuda.graph(graph, pool=pool)` with the collector held off for the whole capture."""
    with gc_paused(), torch.cuda.graph(graph, pool=pool):
        yield
