"""benchmarks/stage2_union.py's drawn selections (CUDA-only as a benchmark) are what stage 2 takes: checked on the
CPU, so its rows time real selections."""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))


def test_drawn_selections():
    import stage2_union as b

    n = 4 * 64 * 40  # 160 blocks: up to 126 a token may choose
    for noise in (0.0, 100.0):
        idx = b.draw(n, noise, seed=1, chunk=3000, device="cpu")
        assert idx.shape == (b.HKV, n, b.NSEL) and idx.dtype == torch.int32
        for t in (0, 70, 2500, n - 1):
            qb = t // b.BLOCK
            row = idx[0, t][idx[0, t] >= 0].tolist()
            assert row == sorted(set(row)) and (idx[0, t, len(row):] == -1).all()
            assert all(x <= qb for x in row) and 0 in row
            assert set(range(max(qb - b.WINDOW, 0), qb + 1)) <= set(row)  # the forced window
            own = [x for x in row if b.INIT <= x < qb - b.WINDOW]
            assert len(own) == min(max(qb - b.WINDOW - b.INIT, 0), b.NSEL - b.INIT - b.WINDOW - 1)
        late = idx[:, 130 * 64:131 * 64]  # one query block, 97 blocks to choose 62 from
        same = (late == late[:, :1]).all(-1).float().mean().item()
        assert same == 1.0 if noise == 0 else same < 0.1  # "vertical": a block's queries alike; else independent
