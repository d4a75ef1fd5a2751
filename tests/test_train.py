"""Training pieces against independent definitions: WSD formula, µP update sizes, packing, SFT masks,
document-packed attention == separate sequences, gradients through InfLLM v2, MTP targets."""

import json
import math

import numpy as np
import pytest
import torch
from conftest import random_model

from cpm4.model.config import ConfigError, preset
from cpm4.model.init import init_model
from cpm4.model.modeling import MiniCPM4ForCausalLM
from cpm4.train.config import load_train_config
from cpm4.train.data import IGNORE, Batch, DataError, PackedDataset, SFTDataset, encode_chat_example, tokenize_to_shards
from cpm4.train.loss import lm_loss, mtp_labels
from cpm4.train.optim import param_groups
from cpm4.train.schedule import wsd

# ---------------------------------------------------------------- schedule

def test_wsd_phases_match_the_formula():
    total, warm, decay = 100, 10, 20
    f = [wsd(s, total, warm, decay, "exp", 0.1) for s in range(total)]
    assert f[:warm] == pytest.approx([(s + 1) / warm for s in range(warm)])
    assert f[warm:total - decay] == [1.0] * (total - decay - warm)
    for s in range(total - decay, total):
        x = (s - (total - decay) + 1) / decay
        assert f[s] == pytest.approx(0.1 ** x)
    assert f[-1] == pytest.approx(0.1)
    lin = [wsd(s, total, warm, decay, "linear", 0.0) for s in range(total)]
    assert lin[-1] == 0.0 and lin[total - decay] == pytest.approx(1 - 1 / decay)
    cos = wsd(total - decay // 2 - 1, total, warm, decay, "cosine", 0.0)
    assert cos == pytest.approx(0.5)
    assert wsd(total - 1, total, warm, decay, "sqrt", 0.2) == pytest.approx(0.2)


def test_wsd_decay_from_a_stable_checkpoint():
    # A run planned for 1000 steps is stopped in its stable phase at 400 and decayed for 50 steps there:
    # the steps before 400 had exactly the factors the long run had.
    long = [wsd(s, 1000, 20, 100) for s in range(400)]
    short = [wsd(s, 450, 20, 50) for s in range(450)]
    assert short[:400] == long
    assert short[400] < 1.0 and short[-1] == pytest.approx(0.1)


@pytest.mark.parametrize("args,msg", [((0, 10, 6, 6), "fit"), ((0, 10, 1, 1, "square"), "decay_shape"),
                                      ((0, 10, 1, 1, "exp", 2.0), "min_ratio")])
def test_wsd_rejects_bad_arguments(args, msg):
    with pytest.raises(ValueError, match=msg):
        wsd(*args)


# ---------------------------------------------------------------- µP

def _update_sizes(width: int, mup: bool) -> dict[str, float]:
    """RMS of (W_after - W_before) x for a few hidden layers after one AdamW step at the same base lr."""
    cfg = preset("tiny", hidden_size=width, intermediate_size=3 * width, num_attention_heads=width // 16,
                 num_key_value_heads=width // 32, head_dim=16, dim_model_base=32, sparse_config=None,
                 vocab_size=256, eos_token_id=2)
    m = init_model(MiniCPM4ForCausalLM(cfg), seed=0)
    x = torch.randint(3, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    names = ["model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj", "model.layers.2.self_attn.o_proj"]
    mods = {n: m.get_submodule(n) for n in names}
    inputs = {}
    hooks = [mods[n].register_forward_hook(lambda _m, i, _o, n=n: inputs.__setitem__(n, i[0].detach()))
             for n in names]
    opt = torch.optim.AdamW(param_groups(m, cfg, 1e-2, 0.0, mup), lr=1e-2)
    out = lm_loss(m, Batch(x, torch.roll(x, -1, 1), None))
    (out["ntp"] / out["n"]).backward()
    for h in hooks:
        h.remove()
    before = {n: mods[n].weight.detach().clone() for n in names}
    opt.step()
    with torch.no_grad():
        return {n: float(((mods[n].weight - before[n]) @ inputs[n].flatten(0, 1).T).pow(2).mean().sqrt())
                for n in names}


def test_mup_update_size_stays_flat_across_widths():
    widths = (64, 128, 256)
    mup = {w: _update_sizes(w, True) for w in widths}
    sp = {w: _update_sizes(w, False) for w in widths}
    for n in mup[64]:
        sizes = [mup[w][n] for w in widths]
        assert max(sizes) / min(sizes) < 1.7, (n, sizes)
        # Without the width-scaled learning rate the same step grows about linearly with width.
        assert sp[256][n] / sp[64][n] > 2.2, (n, sp[64][n], sp[256][n])


def test_param_groups_scale_matrices_only():
    cfg = preset("tiny", num_mtp_layers=1)
    m = MiniCPM4ForCausalLM(cfg)
    groups = param_groups(m, cfg, 0.01, 0.1)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(m.named_parameters())
    mult = cfg.hidden_size / cfg.dim_model_base
    assert by_param[id(named["model.layers.0.mlp.up_proj.weight"])]["lr"] == pytest.approx(0.01 / mult)
    assert by_param[id(named["mtp.0.eh_proj.weight"])]["lr"] == pytest.approx(0.01 / mult)
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
              "model.layers.0.input_layernorm.weight"):
        assert by_param[id(named[n])]["lr"] == 0.01, n
    assert by_param[id(named["model.norm.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["model.embed_tokens.weight"])]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups) == len(named)


# ---------------------------------------------------------------- data

class _Tok:
    """A tokenizer stand-in: one id per character (ord % 200 + 10), bos 1, eos 2."""
    bos_token_id, eos_token_id, vocab_size = 1, 2, 256
    hf = None

    def encode(self, text, add_bos=True):
        return ([1] if add_bos else []) + [ord(c) % 200 + 10 for c in text]


def test_tokenize_pack_and_rows(tmp_path):
    docs = ["a" * 7, "bcd" * 5, "hello world", "z"]
    f = tmp_path / "docs.jsonl"
    f.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    index = tokenize_to_shards([f], _Tok(), tmp_path / "shards", shard_tokens=20, progress=False)
    stream = [t for d in docs for t in [1, *_Tok().encode(d, False), 2]]
    assert index["num_tokens"] == len(stream) and index["num_docs"] == 4 and len(index["shards"]) >= 2
    ds = PackedDataset(tmp_path / "shards", seq_len=8, seed=3)
    assert ds.tokens(0, len(stream)).tolist() == stream
    n = ds.num_rows
    assert n == (len(stream) - 1) // 8
    seen = set()
    for k in range(n):
        x, y, lens = ds.row(k)
        start = next(w * 8 for w in range(n) if stream[w * 8:w * 8 + 8] == x.tolist() and w * 8 not in seen)
        seen.add(start)
        want_y = np.array(stream[start + 1:start + 9])
        want_y[x == 2] = IGNORE  # no prediction across a document boundary
        assert y.tolist() == want_y.tolist()
        assert sum(lens) == 8
        cut = np.cumsum(lens)[:-1]
        assert all(x[c - 1] == 2 for c in cut)  # every document but the last of the row ends in </s>
    assert len(seen) == n  # one epoch visits each window once
    b1, b2 = ds.batch(5, 2), ds.batch(5, 2)
    assert torch.equal(b1.input_ids, b2.input_ids) and b1.docs == b2.docs
    # Two processes with one row each see the rows one process with two rows sees.
    r0, r1 = ds.batch(3, 1, rank=0, world=2), ds.batch(3, 1, rank=1, world=2)
    assert torch.equal(torch.cat([r0.input_ids, r1.input_ids]), ds.batch(3, 2).input_ids)


def test_packed_dataset_errors(tmp_path):
    with pytest.raises(DataError, match="index.json missing"):
        PackedDataset(tmp_path, 8)
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "x" * 50}) + "\n")
    tokenize_to_shards([f], _Tok(), tmp_path / "s", progress=False)
    shard = tmp_path / "s" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="tokens on disk"):
        PackedDataset(tmp_path / "s", 8)
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DataError, match="bad.jsonl:1"):  # the data pipeline's reader names file and line
        tokenize_to_shards([tmp_path / "bad.jsonl"], _Tok(), tmp_path / "s2", progress=False)
    # A missing input among several is named before any is read or anything written.
    with pytest.raises(DataError, match="input file not found: .*no-such.jsonl"):
        tokenize_to_shards([f, tmp_path / "no-such.jsonl"], _Tok(), tmp_path / "s3", progress=False)
    assert not (tmp_path / "s3").exists()


