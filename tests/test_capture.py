"""`cpm4.engine.capture`: graph capture with the garbage collector held off (a graph freed by the collector inside
another graph's capture invalidates that capture)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from cpm4.engine.capture import capture_graph, gc_paused


def test_gc_paused_holds_the_collector_off_and_restores_it():
    assert gc.isenabled()
    with gc_paused():
        assert not gc.isenabled()
        with gc_paused():  # nested: the outer pause stays in force after the inner one
            assert not gc.isenabled()
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(KeyError):
        with gc_paused():
            raise KeyError("x")
    assert gc.isenabled()  # restored on error too
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # a collector off before stays off
    finally:
        gc.enable()


def test_gc_paused_stops_automatic_collection_of_cycles():
    """Garbage in a cycle survives thousands of allocations inside (the collector set to run at each never runs),
    and is freed by the first collection after."""
    class Node:
        pass

    gc.collect()
    old = gc.get_threshold()
    try:
        gc.set_threshold(1)
        with gc_paused():
            a = Node()
            a.me = a
            alive = weakref.ref(a)
            del a
            junk = [[i] for i in range(2000)]
            assert alive() is not None
        del junk
        gc.collect()
        assert alive() is None
    finally:
        gc.set_threshold(*old)


class _Box:
    pass


def _capture_while_a_graph_dies(capture) -> tuple[list[float], weakref.ref]:
    """Capture `y = x * 2` with `capture(graph)` while another captured graph, kept only by a reference cycle,
    becomes garbage inside the capture, and the collector is set to run (in full) at every allocation there.
    Returns the replay's output for x = 3 and a weak reference to the dying graph's box."""
    old = gc.get_threshold()
    box = _Box()
    box.graph = torch.cuda.CUDAGraph()
    box.me = box
    x = torch.zeros(8, device="cuda")
    with torch.cuda.graph(box.graph):
        box.out = x + 1
    dying = weakref.ref(box)
    holder = [box]
    del box
    g = torch.cuda.CUDAGraph()
    try:
        with capture(g):
            holder.clear()  # garbage from here, in a cycle: only a collection frees it
            gc.set_threshold(1, 1, 1)
            junk = [[i] for i in range(50)]  # Python allocations inside the capture, as a model's forward makes
            gc.set_threshold(*old)
            y = x * 2
        del junk
    finally:
        gc.set_threshold(*old)
    x.fill_(3.0)
    g.replay()
    torch.cuda.synchronize()
    return y.tolist(), dying


@pytest.mark.gpu
def test_capture_survives_a_graph_dying_inside_it():
    """Under plain `torch.cuda.graph` (recent torch no longer collects first) the collection inside the capture
    destroys the dead graph, which the capture forbids: "operation not permitted when stream is capturing
    (function reset)", then the capture fails with cudaErrorStreamCaptureInvalidated (H200, 2026-12-02).
    `capture_graph` captures and replays, and the dead graph is freed by the first collection after."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    out, dying = _capture_while_a_graph_dies(capture_graph)
    assert out == [6.0] * 8
    gc.collect()
    assert dying() is None
