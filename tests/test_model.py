"""The model against an independent float64 implementation of spec/model.md, written with explicit
per-head loops and the textbook formulas (no code shared with cpm4.model)."""

import math

import pytest
import torch
from conftest import random_model

from cpm4.model import MiniCPM4ForCausalLM, preset


def naive_logits(model: MiniCPM4ForCausalLM, ids: list[int]) -> torch.Tensor:
    cfg = model.config
    sd = {k: v.double() for k, v in model.state_dict().items()}
    H, L, hq, hkv = cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    d = H // hq if cfg.head_dim is None else cfg.head_dim
    eps = cfg.rms_norm_eps
    T = len(ids)

    def rms(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w

    # Rotary angles: theta_i = base^(-2i/d), divided by the LongRoPE factor when present.
    rs = cfg.rope_scaling or {}
    factors = [1.0] * (d // 2)
    mag = 1.0
    if rs.get("rope_type", rs.get("type")) == "longrope":
        orig, mp = rs["original_max_position_embeddings"], cfg.max_position_embeddings
        factors = rs["long_factor"] if mp > orig else rs["short_factor"]
        if mp > orig:
            mag = math.sqrt(1 + math.log(mp / orig) / math.log(orig))
    ang = torch.tensor([[t * cfg.rope_theta ** (-2 * i / d) / factors[i] for i in range(d // 2)]
                        for t in range(T)], dtype=torch.float64)

    def rope(x):  # x [T, d]: pairs (i, i + d/2) rotated by ang[t, i]
        a, b = x[:, : d // 2], x[:, d // 2:]
        c, s = torch.cos(ang) * mag, torch.sin(ang) * mag
        return torch.cat([a * c - b * s, b * c + a * s], dim=-1)

    x = sd["model.embed_tokens.weight"][ids] * cfg.scale_emb
    r = cfg.scale_depth / math.sqrt(L)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    for i in range(L):
        p = f"model.layers.{i}."
        a = rms(x, sd[p + "input_layernorm.weight"])
        q = a @ sd[p + "self_attn.q_proj.weight"].T
        k = a @ sd[p + "self_attn.k_proj.weight"].T
        v = a @ sd[p + "self_attn.v_proj.weight"].T
        heads = []
        for h in range(hq):
            g = h // (hq // hkv)
            qh = rope(q[:, h * d:(h + 1) * d])
            kh = rope(k[:, g * d:(g + 1) * d])
            vh = v[:, g * d:(g + 1) * d]
            s = (qh @ kh.T) / math.sqrt(d)
            s = s.masked_fill(~causal, float("-inf"))
            heads.append(torch.softmax(s, -1) @ vh)
        x = x + r * (torch.cat(heads, -1) @ sd[p + "self_attn.o_proj.weight"].T)
        m = rms(x, sd[p + "post_attention_layernorm.weight"])
        gate = m @ sd[p + "mlp.gate_proj.weight"].T
        up = m @ sd[p + "mlp.up_proj.weight"].T
        x = x + r * ((gate * torch.sigmoid(gate) * up) @ sd[p + "mlp.down_proj.weight"].T)
    x = rms(x, sd["model.norm.weight"])
    head = sd["model.embed_tokens.weight"] if cfg.tie_word_embeddings else sd["lm_head.weight"]
    return (x / (H / cfg.dim_model_base)) @ head.T


@pytest.mark.parametrize("overrides", [
    {"sparse_config": None},
    {"sparse_config": None, "tie_word_embeddings": True, "num_key_value_heads": 8},  # MHA, tied
    {"sparse_config": None, "num_key_value_heads": 1, "rope_theta": 50000.0, "scale_emb": 3.0},
])
def test_dense_model_matches_naive_float64(overrides):
    model = random_model("tiny", **overrides)
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ours = model(torch.tensor([ids]))[0]
    ref = naive_logits(model, ids)
    torch.testing.assert_close(ours.double(), ref, rtol=1e-9, atol=1e-9)


def test_longrope_model_matches_naive_float64():
    d = preset("tiny").dim_head
    short = [1.0 + 0.3 * i for i in range(d // 2)]
    long = [1.0 + 0.7 * i for i in range(d // 2)]
    for maxpos in (4096, 16384):  # = original (short factors, scale 1) and 4x (long factors + magnitude)
        rs = {"rope_type": "longrope", "original_max_position_embeddings": 4096,
              "short_factor": short, "long_factor": long}
        model = random_model("tiny", sparse_config=None, rope_scaling=rs, max_position_embeddings=maxpos)
        ids = list(range(3, 60))
        torch.testing.assert_close(model(torch.tensor([ids]))[0].double(), naive_logits(model, ids),
                                   rtol=1e-9, atol=1e-9)


def test_rmsnorm_reference_op_order_bf16():
    from cpm4.model.modeling import RMSNorm

    norm = RMSNorm(64, 1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
    x = torch.randn(5, 64).to(torch.bfloat16)
    var = x.float().pow(2).mean(-1, keepdim=True)
    expect = (x * torch.rsqrt(var + 1e-6)).to(torch.bfloat16) * norm.weight
    assert torch.equal(norm(x), expect)


def test_float32_model_close_to_float64():
    m64 = random_model("tiny", sparse_config=None)
    m32 = MiniCPM4ForCausalLM(m64.config)
    m32.load_state_dict({k: v.float() for k, v in m64.state_dict().items()})
    ids = torch.randint(0, 1000, (2, 50), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(m32(ids).double(), m64(ids), rtol=1e-4, atol=1e-4)


def test_bad_input_ids_rejected():
    model = random_model("tiny")
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[0, 5, model.config.vocab_size]]))
    with pytest.raises(ValueError, match="batch, tokens"):
        model(torch.tensor([1, 2, 3]))
    from cpm4.engine.kv_cache import KVCache

    for lens in ([4, 1], [2, -1]):  # more new tokens than the row holds (the cache untouched), or fewer than none
        cache = KVCache(model.config, batch_size=2, max_len=16, dtype=torch.float64)
        with pytest.raises(ValueError, match=r"new_lens must lie in \[0, 3\]"):
            model(torch.tensor([[1, 2, 3], [4, 5, 6]]), cache, torch.tensor(lens))
        assert cache.lens.tolist() == [0, 0]


def test_fuse_projections_leaves_replaced_modules():
    """A layer whose projections are not plain bias-free nn.Linear (a quantized or float8 module put in their
    place) keeps them: nothing fused there, its logits unchanged; the other layers fuse."""
    from torch import nn

    class Replaced(nn.Linear):  # stands for a module with its own forward
        pass

    model = random_model("tiny", sparse_config=None)
    old = model.model.layers[0].self_attn.k_proj
    new = Replaced(old.in_features, old.out_features, bias=False, dtype=old.weight.dtype)
    new.weight = old.weight
    model.model.layers[0].self_attn.k_proj = new
    ids = torch.randint(3, 500, (1, 11), generator=torch.Generator().manual_seed(2))
    ref = model(ids)
    model.fuse_projections()
    assert model.model.layers[0].self_attn.qkv is None and model.model.layers[0].mlp.gate_up is not None
    assert model.model.layers[1].self_attn.qkv is not None
    torch.testing.assert_close(model(ids), ref, rtol=1e-12, atol=1e-12)


def test_unfuse_projections_round_trip():
    """unfuse_projections: separate weights again (own storage, the fused values), the same logits; fusing again
    works; twice is fine."""
    model = random_model("tiny", sparse_config=None, num_mtp_layers=1)
    ids = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(4))
    ref = model(ids)
    model.fuse_projections()
    model.unfuse_projections()
    model.unfuse_projections()
    attn = model.model.layers[0].self_attn
    assert attn.qkv is None and model.mtp[0].layer.mlp.gate_up is None
    assert attn.q_proj.weight.untyped_storage().data_ptr() != attn.k_proj.weight.untyped_storage().data_ptr()
    torch.testing.assert_close(model(ids), ref, rtol=0, atol=0)
    model.fuse_projections()
    torch.testing.assert_close(model(ids), ref, rtol=1e-12, atol=1e-12)


def test_fused_projections_same_logits_and_checkpoint(tmp_path):
    """fuse_projections: one q/k/v and one gate/up weight per layer, the separate parameters views into them;
    logits unchanged (float64), weights follow dtype casts and loads, the checkpoint saves and reloads."""
    from cpm4.model.checkpoint import load_checkpoint, save_checkpoint

    model = random_model("tiny", sparse_config=None, num_mtp_layers=1)
    ids = torch.randint(3, 500, (2, 19), generator=torch.Generator().manual_seed(1))
    ref = model(ids)
    model.fuse_projections()
    attn = model.model.layers[0].self_attn
    fused = attn.qkv
    model.fuse_projections()
    assert attn.qkv is fused  # idempotent: the tensor stays (CUDA graphs hold its address)
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv.untyped_storage().data_ptr()
    assert model.mtp[0].layer.mlp.gate_up is not None
    torch.testing.assert_close(model(ids), ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # a load writes through the views into the fused weights
        attn.v_proj.weight.mul_(2)
    assert torch.equal(attn.qkv[-attn.v_proj.weight.shape[0]:], attn.v_proj.weight)
    with torch.no_grad():
        attn.v_proj.weight.div_(2)
    model.to(torch.float32)
    attn = model.model.layers[0].self_attn
    assert attn.qkv.dtype == torch.float32
    assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.qkv.untyped_storage().data_ptr()
    torch.testing.assert_close(model(ids), ref.float(), rtol=1e-4, atol=1e-4)
    save_checkpoint(model, model.config, tmp_path / "m")
    back = load_checkpoint(tmp_path / "m", dtype=torch.float32)
    torch.testing.assert_close(back(ids), model(ids))


def test_fused_elementwise_model_equals_eager():
    """fuse_elementwise routes every norm, rotation, SiLU·up and residual add through the compiled ops (traced
    here with aot_eager: the wiring), sparse and MTP layers included; logits equal the eager model's."""
    from cpm4.model import fused
    from cpm4.model.modeling import RMSNorm

    model = random_model("tiny", num_mtp_layers=1)
    ids = torch.randint(3, 500, (2, 40), generator=torch.Generator().manual_seed(2))
    ref = model(ids)
    model.fuse_elementwise(backend="aot_eager")
    ops = fused.compiled("aot_eager")
    assert model.model.norm.ops is ops and model.mtp[0].layer.ops is ops
    assert all(m.ops is ops for m in model.modules() if isinstance(m, RMSNorm))
    torch.testing.assert_close(model(ids), ref, rtol=1e-12, atol=1e-12)
    model.fuse_elementwise(False)
    assert model.model.layers[0].self_attn.ops is fused.EAGER


def test_fused_ops_compile_once_for_every_length():
    """The compiled ops keep the feature sizes constant and the batch/token sizes symbolic: one graph serves
    every prefill length (batches of one row and of several: two), values equal eager's, and inside another
    compiled function they are traced into its graph without a break."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from cpm4.model import fused

    torch._dynamo.reset()
    counters.clear()
    ops = fused.compiled("aot_eager")
    g = torch.Generator().manual_seed(0)
    for b, t in ((1, 5), (1, 9), (1, 70), (3, 5), (2, 33)):
        x, y = torch.randn(b, t, 32, generator=g), torch.randn(b, t, 32, generator=g)
        w = torch.randn(32, generator=g)
        q, cos, sin = torch.randn(b, t, 4, 16, generator=g), torch.randn(b, t, 16, generator=g), \
            torch.randn(b, t, 16, generator=g)
        assert torch.equal(ops.rotary(q, cos, sin), fused.EAGER.rotary(q, cos, sin))
        for a, e in zip(ops.add_rms_norm(x, y, 0.3, w, 1e-6), fused.EAGER.add_rms_norm(x, y, 0.3, w, 1e-6)):
            assert torch.equal(a, e)
    assert counters["stats"]["unique_graphs"] == 4  # two functions x (one row, several rows)

    def outer(x, w):
        return ops.rms_norm(x, w, 1e-6) * 2

    torch._dynamo.reset()
    counters.clear()
    out = torch.compile(outer, backend="aot_eager", fullgraph=True)(x, w)  # fullgraph: a break would raise
    assert torch.equal(out, fused.EAGER.rms_norm(x, w, 1e-6) * 2)


def test_inductor_fused_ops_keep_eager_bf16_roundings():
    """The inductor-compiled ops (emulate_precision_casts) give eager's bf16 values: fused kernels change
    speed, not the numbers the model was checked with."""
    from cpm4.model import fused

    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(2, 9, 64, generator=g).to(torch.bfloat16) for _ in range(2))
    w = torch.randn(64, generator=g).to(torch.bfloat16)
    ops, ref = fused.compiled(), fused.EAGER
    for a, b in zip(ops.add_rms_norm(x, y, 0.3, w, 1e-6), ref.add_rms_norm(x, y, 0.3, w, 1e-6)):
        assert torch.equal(a, b)
    assert torch.equal(ops.silu_mul(x, y), ref.silu_mul(x, y))