def test_special_token_text_in_documents_is_text(tmp_path):
    # A page mentioning </s> or <|im_end|> was cut into two documents there (the label after it ignored) and
    # taught the model to emit control tokens mid-text.
    from cpm4.cli import DEFAULT_MODEL
    from cpm4.model.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(DEFAULT_MODEL)
    text = "use </s> to end, <s> to start and <|im_end|> after a turn"
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": text}) + "\n")
    index = tokenize_to_shards([f], tok, tmp_path / "s", progress=False)
    ids = PackedDataset(tmp_path / "s", seq_len=8).tokens(0, index["num_tokens"]).tolist()
    specials = {tok.bos_token_id, tok.eos_token_id, tok.token_id("<|im_end|>")}
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id and not specials & set(ids[1:-1])
    assert tok.decode(ids[1:-1]) == text
    assert tok.encode("plain words", add_bos=False) == tok.encode("plain words", add_bos=False)  # tokenizer untouched
    assert tok.eos_token_id in tok.encode("a </s>", add_bos=False)  # (its own encode still matches them: chats)


def test_plain_text_inputs_and_damaged_files(tmp_path):
    import gzip

    text = "plain text, read whole\nsecond line"
    (tmp_path / "a.txt").write_text(text)
    (tmp_path / "b.txt.gz").write_bytes(gzip.compress(("\ufeff" + text).encode()))  # and a byte-order mark
    index = tokenize_to_shards([tmp_path / "a.txt", tmp_path / "b.txt.gz"], _Tok(), tmp_path / "s", progress=False)
    one = [1, *_Tok().encode(text, False), 2]
    assert PackedDataset(tmp_path / "s", 8).tokens(0, index["num_tokens"]).tolist() == one + one
    (tmp_path / "c.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(20))  # was a document of gibberish
    (tmp_path / "d.bin").write_bytes(b"text \xff\xfe then binary")
    (tmp_path / "e.jsonl.gz").write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:-12])  # an interrupted download
    (tmp_path / "f.jsonl").write_text('{"text": "ok"}\n{"text": "bad \\ud800 surrogate"}\n')  # was a TypeError
    for name, needle in (("c.zst", "c.zst: zstd-compressed"), ("d.bin", "d.bin: not UTF-8 text .invalid byte at "
                         "offset 5"), ("e.jsonl.gz", "e.jsonl.gz: damaged gzip file"),
                         ("f.jsonl", r"f.jsonl:2: field 'text' is not valid Unicode")):
        with pytest.raises(DataError, match=needle):
            tokenize_to_shards([tmp_path / name], _Tok(), tmp_path / f"o-{name}", progress=False)
        assert not list((tmp_path / f"o-{name}").glob("*.json"))


