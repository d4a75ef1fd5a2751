import random

import numpy as np
import pytest
import torch

from cpm4.engine.sampling import (
    Sampler,
    SamplingParams,
    StopStringMatcher,
    process_logits,
    sample_batch,
)


def _rand_logits(b: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, v, generator=g) * scale


def _softmax64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ---------------------------------------------------------------------------------------------------------
# SamplingParams


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -1),
        ("temperature", float("nan")),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("max_tokens", 0),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("top_k", -2),
        ("min_p", -0.1),
        ("min_p", 1.1),
        ("temperature", float("inf")),
        ("repetition_penalty", float("inf")),
        ("max_tokens", True),
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", True),
    ],
)
def test_params_validation_names_field_and_value(field, value):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{field: value})
    msg = str(e.value)
    assert field in msg and repr(value) in msg


def test_params_validation_messages():
    with pytest.raises(ValueError, match=r"temperature must be a number in \[0, 1e30\], got -1"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match=r"max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match=r"repetition_penalty must be a number in \[1e-30, 1e30\], got 0"):
        SamplingParams(repetition_penalty=0)
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop=["ok", ""])
    with pytest.raises(ValueError, match="stop"):
        SamplingParams(stop="")
    for seed in (-(2**63), 2**63 - 1):  # the int64 range, as the server's
        SamplingParams(seed=seed)
    with pytest.raises(ValueError, match=r"stop_token_ids must be non-negative ints, got True"):
        SamplingParams(stop_token_ids=[2, True])  # JSON true is no token id (bool is an int in Python)


def test_params_normalise_and_greedy():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(top_k=-1).top_k == -1
    assert SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=0.7).greedy
    assert not SamplingParams().greedy


# ---------------------------------------------------------------------------------------------------------
# Logits processing


def test_greedy_is_argmax():
    b, v = 64, 1000
    logits = _rand_logits(b, v, 0)
    params = [SamplingParams(temperature=0.0, top_k=(i % 5) * 3, top_p=0.5 + (i % 3) * 0.2) for i in range(b)]
    samplers = [Sampler(p) for p in params]
    toks = sample_batch(logits, samplers, params, [[] for _ in range(b)])
    assert toks == logits.argmax(dim=-1).tolist()
    for i in range(b):
        assert samplers[i].sample(logits[i]) == toks[i]


def test_greedy_ties_lowest_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [5.0, 5.0, 5.0, 5.0]])
    p = SamplingParams(temperature=0)
    assert sample_batch(logits, [Sampler(p), Sampler(p)], [p, p], [[], []]) == [1, 0]


def test_top_k_membership():
    v = 50
    logits = _rand_logits(4, v, 1)
    ks = [1, 3, 10, 49]
    params = [SamplingParams(top_k=k, seed=0) for k in ks]
    out = process_logits(logits, params, [[]] * 4)
    for i, k in enumerate(ks):
        ref = set(torch.topk(logits[i], k).indices.tolist())
        assert set(torch.isfinite(out[i]).nonzero().flatten().tolist()) == ref
    for seed in range(200):
        params = [SamplingParams(top_k=k, seed=seed) for k in ks]
        toks = sample_batch(logits, [Sampler(p) for p in params], params, [[]] * 4)
        for i, k in enumerate(ks):
            assert toks[i] in set(torch.topk(logits[i], k).indices.tolist())


def test_top_k_off_values():
    logits = _rand_logits(3, 20, 2)
    params = [SamplingParams(top_k=0), SamplingParams(top_k=-1), SamplingParams(top_k=20)]
    out = process_logits(logits, params, [[]] * 3)
    assert torch.equal(out, logits)


def _ref_nucleus(row: np.ndarray, top_p: float) -> tuple[set[int], float]:
    """Reference nucleus in float64, plus the distance of the cut from top_p (to rule out rounding)."""
    probs = _softmax64(row)
    order = sorted(range(len(probs)), key=lambda j: -probs[j])
    keep, total = [], 0.0
    for j in order:
        keep.append(j)
        total += probs[j]
        if total >= top_p:
            break
    before = total - probs[keep[-1]]
    return set(keep), min(abs(total - top_p), abs(before - top_p))


