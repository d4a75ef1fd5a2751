"""The same model, cache and generate loop on a CUDA device (run on the device machine; skipped in CI)."""

import functools

import pytest
import torch
from conftest import random_model

from cpm4 import SamplingParams, generate
from cpm4.engine.kv_cache import KVCache
from cpm4.model import MiniCPM4ForCausalLM
from cpm4.model.tokenizer import build_tokenizer

pytestmark = pytest.mark.gpu


@functools.cache
def tok():
    return build_tokenizer(1024)


def to_device(model, dtype):
    m = MiniCPM4ForCausalLM(model.config).to("cuda", dtype)
    m.load_state_dict({k: v.to(dtype) for k, v in model.state_dict().items()})
    return m.eval()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dense_len", [None, -1])
def test_cuda_cached_decode_matches_full_forward(dtype, dense_len):
    base = random_model("tiny", dtype=torch.float32)
    sc = None if dense_len is None else {**base.config.sparse_config.to_dict(), "dense_len": dense_len}
    base = random_model("tiny", dtype=torch.float32, sparse_config=sc)
    model = to_device(base, dtype)
    ids = torch.randint(0, 1000, (2, 160), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    with torch.inference_mode():
        full = model(ids)
        ref = base(ids.cpu()).cuda()  # float32 CPU: the precision yardstick
        cache = KVCache(model.config, 2, 160, "cuda", dtype)
        out = [model(ids[:, :100], cache)]
        for t in range(100, 160):
            out.append(model(ids[:, t:t + 1], cache))
        dec = torch.cat(out, 1)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()

    assert rel(full, ref) < 2e-2
    assert rel(dec, full) < 2e-2


def test_cuda_generate_matches_cpu_float32():
    base = random_model("tiny", dtype=torch.float32)
    model = to_device(base, torch.float32)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    prompts = ["hello world", "a longer prompt with more words in it"]
    gpu = generate(model, tok(), prompts, params)
    cpu = generate(base, tok(), prompts, params)
    assert [o.token_ids for o in gpu] == [o.token_ids for o in cpu]


def test_cuda_seeded_sampling_reproduces():
    model = to_device(random_model("tiny", dtype=torch.float32), torch.bfloat16)
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=16, ignore_eos=True)
    assert generate(model, tok(), "x", p)[0].token_ids == generate(model, tok(), "x", p)[0].token_ids


def test_multi_row_prefill_leaves_sdpa_settings_alone():
    """The multi-row causal call leaves cuDNN out inside a context; the process's SDPA flags and priority order
    (which user code and the benchmarks' peers rely on) must be as before."""
    from torch.nn.attention import _cur_sdpa_kernel_backends

    model = to_device(random_model("tiny", dtype=torch.float32), torch.bfloat16)
    before = (_cur_sdpa_kernel_backends(), torch._C._get_sdp_priority_order())
    ids = torch.randint(0, 1000, (3, 96), device="cuda")
    with torch.inference_mode():
        out = model(ids)
    assert torch.isfinite(out).all()
    assert (_cur_sdpa_kernel_backends(), torch._C._get_sdp_priority_order()) == before
