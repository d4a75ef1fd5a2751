"""`benchmarks/host_overhead.py` runs the engine's real host side over a stub model and host-only graphs
(`StubModel`, `HostGraphs`): each time the engine asks more of its model or its graphs, the stub has to follow (it
went three sessions broken unnoticed). A few steps of each of its parts here keep it running."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import host_overhead  # noqa: E402

from cpm4.engine.paged import PagedKVCache  # noqa: E402
from cpm4.model.config import preset  # noqa: E402
from cpm4.model.tokenizer import build_tokenizer  # noqa: E402


def test_host_overhead_parts_run():
    tok = build_tokenizer(1024)
    for async_output in (False, True):
        assert host_overhead.engine_step_ms(8, async_output, tok, stream_text=False, steps=3) > 0
    cfg = preset("tiny", num_hidden_layers=1, sparse_config=None)
    assert host_overhead.share_ms(PagedKVCache(cfg, 1, 64), 64, 96, 80, 64) >= 0  # a group worth a cascade