def test_top_p_matches_reference():
    b, v = 16, 300
    logits = _rand_logits(b, v, 3, scale=2.0)
    top_ps = [0.05, 0.3, 0.5, 0.8, 0.9, 0.95, 0.97, 0.99] * 2
    temps = [1.0] * 8 + [0.7] * 8
    params = [SamplingParams(top_p=p, temperature=t) for p, t in zip(top_ps, temps)]
    out = process_logits(logits, params, [[]] * b)
    for i in range(b):
        ref, margin = _ref_nucleus(logits[i].double().numpy() / temps[i], top_ps[i])
        assert margin > 5e-6  # far beyond float32 cumsum error, so the cut is unambiguous
        assert set(torch.isfinite(out[i]).nonzero().flatten().tolist()) == ref
        kept = torch.isfinite(out[i])
        # Kept logits are the (temperature-scaled) originals.
        torch.testing.assert_close(out[i][kept], (logits[i] / temps[i])[kept])


@pytest.mark.parametrize("scales", [[0.5, 8.0, 1.0, 12.0, 4.0, 0.2, 6.0, 2.0], [10.0] * 4, [0.3] * 4])
def test_top_p_candidates_match_reference(monkeypatch, scales):
    """On the CPU the nucleus is looked for among the TOP_P_CANDIDATES most likely tokens first: rows whose nucleus
    is wider (flat rows) sort in full. Mixed, all narrow, all wide: each row's kept set is the float64 reference's
    and the whole output that of the full sort."""
    from cpm4.engine import sampling

    b, v = len(scales), 3000
    g = torch.Generator().manual_seed(17)
    logits = torch.randn(b, v, generator=g) * torch.tensor(scales)[:, None]
    params = [SamplingParams(top_p=p, temperature=1.0) for p in [0.5, 0.9, 0.95, 0.8, 0.99, 0.7, 0.9, 0.6][:b]]
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 64)
    out = process_logits(logits, params, [[]] * b)
    monkeypatch.setattr(sampling, "TOP_P_CANDIDATES", 10**9)
    assert torch.equal(out, process_logits(logits, params, [[]] * b))
    for i in range(b):
        ref, margin = _ref_nucleus(logits[i].double().numpy(), params[i].top_p)
        assert margin > 1e-6
        assert set(torch.isfinite(out[i]).nonzero().flatten().tolist()) == ref, i
    kept = torch.isfinite(out).sum(-1)
    if len(set(scales)) > 1:
        assert (kept <= 64).any() and (kept > 64).any()  # both ways taken


def test_top_p_keeps_at_least_one():
    logits = torch.tensor([[10.0, 0.0, 0.0, 0.0]])
    out = process_logits(logits, [SamplingParams(top_p=1e-6)], [[]])
    assert torch.isfinite(out).sum().item() == 1 and torch.isfinite(out[0, 0])


def test_min_p_matches_reference():
    b, v = 8, 200
    logits = _rand_logits(b, v, 4, scale=2.0)
    min_ps = [0.0, 0.01, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0]
    temps = [1.0, 0.5, 1.0, 2.0, 1.0, 0.8, 1.0, 1.0]
    params = [SamplingParams(min_p=m, temperature=t) for m, t in zip(min_ps, temps)]
    out = process_logits(logits, params, [[]] * b)
    for i in range(b):
        probs = _softmax64(logits[i].double().numpy() / temps[i])
        ref_keep = probs >= min_ps[i] * probs.max()
        ratio = probs / probs.max()
        assert np.all(np.abs(ratio - min_ps[i])[ratio > 0] > 1e-5) or min_ps[i] in (0.0, 1.0)
        np.testing.assert_array_equal(torch.isfinite(out[i]).numpy(), ref_keep)