@pytest.fixture(scope="module")
def chat_tok():
    from cpm4.model.tokenizer import build_tokenizer
    return build_tokenizer(512)


def test_sft_mask_covers_assistant_turns_only(chat_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six."}]
    ids, mask = encode_chat_example(chat_tok, msgs)
    assert ids == chat_tok.encode_chat(msgs, add_generation_prompt=False)
    trained = chat_tok.decode([i for i, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert trained == "Four.<|im_end|>Six.<|im_end|>"
    # Each trained span starts right after an "<|im_start|>assistant\n" header.
    rendered = chat_tok.decode(ids[:mask.index(True)], skip_special_tokens=False)
    assert rendered.endswith("<|im_start|>assistant\n")


def test_sft_dataset_rows(tmp_path, chat_tok):
    f = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(5)]
    convs.append([{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "too long"}])
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    ds = SFTDataset(f, chat_tok, seq_len=48, seed=0)
    assert ds.dropped == 1 and ds.conversations == 6
    assert ds.longest_dropped == len(encode_chat_example(chat_tok, convs[-1])[0])
    total = 0
    for r in range(ds.num_rows):
        x, y, docs = ds.rows[r]
        assert sum(docs) == 48
        s = 0
        for n in docs:
            ids = x[s:s + n].tolist()
            labels = y[s:s + n]
            if ids[0] == chat_tok.bos_token_id:
                total += 1
                # Targets are the next ids at masked (assistant) positions, IGNORE elsewhere and at the end.
                assert labels[-1] == IGNORE
                assert all(lab == IGNORE or lab == ids[j + 1] for j, lab in enumerate(labels[:-1]))
                text = chat_tok.decode([lab for lab in labels if lab != IGNORE], skip_special_tokens=False)
                assert text.startswith("answer ") and text.endswith("<|im_end|>")
            else:
                assert (labels == IGNORE).all()  # padding
            s += n
    assert total == 5
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="no assistant message"):
        SFTDataset(bad, chat_tok, 48)
    bad.write_text(json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="conversation 1: message 0: the conversation starts with an assistant"):
        SFTDataset(bad, chat_tok, 48)  # (was "the chat template does not render the conversation as a stable prefix")


def test_sft_run_says_how_many_conversations_it_leaves_out(tmp_path, chat_tok, capsys):
    from types import SimpleNamespace

    from cpm4.train.trainer import Trainer

    f = tmp_path / "chat.jsonl"
    convs = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
             [{"role": "user", "content": "x" * 300}, {"role": "assistant", "content": "too long"}]]
    f.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs))
    fake = SimpleNamespace(cfg=SimpleNamespace(kind="sft", data=SimpleNamespace(seq_len=48)), tokenizer=chat_tok,
                           config=SimpleNamespace(vocab_size=512), rank=0)
    ds = Trainer._dataset(fake, str(f), 0)
    assert ds.num_rows == 1
    longest = len(encode_chat_example(chat_tok, convs[1])[0])
    assert (f"[cpm4] warning: {f}: 1 of 2 conversations are longer than data.seq_len=48 tokens (the longest "
            f"{longest}) and are left out") in capsys.readouterr().err


