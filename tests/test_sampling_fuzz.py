"""Seeded randomized property test of batched logits processing and sampling (`cpm4.engine.sampling`).

Each case is a batch of 1-9 rows over a small vocabulary, every row with its own random mix of parameters
(edge values included), logits with ties and -inf entries, prompt histories and outputs. `process_logits` is
checked row by row against a naive float64 reference written from the documented semantics (vLLM/OpenAI
rules, Hugging Face filter order: see `_reference`), against the same row alone and in a permuted batch,
and against a plan reused across steps as the scheduler does; `sample_tokens` is checked for greedy argmax,
seeded reproducibility independent of the batch, and never drawing a token the processing removed.
"""

import math
import random

import numpy as np
import pytest
import torch

from cpm4.engine.sampling import (
    Sampler,
    SamplingParams,
    SamplingPlan,
    process_logits,
    sample_batch,
    sample_tokens,
)

NEG = float("-inf")
CASES = 160
DRAWS = 12


# ---------------------------------------------------------------------------------------------------------
# Random cases


class Case:
    def __init__(self, logits, params, prompts, outputs, stop_ids, bad_ids):
        self.logits, self.params, self.prompts = logits, params, prompts
        self.outputs, self.stop_ids, self.bad_ids = outputs, stop_ids, bad_ids

    @property
    def vocab(self) -> int:
        return self.logits.shape[1]

    def history(self, i: int) -> list[int]:
        return self.prompts[i] + self.outputs[i]

    def rows(self, idx: list[int]) -> tuple:
        """process_logits' arguments for the rows `idx` (fresh lists: the callee must not rely on sharing)."""
        return (self.logits[idx], [self.params[i] for i in idx], [self.history(i) for i in idx],
                [list(self.outputs[i]) for i in idx], [list(self.stop_ids[i]) for i in idx],
                [list(self.bad_ids[i]) for i in idx])

    def samplers(self, idx: list[int]) -> list[Sampler]:
        return [Sampler(self.params[i], "cpu", None, self.stop_ids[i], self.bad_ids[i]) for i in idx]