def test_min_p_comes_before_top_p():
    """vLLM's V1 order: min-p, then top-p over what it kept (renormalised). p = .40 .20 .15 .10 .10 .05 with
    min_p 0.3 keeps the first three (>= .12); their nucleus at 0.7 is the first two (.533 + .267). Min-p last (the
    Hugging Face order, ours before) kept three: top-p's nucleus over all six reaches 0.7 only with the third."""
    probs = torch.tensor([[0.40, 0.20, 0.15, 0.10, 0.10, 0.05]], dtype=torch.float64)
    out = process_logits(probs.log().float(), [SamplingParams(min_p=0.3, top_p=0.7)], [[]])
    assert torch.isfinite(out[0]).tolist() == [True, True, False, False, False, False]
    kept = torch.softmax(out[0].double(), -1)[:2]
    torch.testing.assert_close(kept, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_repetition_penalty_formula():
    logits = torch.tensor(
        [
            [2.0, -2.0, 0.5, -0.5, 1.0, 0.0],
            [2.0, -2.0, 0.5, -0.5, 1.0, 0.0],
            [2.0, -2.0, 0.5, -0.5, 1.0, 0.0],
            [2.0, -2.0, 0.5, -0.5, 1.0, 0.0],
        ]
    )
    hist = [[0, 1, 1, 0, 3, 5, 0], [0, 1, 2], [], [2, 3, 2, 2]]
    params = [
        SamplingParams(repetition_penalty=2.0, temperature=0),
        SamplingParams(repetition_penalty=1.0),
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(repetition_penalty=0.5, temperature=2.0),
    ]
    out = process_logits(logits, params, hist)
    expected = torch.tensor(
        [
            [1.0, -4.0, 0.5, -1.0, 1.0, 0.0],  # ids 0,1,3 once each; 0.0 unchanged
            [2.0, -2.0, 0.5, -0.5, 1.0, 0.0],  # penalty 1 is a no-op
            [2.0, -2.0, 0.5, -0.5, 1.0, 0.0],  # empty history
            [1.0, -1.0, 0.5, -0.125, 0.5, 0.0],  # penalty < 1 boosts; then temperature 2
        ]
    )
    torch.testing.assert_close(out, expected)
    # The input is left untouched.
    assert logits[0, 0].item() == 2.0


@pytest.mark.parametrize("temp", [0.5, 2.0])
def test_temperature_distribution(temp):
    n = 20000
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0, 2.0, 0.2, -2.0])
    logits = base.expand(n, -1).contiguous()
    params = [SamplingParams(temperature=temp, seed=i) for i in range(n)]
    toks = sample_batch(logits, [Sampler(p) for p in params], params, [[]] * n)
    emp = np.bincount(toks, minlength=8) / n
    ref = _softmax64(base.numpy() / temp)
    chi2 = n * np.sum((emp - ref) ** 2 / ref)
    assert np.abs(emp - ref).max() < 0.012
    assert chi2 < 30  # df=7: p ~ 1e-4
    # And it is really tempered: far from the T=1 distribution.
    assert np.abs(emp - _softmax64(base.numpy())).max() > 0.05

    # Many draws from one seeded sampler give the same distribution.
    s = Sampler(SamplingParams(temperature=temp, seed=123))
    row = process_logits(base[None], [s.params], [[]])[0]
    emp1 = np.bincount([s.sample(row) for _ in range(n)], minlength=8) / n
    assert np.abs(emp1 - ref).max() < 0.012


def _decode(params: list[SamplingParams], steps: int, v: int = 500, logit_seed: int = 0, target: int = 0):
    """Toy decode loop: row `target` always sees the same logits; other rows get their own."""
    b = len(params)
    samplers = [Sampler(p) for p in params]
    hist: list[list[int]] = [[1, 2, 3] for _ in range(b)]
    g = torch.Generator().manual_seed(logit_seed)
    g_other = torch.Generator().manual_seed(logit_seed + 1000 + b)
    for _ in range(steps):
        logits = torch.randn(b, v, generator=g_other) * 4
        logits[target] = torch.randn(v, generator=g) * 2
        toks = sample_batch(logits, samplers, params, hist)
        for i, t in enumerate(toks):
            hist[i].append(t)
    return hist


def test_seed_reproducible_and_different_seeds_differ():
    p = SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=123)
    a = _decode([p], 30)[0]
    b = _decode([SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=123)], 30)[0]
    c = _decode([SamplingParams(temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=124)], 30)[0]
    assert a == b
    assert a != c


def test_unseeded_runs_differ():
    p = SamplingParams(temperature=1.0)
    assert _decode([p], 20)[0] != _decode([p], 20)[0]