# ---------------------------------------------------------------- model: packing, gradients, MTP

def test_packed_documents_equal_separate_sequences():
    # Two dense-length documents and one long enough for InfLLM v2 (tiny: dense_len 256) in one row.
    model = random_model("tiny", torch.float64, seed=3)
    lens = [40, 300, 60]
    ids = torch.randint(3, 1000, (1, sum(lens)), generator=torch.Generator().manual_seed(0))
    packed = model.trunk(ids, docs=[lens])
    s = 0
    for n in lens:
        alone = model.trunk(ids[:, s:s + n])
        torch.testing.assert_close(packed[:, s:s + n], alone, rtol=1e-10, atol=1e-10)
        s += n


def _masked_attention(q, k, v, allowed, scale):
    """float64 dense attention restricted to allowed [hkv, Tq, Tk] (GQA: heads share their KV head's mask)."""
    tq, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    s = torch.einsum("thd,shd->hts", q, k.repeat_interleave(g, 1)) * scale
    s = s.masked_fill(~allowed.repeat_interleave(g, 0), -math.inf)
    return torch.einsum("hts,shd->thd", s.softmax(-1), v.repeat_interleave(g, 1))


def test_gradients_flow_through_sparse_attention():
    from cpm4.kernels.infllm_v2.reference import attended_blocks, infllm_v2_attention

    cfg = preset("tiny").sparse_config
    t, hq, hkv, d = 320, 4, 2, 16
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, d, generator=gen, dtype=torch.float64, requires_grad=True)
               for h in (hq, hkv, hkv))
    out, idx = infllm_v2_attention(q, k, v, cfg, return_blocks=True)
    pos = torch.arange(t)
    blocks = attended_blocks(idx, pos, cfg)  # [hkv, T, K]
    allowed = torch.zeros(hkv, t, t, dtype=torch.bool)
    for h in range(hkv):
        for i in range(t):
            for b in blocks[h, i].tolist():
                if b >= 0:
                    allowed[h, i, b * cfg.block_size:(b + 1) * cfg.block_size] = True
    allowed &= pos[None, None, :] <= pos[None, :, None]
    assert (~allowed[:, -1, :]).any()  # the last query really skips blocks
    ref = _masked_attention(q, k, v, allowed, d ** -0.5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    w = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    g_sparse = torch.autograd.grad((out * w).sum(), (q, k, v))
    g_ref = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(g_sparse, g_ref):
        assert a.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


def test_mtp_labels_match_a_loop():
    labels = torch.tensor([[5, 6, IGNORE, 8, 9, 10, 11, IGNORE], [1, 2, 3, 4, 5, 6, 7, 8]])
    for depth in range(3):
        got = mtp_labels(labels, depth)
        for b in range(2):
            for i in range(8):
                span = [labels[b, i + s] if i + s < 8 else IGNORE for s in range(depth + 2)]
                want = span[-1] if all(x != IGNORE for x in span) else IGNORE
                assert int(got[b, i]) == int(want), (depth, b, i)


def test_mtp_head_predicts_two_ahead_and_round_trips(tmp_path):
    from cpm4.model.checkpoint import load_checkpoint, save_checkpoint
    from cpm4.model.convert import folded_weights

    model = random_model("tiny", torch.float64, seed=1, num_mtp_layers=1)
    ids = torch.randint(3, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    h = model.trunk(ids)
    (hm,) = model.mtp_hidden_states(h, ids)
    # Position i depends on tokens <= i+1 only: changing token i+2 leaves row i unchanged.
    ids2 = ids.clone()
    ids2[:, 12] = (ids2[:, 12] + 1) % 1000
    (hm2,) = model.mtp_hidden_states(model.trunk(ids2), ids2)
    torch.testing.assert_close(hm[:, :11], hm2[:, :11])
    assert not torch.allclose(hm[:, 11], hm2[:, 11])
    out = save_checkpoint(model, model.config, tmp_path / "m")
    assert json.loads((out / "config.json").read_text())["num_mtp_layers"] == 1
    back = load_checkpoint(out)
    for (n, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(n.startswith("mtp.") for n, _ in folded_weights(model.state_dict(), model.config))
    # The main model's outputs do not depend on the MTP head.
    plain = random_model("tiny", torch.float64, seed=1)
    torch.testing.assert_close(plain(ids), model(ids))


# ---------------------------------------------------------------- run config

def test_train_config_file_and_overrides(tmp_path):
    f = tmp_path / "run.toml"
    f.write_text('[model]\npreset = "tiny"\n[data]\npath = "x"\nseq_len = 64\n[train]\nsteps = 10\n'
                 '[schedule]\nwarmup_steps = 2\n')
    cfg = load_train_config(f, ["train.lr=0.02", "model.overrides.num_mtp_layers=1", "schedule.decay_shape=linear"])
    assert cfg.train.lr == 0.02 and cfg.model.overrides == {"num_mtp_layers": 1}
    assert cfg.schedule.decay_shape == "linear" and cfg.decay_steps == 1
    for bad, msg in ((["train.lrr=1"], "unknown field train.lrr"), (["optim.lr=1"], "unknown section"),
                     (["train.steps=0"], "train.steps"), (["schedule.warmup_steps=20"], "exceed train.steps"),
                     (["model.config=\"c.json\""], "exactly one"), (["train.lr"], "section.key=value")):
        with pytest.raises(ConfigError, match=msg):
            load_train_config(f, bad)
    with pytest.raises(ConfigError, match="sft starts from"):
        load_train_config(f, kind="sft")
    with pytest.raises(FileNotFoundError, match="nope.toml"):
        load_train_config(tmp_path / "nope.toml")


@pytest.mark.parametrize("override,needle", [
    ('train.lr="fast"', "train.lr: must be a number, got 'fast'"),  # was a TypeError from the range check
    ('schedule.min_ratio="a"', "schedule.min_ratio: must be a number"),
    ("schedule.decay_share=true", "schedule.decay_share: must be a number, got True"),  # was taken as 1
    ("train.beta1=false", "train.beta1: must be a number"),  # was taken as 0
    ("train.beta2=1.0", "train.beta2: must be in [0, 1)"),  # the message named beta1
    ("train.steps=true", "train.steps: must be an integer"),
    ("train.mup=1", "train.mup: must be true or false, got 1"),
    ("data.path=3", "data.path: must be a string"),
    ("model.overrides=3", "model.overrides: must be a table"),
    ("schedule.decay_steps=2.5", "schedule.decay_steps: must be an integer, got 2.5"),
    ('log.peak_tflops="x"', "log.peak_tflops: must be a number"),
    ('train.device="tpu"', "train.device: unknown device 'tpu'"),  # was accepted, then torch's traceback
    ('train.device="mps"', "train.device: unknown device 'mps'"),
])
def test_train_config_field_types_are_checked(override, needle):
    base = ['model.preset="tiny"', 'data.path="x"']
    with pytest.raises(ConfigError) as e:
        load_train_config(None, [*base, override])
    assert needle in str(e.value)
    ok = load_train_config(None, [*base, "train.lr=1", "log.peak_tflops=100", 'train.device="cuda:1"',
                                  "schedule.decay_steps=5"])  # an int where a float goes; an optional set
    assert ok.train.lr == 1 and ok.log.peak_tflops == 100 and ok.schedule.decay_steps == 5


def test_batched_rows_and_mixed_documents_equal_one_by_one():
    # Several sparse rows in one call (documents folded into heads) and rows mixing sparse and dense
    # documents of several lengths must equal each document run alone.
    model = random_model("tiny", torch.float64, seed=4)
    ids = torch.randint(3, 1000, (3, 300), generator=torch.Generator().manual_seed(2))
    full = model.trunk(ids)
    for i in range(3):
        torch.testing.assert_close(full[i:i + 1], model.trunk(ids[i:i + 1]), rtol=1e-10, atol=1e-10)
    docs = [[270, 30], [30, 270], [100, 200]]
    packed = model.trunk(ids, docs=docs)
    for i, lens in enumerate(docs):
        s = 0
        for n in lens:
            torch.testing.assert_close(packed[i:i + 1, s:s + n], model.trunk(ids[i:i + 1, s:s + n]),
                                       rtol=1e-10, atol=1e-10)
            s += n


def _tiny_trainer(tmp_path, name, *sets):
    from cpm4.train.data import SyntheticDataset
    from cpm4.train.trainer import Trainer

    cfg = load_train_config(None, ['model.preset="tiny"', 'data.path="synthetic"', "data.seq_len=64",
                                   "train.steps=3", "train.batch_size=2", "schedule.warmup_steps=1",
                                   f'checkpoint.dir="{tmp_path / name}"', "log.every=1", "log.progress=false",
                                   'train.device="cpu"', *sets])
    return Trainer(cfg, SyntheticDataset(1024, 64, seed=0))


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    plain = [r["loss"] for r in _tiny_trainer(tmp_path, "a", "log.tensorboard=false").fit(save=False)]
    ckpt = [r["loss"] for r in _tiny_trainer(tmp_path, "b", "train.activation_checkpointing=true",
                                             "log.tensorboard=false").fit(save=False)]
    assert plain == ckpt


def test_tensorboard_events_written(tmp_path):
    pytest.importorskip("tensorboard")
    tr = _tiny_trainer(tmp_path, "tb", "log.tensorboard=true")
    tr.fit(save=False)
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
    lines = (tmp_path / "tb" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]


def test_compiled_layers_with_sparse_attention_match_eager():
    # Dynamo traces the layers; InfLLM v2 stays an opaque call (a graph break) after make_opaque_to_compile.
    from cpm4.kernels import infllm_v2

    model = random_model("tiny", torch.float32, seed=5)
    ids = torch.randint(3, 1000, (2, 300), generator=torch.Generator().manual_seed(0))
    want = model.trunk(ids)
    infllm_v2.make_opaque_to_compile()
    infllm_v2.make_opaque_to_compile()  # idempotent
    assert infllm_v2.sparse_attention._cpm4_opaque
    for layer in model.model.layers:
        layer.compile(backend="eager")
    torch.testing.assert_close(model.trunk(ids), want, rtol=1e-5, atol=1e-5)
