"""The poison that `CPM4_POISON_EMPTY=1` puts into fresh allocations (tests/poison_empty.py), checked in a subprocess
so that this worker's own allocations stay as they are."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CHECK = """
import torch, poison_empty
poison_empty.install()
assert torch.empty(3).isnan().all() and torch.empty_like(torch.zeros(2, 2)).isnan().all()
assert (torch.empty(4, dtype=torch.int32) == 1).all() and torch.empty(2, dtype=torch.bool).all()
assert torch.zeros(2).new_empty(5).isnan().all() and torch.empty_strided((2, 2), (2, 1)).isnan().all()
big = torch.empty(poison_empty.LARGE // 4 + 1)  # left as the allocator gave it (not filled: not committed)
assert big.numel() * 4 > poison_empty.LARGE
with torch.device("meta"):  # the device context still recognises the wrapped constructors
    assert torch.empty(10**12).is_meta
print("ok")
"""


def test_poison_fills_fresh_allocations_but_large_and_meta_ones():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