def test_seeded_row_independent_of_batch():
    target = SamplingParams(temperature=0.9, top_k=100, top_p=0.9, min_p=0.02, repetition_penalty=1.2, seed=7)
    alone = _decode([target], 25)[0]
    others = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.3, top_k=5, seed=1),
        SamplingParams(temperature=0.5, top_p=0.5, repetition_penalty=0.8),
        SamplingParams(temperature=1.0, min_p=0.3, seed=99),
    ]
    for pos in (0, 2, 4):
        params = others[:pos] + [target] + others[pos:]
        assert _decode(params, 25, target=pos)[pos] == alone


def test_sampler_accepts_probs():
    s = Sampler(SamplingParams(seed=0))
    probs = torch.tensor([0.0, 0.0, 1.0, 0.0])
    assert all(s.sample(probs, is_probs=True) == 2 for _ in range(20))


# ---------------------------------------------------------------------------------------------------------
# Stop strings


def _run_matcher(m: StopStringMatcher, deltas: list[str]) -> tuple[str, bool, list[str]]:
    out, pieces = "", []
    for d in deltas:
        piece, stopped = m.feed(d)
        pieces.append(piece)
        out += piece
        if stopped:
            return out, True, pieces
    tail = m.flush()
    pieces.append(tail)
    return out + tail, False, pieces


def test_stop_split_across_deltas():
    m = StopStringMatcher(["</s>"], include_stop_str_in_output=False)
    out, stopped, pieces = _run_matcher(m, ["Hello <", "/", "s", "> world"])
    assert out == "Hello " and stopped
    assert pieces[0] == "Hello "  # "<" held back, never emitted
    assert all("<" not in p for p in pieces)


def test_unchecked_text_ends_no_stop_but_can_begin_one():
    # min_tokens' text (check=False): "ab" and "xx" complete there and do not stop; "abc" begins there and ends
    # in checked text: it stops (vLLM's window reaches back a stop's length).
    m = StopStringMatcher(["ab", "abc", "xx"])
    assert m.feed("xx ab", check=False) == ("xx ", False)  # "ab" held: it begins "abc"
    assert m.feed("c!") == ("", True) and m.matched == "abc"
    m = StopStringMatcher(["ab", "abcd"])
    assert m.feed("zab", check=False) == ("z", False)
    assert m.feed("c") == ("", False)  # "abc" held; its "ab" was unchecked text: still no stop
    assert m.feed("x ab") == ("abcx ", True) and m.matched == "ab"  # a new "ab" in checked text stops


def test_stop_false_prefix_is_released():
    m = StopStringMatcher(["</s>"])
    assert m.feed("a <") == ("a ", False)
    assert m.feed("b") == ("<b", False)
    assert m.flush() == ""


def test_stop_overlapping_prefix():
    for deltas in (["ababab"], list("ababab"), ["aba", "bab"], ["a", "babab"]):
        m = StopStringMatcher(["abab"])
        out, stopped, _ = _run_matcher(m, deltas)
        assert out == "" and stopped, deltas
    m = StopStringMatcher(["abab"], include_stop_str_in_output=True)
    assert _run_matcher(m, list("xaababab"))[:2] == ("xaabab", True)
    m = StopStringMatcher(["abab"])
    assert _run_matcher(m, list("xabaabab"))[:2] == ("xaba", True)


def test_multiple_stops_earliest_wins():
    m = StopStringMatcher(["world", "lo"])
    assert _run_matcher(m, ["hello world"])[:2] == ("hel", True)
    assert m.matched == "lo"
    m = StopStringMatcher(["world", "lo"])
    assert _run_matcher(m, list("hello world"))[:2] == ("hel", True)
    m = StopStringMatcher(["STOP", "END"], include_stop_str_in_output=True)
    assert _run_matcher(m, ["abc E", "ND STOP"])[:2] == ("abc END", True)


def test_include_stop_str_in_output():
    m = StopStringMatcher(["\n\n"], include_stop_str_in_output=True)
    out, stopped, _ = _run_matcher(m, ["para one\n", "\nmore"])
    assert out == "para one\n\n" and stopped
    assert m.feed("ignored") == ("", True)


def test_flush_without_stop():
    m = StopStringMatcher(["STOP"])
    assert m.feed("the end ST") == ("the end ", False)
    assert m.flush() == "ST"
    m = StopStringMatcher([])
    assert m.feed("abc") == ("abc", False)
    assert m.flush() == ""