def _row_logits(rng: random.Random, vocab: int) -> list[float]:
    kind = rng.random()
    if kind < 0.4:  # a coarse grid: many exact ties, and float32 arithmetic on it stays exact
        row = [rng.randint(-40, 40) / 8 for _ in range(vocab)]
    elif kind < 0.8:
        row = [rng.gauss(0, 3) for _ in range(vocab)]
    else:  # peaked: one or a few tokens far ahead
        row = [rng.gauss(0, 1) for _ in range(vocab)]
        for t in rng.sample(range(vocab), rng.randint(1, 3)):
            row[t] = rng.choice([12.0, 25.0, row[t] + 8])
    if rng.random() < 0.5:  # removed upstream (e.g. padding ids)
        for t in rng.sample(range(vocab), rng.randint(1, vocab // 2)):
            row[t] = NEG
    if rng.random() < 0.05:  # a single finite token
        keep = rng.randrange(vocab)
        row = [v if t == keep else NEG for t, v in enumerate(row)]
        row[keep] = 0.0
    return row


def _row_params(rng: random.Random, vocab: int, out: list[int]) -> tuple[SamplingParams, list[int], list[tuple]]:
    kw: dict = {}
    greedy = rng.random() < 0.3
    if greedy:
        kw["temperature"] = rng.choice([0.0, 0.0, 1e-6])  # below 1e-5 is greedy too
    else:
        kw["temperature"] = rng.choice([1.0, 1.0, 0.5, 2.0, 0.25, 1e-3, rng.uniform(0.05, 3.0)])
    if rng.random() < 0.45:
        kw["top_k"] = rng.choice([1, 1, 2, 3, rng.randint(1, vocab), vocab - 1, vocab, vocab + 7, -1, 0])
    if rng.random() < 0.45:
        kw["top_p"] = rng.choice([1.0, 1e-6, 0.1, 0.5, 0.9, 0.99, rng.uniform(0.01, 1.0)])
    if rng.random() < 0.35:
        kw["min_p"] = rng.choice([0.0, 1e-3, 0.05, 0.3, 0.9, 0.999, 1.0])
    if rng.random() < 0.4:
        kw["repetition_penalty"] = rng.choice([0.5, 2.0, 1.3, rng.uniform(0.2, 3.0)])
    if rng.random() < 0.4:
        kw["presence_penalty"] = rng.choice([-2.0, 2.0, 0.5, rng.uniform(-2, 2)])
    if rng.random() < 0.4:
        kw["frequency_penalty"] = rng.choice([-2.0, 2.0, -0.25, rng.uniform(-2, 2)])
    if rng.random() < 0.35:
        kw["logit_bias"] = {rng.randrange(vocab): rng.choice([-100.0, 100.0, 0.5, -3.25, rng.uniform(-10, 10)])
                            for _ in range(rng.randint(1, 5))}
    if rng.random() < 0.25:
        kw["allowed_token_ids"] = rng.sample(range(vocab), rng.randint(1, max(1, vocab // 3)))
    if rng.random() < 0.3:
        kw["max_tokens"] = 16
        kw["min_tokens"] = rng.randint(1, 12)  # below, at or above the output length
    bad: list[tuple] = []
    if rng.random() < 0.3:
        kw["bad_words"] = ["w"]  # the text is the tokenizer's business: the ids are given below
        for _ in range(rng.randint(1, 3)):
            n = rng.randint(1, 3)
            if len(out) >= n - 1 and rng.random() < 0.7:  # prefix = the output's tail: the last token is banned
                bad.append(tuple(out[len(out) - (n - 1):]) + (rng.randrange(vocab),))
            else:
                bad.append(tuple(rng.randrange(vocab) for _ in range(n)))
    if rng.random() < 0.6:
        kw["seed"] = rng.randrange(-(2**63), 2**63)
    stop = rng.sample(range(vocab), rng.randint(0, 3))
    return SamplingParams(**kw), stop, bad


def _case(seed: int) -> Case:
    rng = random.Random(seed)
    vocab = rng.randint(50, 300)
    bsz = rng.randint(1, 9)
    params, prompts, outputs, stops, bads, rows = [], [], [], [], [], []
    for _ in range(bsz):
        pool = rng.sample(range(vocab), rng.randint(1, 8))  # a few ids: outputs repeat (frequency counts > 1)
        out = [rng.choice(pool) for _ in range(rng.randint(0, 10))]
        p, stop, bad = _row_params(rng, vocab, out)
        params.append(p)
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(0, 10))])
        outputs.append(out)
        stops.append(stop)
        bads.append(bad)
        rows.append(_row_logits(rng, vocab))
    logits = torch.tensor(rows, dtype=torch.float32)
    if rng.random() < 0.2:  # the model's dtype; processing works in float32
        logits = logits.to(torch.bfloat16)
    for p in params:
        p.check_vocab(vocab)
    return Case(logits, params, prompts, outputs, stops, bads)


# ---------------------------------------------------------------------------------------------------------
# The float64 reference


class Ref:
    """A row's expected processed logits: `z`, float64 with -inf for removed ids. The filters may leave one
    group of exactly tied tokens partly kept (top-p with ties: which of them is the code's choice): `quota` of
    `group` then stay finite. `ambiguous`: some filter decision lies within float32 rounding of its threshold,
    so only the properties that do not hinge on it are checked. `tol`: float32 error allowed on values."""

    def __init__(self, z: np.ndarray, tol: float) -> None:
        self.z, self.tol = z, tol
        self.group: set[int] = set()
        self.quota = 0
        self.ambiguous = False
        self.scaled = z.copy()  # after temperature, before the filters (greedy rows stop before both)


def _reference(x: np.ndarray, p: SamplingParams, hist: list[int], out: list[int], stop: list[int],
               bad: list[tuple]) -> Ref:
    """The documented semantics, one token at a time in float64. process_logits' docstring: bias, repetition
    penalty, presence/frequency penalties, then (sampled rows only) temperature, top-k, top-p, min-p (Hugging
    Face's order, also vLLM V0's). Masks (allowed ids, bad words, min_tokens) are applied after the penalties
    here: -inf is unchanged by every step before the filters, so their place must not matter."""
    z = x.astype(np.float64).copy()
    for t, b in (p.logit_bias or {}).items():  # OpenAI: added to the logit before sampling
        z[t] += b
    if p.repetition_penalty != 1.0:  # vLLM/HF (CTRL): each id seen in prompt or output, once
        r = p.repetition_penalty
        for t in set(hist):
            z[t] = z[t] / r if z[t] > 0 else z[t] * r
    for t in set(out):  # OpenAI: over the generated tokens only
        z[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
    banned = np.zeros(len(z), dtype=bool)
    if p.allowed_token_ids:
        banned[:] = True
        banned[p.allowed_token_ids] = False
    if p.bad_words:
        for seq in bad:
            k = len(seq) - 1
            if len(out) >= k and tuple(out[len(out) - k:]) == tuple(seq[:-1]):
                banned[seq[-1]] = True
    if len(out) < p.min_tokens:
        banned[stop] = True
    z[banned] = NEG
    fin = np.isfinite(z)
    tol = 4e-6 * max(1.0, float(np.abs(z[fin]).max()) if fin.any() else 1.0)
    ref = Ref(z, tol)
    if p.greedy or not fin.any():
        return ref

    z = z / p.temperature
    ref.scaled = z.copy()
    ref.tol = tol = 4e-6 * max(1.0, float(np.abs(z[fin]).max()))
    vocab = len(z)
    if p.min_p > 0.0:  # first, as vLLM's V1 sampler: top-p's nucleus is taken from what it keeps
        # p_i >= min_p * p_max, i.e. z_i - z_max >= log(min_p)
        d = z - z.max()
        fin = np.isfinite(d)
        ref.ambiguous |= bool((fin & (np.abs(d - math.log(p.min_p)) <= 4 * tol + 1e-5) & (d != 0)).any())
        z = np.where(d >= math.log(p.min_p), z, NEG)
    if 0 < p.top_k < vocab:
        kth = np.sort(z)[::-1][p.top_k - 1]
        if np.isfinite(kth):
            near = np.abs(z - kth)
            ref.ambiguous |= bool(((near > 0) & (near <= 2 * tol)).any())
            z = np.where(z >= kth, z, NEG)  # ties with the k-th value are kept (the code's promise)
    if p.top_p < 1.0:
        # Smallest prefix of the descending order whose mass reaches top_p; ids tied in value at the cut may
        # be kept in any order, so the count kept from that tie group is what is determined.
        e = np.exp(z - z.max())
        probs = e / e.sum()
        order = sorted(np.flatnonzero(np.isfinite(z)), key=lambda t: -z[t])
        before, kept = 0.0, []
        margin = math.inf
        for j, t in enumerate(order):
            if j > 0:
                margin = min(margin, abs(before - p.top_p))
                if before >= p.top_p:
                    break
            kept.append(t)
            before += probs[t]
        cut = len(kept)
        # float32 cumsum and softmax error, and near ties straddling the cut (their order may swap).
        ref.ambiguous |= margin <= 3e-5 + 4 * tol
        if cut < len(order):
            gap = z[order[cut - 1]] - z[order[cut]]
            ref.ambiguous |= 0 < gap <= 2 * tol
            last = z[order[cut - 1]]
            tied = {t for t in order if z[t] == last}
            inside = tied & set(kept)
            if inside != tied:
                ref.group, ref.quota = tied, len(inside)
        keep = np.zeros(vocab, dtype=bool)
        keep[kept] = True
        keep[list(ref.group)] = True  # finite for now: `quota` says how many stay
        z = np.where(keep, z, NEG)
    ref.z = z
    return ref


def _check_row(got: torch.Tensor, ref: Ref, what: str) -> None:
    y = got.double().numpy()
    fin_y = np.isfinite(y)
    assert not np.isnan(y).any() and not np.isposinf(y).any(), f"{what}: NaN or +inf in {y}"
    # Whatever the filters decide, they only remove ids, keep the maximum and leave the other values alone.
    pre = np.isfinite(ref.scaled)
    assert not (fin_y & ~pre).any(), f"{what}: finite ids {np.flatnonzero(fin_y & ~pre)} that the masks removed"
    np.testing.assert_allclose(y[fin_y], ref.scaled[fin_y], rtol=0, atol=ref.tol, err_msg=what)
    if pre.any():
        assert fin_y.any() and abs(y[fin_y].max() - ref.scaled[pre].max()) <= ref.tol, f"{what}: max removed"
    if ref.ambiguous:
        return
    must = np.isfinite(ref.z)
    must[list(ref.group)] = False
    assert fin_y[must].all(), f"{what}: ids removed that the reference keeps: {np.flatnonzero(must & ~fin_y)}"
    extra = set(np.flatnonzero(fin_y & ~must).tolist())
    assert extra <= ref.group and len(extra) == ref.quota, \
        f"{what}: finite ids {sorted(extra)} beyond the reference's (tie group {sorted(ref.group)}, {ref.quota})"


# ---------------------------------------------------------------------------------------------------------
# The property


def _process(c: Case, idx: list[int], plan: SamplingPlan | None = None) -> torch.Tensor:
    logits, params, hist, outs, stops, bads = c.rows(idx)
    return process_logits(logits, params, hist, plan, outs, None, stops, bads)


def test_process_logits_matches_reference_and_batch_independent():
    ambiguous = filtered = 0
    for seed in range(CASES):
        c = _case(seed)
        bsz = len(c.params)
        every = list(range(bsz))
        got = _process(c, every)
        assert got.dtype == torch.float32 and got.shape == c.logits.shape
        for i in every:
            ref = _reference(c.logits[i].double().numpy(), c.params[i], c.history(i), c.outputs[i],
                             c.stop_ids[i], c.bad_ids[i])
            if not c.params[i].greedy:
                filtered += 1
                ambiguous += ref.ambiguous
            _check_row(got[i], ref, f"case {seed} row {i} {c.params[i]}")
            # Alone in a batch of one: the very same row (seeded draws depend on it bit for bit).
            assert torch.equal(_process(c, [i])[0], got[i]), f"case {seed} row {i}: differs alone"
        perm = every[:]
        random.Random(seed).shuffle(perm)
        assert torch.equal(_process(c, perm), got[perm]), f"case {seed}: differs in another order"
    # The reference decides most rows exactly; otherwise this test would check little.
    assert ambiguous <= 0.15 * filtered, (ambiguous, filtered)


def test_plan_reused_across_steps_matches_a_fresh_plan():
    """The scheduler keeps a batch's plan while its params are the same objects, appending each step's token
    to the histories and outputs in place; every step must equal one planned afresh."""
    for seed in range(CASES // 2):
        c = _case(seed)
        every = list(range(len(c.params)))
        logits, params, hist, outs, stops, bads = c.rows(every)
        plan = SamplingPlan(params, c.vocab)
        samplers = c.samplers(every)
        gen = torch.Generator().manual_seed(seed)
        for step in range(3):
            assert plan.matches(params, c.vocab)
            step_logits = logits if step == 0 else (torch.randn(logits.shape, generator=gen) * 3).to(logits.dtype)
            fresh = process_logits(step_logits, params, hist, None, outs, None, stops, bads)
            reused = process_logits(step_logits, params, hist, plan, outs, None, stops, bads)
            assert torch.equal(fresh, reused), f"case {seed} step {step}"
            toks = sample_tokens(step_logits, samplers, params, hist, plan, outs).tolist()
            for i, t in enumerate(toks):
                hist[i].append(t)
                outs[i].append(t)


def _first_argmax(row: torch.Tensor) -> int:
    best = row.max()
    return int((row == best).nonzero()[0, 0])


def test_sampling_greedy_seeded_and_never_removed():
    torch.manual_seed(0)  # the unseeded rows draw from the global generator
    for seed in range(CASES):
        c = _case(seed)
        every = list(range(len(c.params)))
        logits, params, hist, outs, _, _ = c.rows(every)
        x = _process(c, every)
        live = torch.isfinite(x).any(dim=1)
        samplers = c.samplers(every)
        first: list[int] = []
        for draw in range(DRAWS):
            toks = sample_batch(logits, samplers, params, hist, None, outs)
            if draw == 0:
                first = toks
            for i, t in enumerate(toks):
                assert 0 <= t < c.vocab
                if live[i]:
                    assert torch.isfinite(x[i, t]), f"case {seed} row {i} draw {draw}: removed id {t} sampled"
                if params[i].greedy:  # the first maximal id, as torch.argmax (the code's promise)
                    assert t == _first_argmax(x[i]), f"case {seed} row {i}: not the argmax"
        # Seeded rows: the same draws from fresh samplers, alone, and from the Sampler on the processed row.
        again = sample_batch(logits, c.samplers(every), params, hist, None, outs)
        for i, p in enumerate(params):
            if p.seed is None or p.greedy:
                continue
            assert again[i] == first[i], f"case {seed} row {i}: seeded draw not reproducible"
            alone = sample_batch(logits[i:i + 1], c.samplers([i]), [p], [hist[i]], None, [outs[i]])
            assert alone == [first[i]], f"case {seed} row {i}: seeded draw depends on the batch"
            assert c.samplers([i])[0].sample(x[i]) == first[i], f"case {seed} row {i}: not its own sampler's"


# ---------------------------------------------------------------------------------------------------------
# Rejected parameters


@pytest.mark.parametrize("kw, field", [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.0001}, "top_p"),
    ({"top_p": -0.1}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 2.5}, "top_k"),
    ({"min_p": -1e-9}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_p": float("nan")}, "min_p"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"repetition_penalty": -1.0}, "repetition_penalty"),
    ({"repetition_penalty": float("nan")}, "repetition_penalty"),
    ({"presence_penalty": -2.01}, "presence_penalty"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"logit_bias": {3: 100.5}}, "logit_bias"),
    ({"logit_bias": {3: float("nan")}}, "logit_bias"),
    ({"logit_bias": {-3: 1.0}}, "logit_bias"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"allowed_token_ids": [1, -1]}, "allowed_token_ids"),
    ({"min_tokens": 17, "max_tokens": 16}, "min_tokens"),
    ({"stop_token_ids": [-5]}, "stop_token_ids"),
    ({"bad_words": [" "]}, "bad_words"),
    ({"seed": 2**63}, "seed"),
])
def test_invalid_params_raise_naming_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_off_values_accepted_and_vocab_checked():
    # top_k 0 and -1 both mean off (vLLM's), top_p 1 and min_p 0/1 are in range.
    for kw in ({"top_k": 0}, {"top_k": -1}, {"top_p": 1.0}, {"min_p": 0.0}, {"min_p": 1.0}, {"temperature": 0}):
        SamplingParams(**kw).check_vocab(10)
    SamplingParams(logit_bias={9: 1.0}, allowed_token_ids=[0, 9]).check_vocab(10)
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={10: 1.0}).check_vocab(10)
    with pytest.raises(ValueError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=[3, 10]).check_vocab(10)
    # process_logits refuses what it cannot apply rather than silently dropping it.
    x = torch.zeros(1, 10)
    with pytest.raises(ValueError, match="logit_bias"):
        process_logits(x, [SamplingParams(logit_bias={12: 1.0})], [[]])
    with pytest.raises(ValueError, match="bad_words"):
        process_logits(x, [SamplingParams(bad_words=["w"])], [[]])
    with pytest.raises(ValueError, match="min_tokens"):
        process_logits(x, [SamplingParams(min_tokens=1)], [[]], outputs=[[]])