def _ref_truncate(text: str, stops: list[str], include: bool) -> str:
    """First stop completed in the text (earliest end, then longest)."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0:
            key = (i + len(s), -len(s), i)
            best = key if best is None or key < best else best
    if best is None:
        return text
    end, _, start = best
    return text[:end] if include else text[:start]


def _random_split(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if len(text) > 1 else []
    bounds = [0, *cuts, len(text)]
    deltas = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    # Empty deltas happen (a token that decodes to nothing).
    if rng.random() < 0.3:
        deltas.insert(rng.randint(0, len(deltas)), "")
    return deltas


def test_matcher_random_single_stop():
    rng = random.Random(0)
    for _ in range(3000):
        alpha = rng.choice(["ab", "abc"])
        text = "".join(rng.choice(alpha) for _ in range(rng.randint(0, 25)))
        stop = "".join(rng.choice(alpha) for _ in range(rng.randint(1, 4)))
        include = rng.random() < 0.5
        i = text.find(stop)
        ref = text if i < 0 else (text[: i + len(stop)] if include else text[:i])
        out, stopped, pieces = _run_matcher(StopStringMatcher([stop], include), _random_split(rng, text))
        assert out == ref, (text, stop, include)
        assert stopped == (i >= 0)
        # Nothing past the cut is ever emitted, so a partial stop string never leaks.
        assert "".join(pieces) == ref


def test_matcher_random_multi_stop():
    rng = random.Random(1)
    for _ in range(3000):
        text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        n_stops = rng.randint(1, 3)
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(n_stops)]
        include = rng.random() < 0.5
        ref = _ref_truncate(text, stops, include)
        out, stopped, _ = _run_matcher(StopStringMatcher(stops, include), _random_split(rng, text))
        assert out == ref, (text, stops, include)
        assert stopped == any(s in text for s in stops)
        # Chunking never matters: the one-shot result agrees.
        assert _run_matcher(StopStringMatcher(stops, include), [text])[0] == ref


def test_matcher_long_text_is_fast_enough():
    m = StopStringMatcher(["<|im_end|>", "Observation:"])
    text = "word " * 2000
    emitted = "".join(m.feed(text[i : i + 7])[0] for i in range(0, len(text), 7)) + m.flush()
    assert emitted == text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_and_reproduces():
    b, v = 6, 4096
    logits = _rand_logits(b, v, 5)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.7, top_k=50, seed=1),
        SamplingParams(temperature=1.0, top_p=0.9, seed=2),
        SamplingParams(temperature=1.2, min_p=0.05, repetition_penalty=1.3, seed=3),
        SamplingParams(temperature=0.5, top_k=200, top_p=0.8, min_p=0.01, seed=4),
        SamplingParams(temperature=1.0, seed=5),
    ]
    hist = [[1, 2, 3, 2]] * b
    cpu = process_logits(logits, params, hist)
    gpu = process_logits(logits.cuda(), params, hist)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)

    def run() -> list[list[int]]:
        samplers = [Sampler(p, "cuda") for p in params]
        return [sample_batch(logits.cuda(), samplers, params, hist) for _ in range(10)]

    a = run()
    assert a == run()
    assert all(t[0] == logits[0].argmax().item() for t in a)
    solo = Sampler(params[2], "cuda")
    alone = [sample_batch(logits[2:3].cuda(), [solo], params[2:3], hist[:1]) for _ in range(10)]
    assert [t[2] for t in a] == [t[0] for t in alone]


def test_presence_frequency_penalties_and_logit_bias_formula():
    """Against a per-row, per-token loop of the documented rules: bias added first; repetition penalty over
    prompt + output; logit -= frequency * count + presence * [count > 0] over the output only; then temperature."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 9, generator=g)
    hist = [[1, 2, 2, 5, 5, 5], [0, 8], [3], [4, 4, 7]]
    outputs = [[5, 5, 5, 2], [8], [], [7, 7]]  # the generated tail of each history (prompt tokens not counted)
    params = [
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, temperature=0),
        SamplingParams(presence_penalty=-1.0, logit_bias={"3": 2.5, 8: -100}, temperature=0.5),
        SamplingParams(frequency_penalty=2.0, logit_bias={0: 1.0}),
        SamplingParams(presence_penalty=2.0, repetition_penalty=1.5, temperature=2.0),
    ]
    out = process_logits(logits, params, hist, outputs=outputs)
    want = logits.clone().double()
    for i, p in enumerate(params):
        for t, b in (p.logit_bias or {}).items():
            want[i, t] += b
        for t in set(hist[i]):
            if p.repetition_penalty != 1.0:
                v = want[i, t]
                want[i, t] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
        for t in set(outputs[i]):
            want[i, t] -= p.frequency_penalty * outputs[i].count(t) + p.presence_penalty
        if not p.greedy:
            want[i] /= p.temperature
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="outputs"):
        process_logits(logits, params, hist)  # penalties without the output ids
    with pytest.raises(ValueError, match="outside the vocabulary"):
        process_logits(logits[:1], [SamplingParams(logit_bias={9: 1.0})], [[]])


@pytest.mark.parametrize("kw, match", [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": float("nan")}, "frequency_penalty"),
    ({"logit_bias": {"x": 1.0}}, "token ids"),
    ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 0.5}}, "logit_bias"),
])
def test_penalty_and_bias_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kw)


def test_min_tokens_bans_stop_ids_until_reached():
    """min_tokens (vLLM's): a row that has generated fewer tokens cannot sample its stop ids (ids past the
    vocabulary ignored); once reached, or in other rows, the logits are untouched."""
    logits = _rand_logits(3, 10, seed=4)
    params = [SamplingParams(min_tokens=2, temperature=0), SamplingParams(min_tokens=2, temperature=0),
              SamplingParams(temperature=0)]
    outputs = [[7], [7, 8], []]
    stop_ids = [[2, 5, 99], [2, 5], [2, 5]]
    out = process_logits(logits, params, [[1], [1], [1]], outputs=outputs, stop_ids=stop_ids)
    want = logits.clone()
    want[0, [2, 5]] = float("-inf")
    torch.testing.assert_close(out, want)
    # Greedy with its stop id on top: the next best id instead, while the minimum is not reached.
    top = int(logits[0].argmax())
    s = Sampler(params[0], stop_ids=[top])
    assert sample_batch(logits[:1], [s], params[:1], [[1]], outputs=[[]]) == [int(logits[0].topk(2).indices[1])]
    assert sample_batch(logits[:1], [s], params[:1], [[1]], outputs=[[3, 4]]) == [top]
    with pytest.raises(ValueError, match="min_tokens"):
        process_logits(logits[:1], params[:1], [[1]])  # no outputs / stop ids


@pytest.mark.parametrize("kw", [{"min_tokens": 5, "max_tokens": 4}, {"min_tokens": -1}, {"min_tokens": True},
                                {"min_tokens": 2, "guided_json": True}])
def test_min_tokens_validation(kw):
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(**kw)


@pytest.mark.parametrize("field, value", [("stop", ["a\ud800"]), ("bad_words", ["\udfff"]), ("guided_regex", "\ud800"),
                                          ("guided_grammar", 'root ::= "\ud800"'), ("guided_choice", ["\ud800"])])
def test_text_fields_refuse_lone_surrogates(field, value):
    # Not Unicode text: the tokenizer raised a TypeError for them inside the engine's worker (which died of it).
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_zero_noise_never_draws_a_removed_id(monkeypatch):
    """The exponential race divides by Exp(1) noise; a draw of exactly 0 (rare, but a float can be 0) at an id
    that top-k removed made 0 / 0 = NaN there, which argmax takes. With every draw 0, seeded and unseeded rows
    still pick an id the filters kept."""
    from cpm4.engine.sampling import Sampler, sample_tokens

    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, *a, **k: self.zero_())
    logits = _rand_logits(4, 50, seed=3)
    params = [SamplingParams(temperature=1.0, top_k=5, seed=s) for s in (None, None, 7, 8)]
    toks = sample_tokens(logits, [Sampler(p) for p in params], params, [[]] * 4).tolist()
    kept = torch.topk(logits, 5, dim=-1).indices.tolist()
    assert all(t in k for t, k in zip(toks, kept)), (toks, kept)