# ---------------------------------------------------------------------------------------------------------
# Bugs found (kept failing until fixed)


@pytest.mark.parametrize("kw", [{"repetition_penalty": 1e39}, {"repetition_penalty": 1e-46},
                                {"temperature": 1e39}, {"temperature": float("inf")}])
def test_params_beyond_float32_range_are_refused(kw):
    """Found by this file: temperature and repetition_penalty were validated as finite float64 but applied in
    float32, where 1e39 is inf and 1e-46 is 0; 0 * inf or -inf / inf made NaN logits, which argmax and the
    sampler took (temperature 0, repetition_penalty 1e39, logits [1, 0], history [1]: token 1, not 0; a
    temperature of 1e39 drew an id outside allowed_token_ids). Now refused, naming the field."""
    with pytest.raises(ValueError, match=next(iter(kw))):
        SamplingParams(**kw)


@pytest.mark.parametrize("kw, logits, history, want", [
    # The bounds themselves stay finite in float32 for any logit: 0 * 1e30 = 0 beats -1e30.
    ({"temperature": 0, "repetition_penalty": 1e30}, [-1.0, 0.0], [0], 1),
    ({"temperature": 0, "repetition_penalty": 1e-30, "allowed_token_ids": [0]}, [-1.0, 0.0], [1], 0),
    ({"temperature": 1e30, "allowed_token_ids": [1]}, [0.0, 0.0], [], 1),
    ({"temperature": 1e30, "allowed_token_ids": [1], "seed": 3}, [0.0, 0.0], [], 1),
])
def test_params_at_the_float32_bounds(kw, logits, history, want):
    p = SamplingParams(**kw)
    x = torch.tensor([logits])
    assert not process_logits(x, [p], [history]).isnan().any()
    assert {sample_batch(x, [Sampler(p)], [p], [history])[0] for _ in range(5)} == {want}


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
def test_non_numeric_float_field_raises_value_error(field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: "0.5"})


@pytest.mark.parametrize("key", [1.5, True])
def test_logit_bias_non_integer_key_rejected(key):
    """Found by this file: keys went through int(), so 1.5 (or True) was quietly token id 1."""
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={key: 1.0})
