"""Sampling: per-step logits processing, seeded samplers and stop strings (the request parameters are
`cpm4.engine.params`, re-exported here)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from cpm4.model.transfer import to_device

from .params import GRAMMAR_FIELDS, SamplingParams, nth_seed, processor_takes_prompt, valid_text

__all__ = ["GRAMMAR_FIELDS", "Sampler", "SamplingParams", "SamplingPlan", "StopStringMatcher", "nth_seed",
           "process_logits", "sample_batch", "sample_tokens", "valid_text"]

# ---------------------------------------------------------------------------------------------------------
# Logits processing


class SamplingPlan:
    """Which rows of a batch take which logits transform and how each is sampled, worked out from the rows'
    params once. The engine's decode batch keeps the same requests for many steps: it passes the plan of the
    previous step while the params are the same objects, instead of walking every row's settings (and
    building the same small index and value tensors) again each step."""

    def __init__(self, params: Sequence[SamplingParams], vocab: int) -> None:
        self.params = list(params)
        self.vocab = vocab
        self.penalty = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        self.output_penalty = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty]
        self.biased = [i for i, p in enumerate(params) if p.logit_bias]
        self.restricted = [i for i, p in enumerate(params) if p.allowed_token_ids]
        self.bad_rows = [i for i, p in enumerate(params) if p.bad_words]
        self.min_rows = [i for i, p in enumerate(params) if p.min_tokens]
        self.guided = [i for i, p in enumerate(params) if p.guided]
        self.processed = [i for i, p in enumerate(params) if p.logits_processors]
        # Each processed row's processors with the form each is called in (its signature read once a plan).
        self.processors = {i: [(fn, processor_takes_prompt(fn)) for fn in params[i].logits_processors]
                           for i in self.processed}
        self.sampled = [i for i, p in enumerate(params) if not p.greedy]
        # Below: positions within `sampled` (the filters run on those rows only).
        sp = [params[i] for i in self.sampled]
        self.temps = [p.temperature for p in sp] if any(p.temperature != 1.0 for p in sp) else None
        self.k_rows = [j for j, p in enumerate(sp) if 0 < p.top_k < vocab]
        self.p_rows = [j for j, p in enumerate(sp) if p.top_p < 1.0]
        self.m_rows = [j for j, p in enumerate(sp) if p.min_p > 0.0]
        self.ks = [sp[j].top_k for j in self.k_rows]
        self.ps = [sp[j].top_p for j in self.p_rows]
        self.mps = [sp[j].min_p for j in self.m_rows]
        # Unseeded sampled rows draw together from the device's generator; seeded ones from their own.
        self.shared = [i for i, p in enumerate(params) if not p.greedy and p.seed is None]
        self.seeded = [i for i, p in enumerate(params) if not p.greedy and p.seed is not None]
        self._tensors: dict[tuple, Tensor] = {}

    def matches(self, params: Sequence[SamplingParams], vocab: int) -> bool:
        """Whether this plan is for these very params objects (identity: params are not compared by value)."""
        return (vocab == self.vocab and len(params) == len(self.params)
                and all(map(operator.is_, params, self.params)))

    def tensor(self, name: str, values: Sequence[float] | Sequence[int], device: torch.device,
               dtype: torch.dtype) -> Tensor:
        """`torch.tensor(values)` on device, built once per plan."""
        key = (name, device, dtype)
        t = self._tensors.get(key)
        if t is None:
            t = self._tensors[key] = to_device(values, device, dtype)
        return t


def _on_rows(x: Tensor, rows: list[int], fn: Callable[[Tensor], None], idx: Tensor | None = None) -> None:
    """Run the in-place `fn` on a subset of rows of `x`, avoiding a gather/scatter when all rows take part.
    idx: `rows` as a tensor on x's device, when the caller has it."""
    if not rows:
        return
    if len(rows) == x.shape[0]:
        fn(x)
        return
    if idx is None:
        idx = torch.tensor(rows, device=x.device, dtype=torch.long)
    sub = x.index_select(0, idx)
    fn(sub)
    x.index_copy_(0, idx, sub)


def _col(values: Sequence[float], like: Tensor) -> Tensor:
    return torch.tensor(values, device=like.device, dtype=like.dtype).unsqueeze(1)


def _apply_repetition_penalty(x: Tensor, params: list[SamplingParams], history: list[list[int]],
                              candidates: list[int] | None = None) -> None:
    """candidates: the rows whose penalty is not 1 (default: found from params)."""
    if candidates is None:
        candidates = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    rows = [i for i in candidates if len(history[i]) > 0]
    if not rows:
        return
    # One boolean "seen" mask per row: duplicate ids collapse, so each token is penalised once.
    row_ids = [i for i in rows for _ in range(len(history[i]))]
    col_ids = [t for i in rows for t in history[i]]
    seen = torch.zeros_like(x, dtype=torch.bool)
    seen[
        torch.tensor(row_ids, device=x.device, dtype=torch.long),
        torch.tensor(col_ids, device=x.device, dtype=torch.long),
    ] = True
    pen = torch.ones(x.shape[0], dtype=x.dtype)
    pen[rows] = torch.tensor([params[i].repetition_penalty for i in rows], dtype=x.dtype)
    pen = pen.to(x.device).unsqueeze(1)
    penalised = torch.where(x > 0, x / pen, x * pen)
    x.copy_(torch.where(seen, penalised, x))


def _ban_bad_words(x: Tensor, outputs: Sequence[Sequence[int]], bad_ids: Sequence[Sequence[tuple[int, ...]]],
                   rows: list[int]) -> None:
    """-inf for each bad word's last token where the row's output ends with the word's other tokens."""
    r, c = [], []
    for i in rows:
        out = outputs[i]
        for seq in bad_ids[i]:
            k = len(seq) - 1
            if seq[-1] < x.shape[1] and len(out) >= k and tuple(out[len(out) - k:]) == seq[:-1]:
                r.append(i)
                c.append(seq[-1])
    if r:
        x[torch.tensor(r, device=x.device), torch.tensor(c, device=x.device)] = float("-inf")


def _run_processors(x: Tensor, plan: SamplingPlan, history: Sequence[Sequence[int]],
                    outputs: Sequence[Sequence[int]], failed: list[tuple[int, Exception]] | None) -> None:
    """Each processed row through its logits processors, in order, on its row of x (a view: one written in place
    and returned costs no copy). The ids are fresh lists each call, so a processor may keep or change them.
    failed: a row whose processor raises (or returns no [V] tensor) is recorded there as (row, error) and the
    batch goes on (its row then holds whatever the processors left); None: the error propagates."""
    vocab = x.shape[1]
    for i in plan.processed:
        out, hist = outputs[i], history[i]
        n_prompt = len(hist) - len(out)  # (history: the prompt's ids, then the output's)
        view = row = x[i]
        try:
            for fn, with_prompt in plan.processors[i]:
                row = fn(list(hist[:n_prompt]), list(out), row) if with_prompt else fn(list(out), row)
                if not isinstance(row, Tensor) or tuple(row.shape) != (vocab,):
                    what = f"shape {tuple(row.shape)}" if isinstance(row, Tensor) else type(row).__name__
                    raise TypeError(f"logits processor {getattr(fn, '__name__', type(fn).__name__)} returned "
                                    f"{what}: it must return the logits row, a tensor of shape ({vocab},)")
        except Exception as e:
            if failed is None:
                raise
            failed.append((i, e))
            continue
        if row is not view:
            view.copy_(row)


def _keep_allowed(x: Tensor, plan: SamplingPlan) -> None:
    """-inf for every id but the row's allowed_token_ids (the mask built once per plan: a decode batch keeps
    its plan for many steps)."""
    rows, key = plan.restricted, ("allowed", x.device, x.shape[1])
    banned = plan._tensors.get(key)
    if banned is None:
        keep = torch.zeros(len(rows), x.shape[1], dtype=torch.bool)
        for j, i in enumerate(rows):
            keep[j, [t for t in plan.params[i].allowed_token_ids if t < x.shape[1]]] = True
        banned = plan._tensors[key] = to_device(~keep, x.device)
    idx = plan.tensor("restricted", rows, x.device, torch.long)
    x[idx] = x[idx].masked_fill(banned, float("-inf"))


def _apply_logit_bias(x: Tensor, params: list[SamplingParams], rows: list[int],
                      plan: SamplingPlan | None = None) -> None:
    """plan: keeps the (row, id, bias) tensors for the steps of the same batch, built once (through pinned
    memory: a copy from a list waited for the GPU's queued work, a decode step launched ahead too)."""
    vocab = x.shape[1]
    plan = plan or SamplingPlan(params, vocab)
    keys = [(name, x.device, dtype) for name, dtype in (("bias_rows", torch.long), ("bias_ids", torch.long),
                                                         ("bias", x.dtype))]
    if keys[2] not in plan._tensors:
        r = [i for i in rows for _ in params[i].logit_bias]
        c = [t for i in rows for t in params[i].logit_bias]
        if max(c) >= vocab:
            raise ValueError(f"logit_bias token id {max(c)} is outside the vocabulary ({vocab} ids)")
        b = [v for i in rows for v in params[i].logit_bias.values()]
        for key, values in zip(keys, (r, c, b)):
            plan._tensors[key] = to_device(values, x.device, key[2])
    rr, cc, bb = (plan._tensors[k] for k in keys)
    x.index_put_((rr, cc), bb, accumulate=True)


def _apply_output_penalties(x: Tensor, params: list[SamplingParams], outputs: list[list[int]],
                            rows: list[int]) -> None:
    """logit -= frequency_penalty * count + presence_penalty * (count > 0), counts over each row's output."""
    rows = [i for i in rows if outputs[i]]
    if not rows:
        return
    r = torch.tensor([i for i in rows for _ in outputs[i]], device=x.device)
    c = torch.tensor([t for i in rows for t in outputs[i]], device=x.device)
    counts = torch.zeros_like(x).index_put_((r, c), torch.ones(len(c), device=x.device, dtype=x.dtype),
                                            accumulate=True)
    freq = torch.zeros(x.shape[0], dtype=x.dtype)
    pres = torch.zeros(x.shape[0], dtype=x.dtype)
    freq[rows] = torch.tensor([float(params[i].frequency_penalty) for i in rows], dtype=x.dtype)
    pres[rows] = torch.tensor([float(params[i].presence_penalty) for i in rows], dtype=x.dtype)
    x.sub_(counts * freq.to(x.device)[:, None] + (counts > 0) * pres.to(x.device)[:, None])


def _top_k(x: Tensor, ks: list[int], kth_idx: Tensor | None = None) -> None:
    """kth_idx: [k - 1 for k in ks] as a [R, 1] tensor on x's device, when the caller has it."""
    k_max = max(ks)
    vals = torch.topk(x, k_max, dim=-1).values
    if kth_idx is None:
        kth_idx = torch.tensor([k - 1 for k in ks], device=x.device).unsqueeze(1)
    kth = vals.gather(1, kth_idx)
    # Threshold on the k-th value: ties with it are kept, so argmax is never removed.
    x.masked_fill_(x < kth, float("-inf"))


# On the CPU a row's nucleus is first looked for among its this many most likely tokens: a top-k of them costs
# ≈ 0.6 ms on a 73K vocabulary against ≈ 5.6 ms for sorting all of it. Rows whose nucleus is wider sort in full.
TOP_P_CANDIDATES = 1024


def _nucleus_drop(sorted_p: Tensor, p: Tensor) -> Tensor:
    """Which of each row's tokens, sorted by probability (descending), top-p drops: a token is kept while the mass
    strictly before it is still < p, which yields the smallest prefix reaching p and always keeps the first."""
    before = torch.zeros_like(sorted_p)
    before[:, 1:] = sorted_p.cumsum(dim=-1)[:, :-1]
    drop = before >= p
    drop[:, 0] = False
    return drop


def _top_p(x: Tensor, ps: list[float], col: Tensor | None = None) -> None:
    probs = torch.softmax(x, dim=-1)
    p = _col(ps, x) if col is None else col
    k = TOP_P_CANDIDATES
    drop = None
    if x.device.type == "cpu" and k < x.shape[1]:  # (on a GPU the full sort is cheap, and the test would sync)
        top, idx = probs.topk(k, dim=-1)
        # The token after the k candidates is dropped when the candidates' mass reaches p; so are all after it.
        wide = (top.cumsum(dim=-1)[:, -1:] < p)[:, 0].nonzero()[:, 0]
        if len(wide) < x.shape[0]:  # (a flat distribution, as a random model's: every row sorts in full)
            drop = torch.ones_like(x, dtype=torch.bool).scatter_(1, idx, _nucleus_drop(top, p))
            if len(wide):
                drop[wide] = _sorted_drop(probs[wide], p[wide])
    if drop is None:
        drop = _sorted_drop(probs, p)
    x.masked_fill_(drop, float("-inf"))


def _sorted_drop(probs: Tensor, p: Tensor) -> Tensor:
    """`_nucleus_drop` over the whole vocabulary, in the tokens' own order."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    return torch.zeros_like(sorted_p, dtype=torch.bool).scatter_(1, order, _nucleus_drop(sorted_p, p))


def _min_p(x: Tensor, mps: list[float], col: Tensor | None = None) -> None:
    probs = torch.softmax(x, dim=-1)
    thresh = probs.amax(dim=-1, keepdim=True) * (_col(mps, x) if col is None else col)
    x.masked_fill_(probs < thresh, float("-inf"))


def _ban_stops(x: Tensor, params: list[SamplingParams], outputs: list[list[int]], stop_ids: Sequence[Sequence[int]],
               rows: list[int]) -> None:
    """min_tokens: the rows that have generated fewer cannot sample their stop ids (EOS, stop_token_ids)."""
    vocab = x.shape[1]
    pairs = [(i, t) for i in rows if len(outputs[i]) < params[i].min_tokens for t in stop_ids[i] if t < vocab]
    if pairs:
        r, c = zip(*pairs)
        x.index_put_((torch.tensor(r, device=x.device), torch.tensor(c, device=x.device)),
                     torch.tensor(float("-inf"), device=x.device))


def process_logits(logits: Tensor, params: list[SamplingParams], history: list[list[int]],
                   plan: SamplingPlan | None = None, outputs: list[list[int]] | None = None,
                   matchers: Sequence[Any] | None = None, stop_ids: Sequence[Sequence[int]] | None = None,
                   bad_ids: Sequence[Sequence[tuple[int, ...]]] | None = None,
                   failed: list[tuple[int, Exception]] | None = None) -> Tensor:
    """Apply the rows' logits processors (vLLM V0's, first), the grammar masks, logit bias, repetition penalty,
    presence/frequency penalties, then temperature, min-p, top-k and top-p (vLLM's order; Hugging Face applies
    min-p last, which changes top-p's nucleus) to [B, V] logits.

    `history[i]` holds row i's prompt and generated ids, `outputs[i]` its generated ids alone (needed when a
    row has logits processors, a presence or frequency penalty, or min_tokens: then `stop_ids[i]` are the ids it
    may not sample before, its EOS and stop_token_ids). Returns a new float32 tensor; removed tokens are -inf.
    Greedy rows only get the processors, bias and penalties: the filters keep the argmax, so they cannot change
    a greedy pick.
    plan: `SamplingPlan(params, V)` kept from an earlier call with the same params (else built here).
    matchers: row i's grammar matcher where params[i] is guided (see `cpm4.engine.guided`), else None.
    bad_ids: row i's bad words as token sequences (`Sampler.bad_ids`), where params[i] has bad_words.
    failed: where rows whose logits processor raised are recorded, the others processed on (`_run_processors`);
    None: the processor's error propagates.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    bsz, vocab = logits.shape
    if len(params) != bsz or len(history) != bsz:
        raise ValueError(f"need params and history per row: B={bsz}, got {len(params)} and {len(history)}")
    if plan is None:
        plan = SamplingPlan(params, vocab)
    x = logits.to(torch.float32, copy=True)

    if plan.processed:
        # First of all, on the raw logits, as vLLM V0 ran them before its sampler (a grammar after them, as its
        # guided decoding was a processor appended to the request's own).
        if outputs is None or len(outputs) != bsz:
            raise ValueError("logits_processors need each row's generated ids (outputs)")
        _run_processors(x, plan, history, outputs, failed)
    if plan.guided:
        # First, so every later transform (and greedy's argmax) sees only the tokens the grammar allows.
        ms = [None if matchers is None or len(matchers) != bsz else matchers[i] for i in plan.guided]
        if any(m is None for m in ms):
            raise ValueError("rows with guided_json or structural_tag need their grammar matchers")
        from .guided import apply_grammar

        apply_grammar(x, plan.guided, ms)
    if plan.restricted:
        _keep_allowed(x, plan)
    if plan.bad_rows:
        if outputs is None or bad_ids is None or len(outputs) != bsz or len(bad_ids) != bsz:
            raise ValueError("bad_words needs each row's generated ids (outputs) and bad word token ids")
        _ban_bad_words(x, outputs, bad_ids, plan.bad_rows)
    if plan.biased:
        _apply_logit_bias(x, params, plan.biased, plan)
    if plan.min_rows:
        if outputs is None or stop_ids is None or len(outputs) != bsz or len(stop_ids) != bsz:
            raise ValueError("min_tokens needs each row's generated ids (outputs) and stop ids")
        _ban_stops(x, params, outputs, stop_ids, plan.min_rows)
    _apply_repetition_penalty(x, params, history, plan.penalty)
    if plan.output_penalty:
        if outputs is None or len(outputs) != bsz:
            raise ValueError("presence/frequency penalties need each row's generated ids (outputs)")
        _apply_output_penalties(x, params, outputs, plan.output_penalty)

    if not plan.sampled:
        return x
    dev = x.device

    def col(name: str, values: list[float]) -> Tensor:
        return plan.tensor(name, values, dev, torch.float32).unsqueeze(1)

    def filters(s: Tensor) -> None:
        # Row indices below are positions within `s`, i.e. within `sampled`.
        if plan.temps is not None:
            s.div_(col("temps", plan.temps))
        # min-p before top-k and top-p (vLLM's V1 order): top-p's nucleus is then taken from what min-p kept
        _on_rows(s, plan.m_rows, lambda t: _min_p(t, plan.mps, col("mps", plan.mps)),
                 plan.tensor("m_rows", plan.m_rows, dev, torch.long) if plan.m_rows else None)
        _on_rows(s, plan.k_rows, lambda t: _top_k(t, plan.ks, plan.tensor("k-1", [k - 1 for k in plan.ks], dev,
                                                                             torch.long).unsqueeze(1)),
                 plan.tensor("k_rows", plan.k_rows, dev, torch.long) if plan.k_rows else None)
        _on_rows(s, plan.p_rows, lambda t: _top_p(t, plan.ps, col("ps", plan.ps)),
                 plan.tensor("p_rows", plan.p_rows, dev, torch.long) if plan.p_rows else None)

    _on_rows(x, plan.sampled, filters, plan.tensor("sampled", plan.sampled, dev, torch.long))
    return x


# ---------------------------------------------------------------------------------------------------------
# Sampling


class Sampler:
    """Random state for one sequence, so its tokens depend only on its own seed and logits."""

    def __init__(self, params: SamplingParams, device: torch.device | str | None = None,
                 matcher: Any | None = None, stop_ids: Sequence[int] = (),
                 bad_ids: Sequence[tuple[int, ...]] = ()) -> None:
        """matcher: the sequence's grammar matcher when params are guided (`cpm4.engine.guided.new_matcher`).
        stop_ids: the token ids banned until min_tokens are generated (its stop_token_ids and EOS ids, the EOS
        even with ignore_eos, as vLLM). bad_ids: params.bad_words as token sequences (`bad_word_ids`)."""
        self.params = params
        self.matcher = matcher
        self.stop_ids = sorted(stop_ids)
        self.bad_ids = list(bad_ids)
        self.device = torch.device(device if device is not None else "cpu")
        self.generator = torch.Generator(device=self.device)
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
            self.seed = params.seed
        else:
            self.seed = self.generator.seed()  # non-deterministic, so unseeded runs differ

    def _draw(self, row: Tensor, greedy: bool, is_probs: bool = False) -> Tensor:
        """Pick one token as a 0-dim tensor (no host sync)."""
        row = row.reshape(-1)
        if greedy:
            return torch.argmax(row)  # first maximal index on ties
        probs = row.float() if is_probs else torch.softmax(row.float(), dim=-1)
        return _race(probs[None], row[None], [self.generator])[0]

    def sample(self, row: Tensor, is_probs: bool = False) -> int:
        """Sample one token from a processed logits row ([V] or [1, V]); pass `is_probs=True` for probs."""
        return int(self._draw(row, self.params.greedy, is_probs).item())


def sample_batch(
    logits: Tensor, samplers: list[Sampler], params: list[SamplingParams], history: list[list[int]],
    plan: SamplingPlan | None = None, outputs: list[list[int]] | None = None,
    failed: list[tuple[int, Exception]] | None = None,
) -> list[int]:
    """Process a [B, V] logits batch and draw one token per row with that row's sampler."""
    # One host sync for the whole batch.
    return sample_tokens(logits, samplers, params, history, plan, outputs, failed).tolist()


def sample_tokens(
    logits: Tensor, samplers: list[Sampler], params: list[SamplingParams], history: list[list[int]],
    plan: SamplingPlan | None = None, outputs: list[list[int]] | None = None,
    failed: list[tuple[int, Exception]] | None = None,
) -> Tensor:
    """`sample_batch` without the host sync: the tokens [B] (int64) on the logits' device. plan, outputs,
    failed: see `process_logits` (a failed row still draws a token, for the caller to discard)."""
    if len(samplers) != logits.shape[0]:
        raise ValueError(f"need one sampler per row: B={logits.shape[0]}, got {len(samplers)}")
    if plan is None:
        plan = SamplingPlan(params, logits.shape[1])
    matchers = [s.matcher for s in samplers] if plan.guided else None
    stop_ids = [s.stop_ids for s in samplers] if plan.min_rows else None
    bad_ids = [s.bad_ids for s in samplers] if plan.bad_rows else None
    x = process_logits(logits, params, history, plan, outputs, matchers, stop_ids, bad_ids, failed)
    # Seeded rows draw from their own generator (their tokens depend only on their seed); unseeded rows
    # draw together in one call from the device's default generator (one per row costs ~0.3 ms each).
    # argmax(p / E) with E ~ Exp(1) i.i.d. draws index i with probability p_i (the exponential race);
    # much faster than torch.multinomial on wide rows, on the CPU above all.
    shared = plan.shared
    if len(shared) == x.shape[0]:  # every row: no greedy pick, no gather/scatter of rows (same draws)
        probs = torch.softmax(x, dim=-1)
        tokens = (probs / _noise(probs)).argmax(dim=-1)
    else:
        tokens = x.argmax(dim=-1)
        if shared:
            rows = plan.tensor("shared", shared, x.device, torch.long)
            probs = torch.softmax(x[rows], dim=-1)
            tokens[rows] = (probs / _noise(probs)).argmax(dim=-1)
    if plan.seeded:  # their rows together, each row's noise from its own generator
        rows = plan.tensor("seeded", plan.seeded, x.device, torch.long)
        sx = x.index_select(0, rows)
        tokens.index_copy_(0, rows, _race(torch.softmax(sx, dim=-1), sx,
                                          [samplers[i].generator for i in plan.seeded]))
    return tokens


def _noise(probs: Tensor, generators: Sequence[torch.Generator] | None = None) -> Tensor:
    """Exp(1) noise shaped as probs [R, V] for the exponential race: from the default generator, or row r's from
    generators[r]. Kept above zero: a draw of exactly 0 (one in 2^24 or so a value) would make 0 / 0 = NaN at a
    removed id, which argmax takes."""
    q = torch.empty_like(probs)
    if generators is None:
        q.exponential_()
    else:
        for r, gen in enumerate(generators):
            q[r].exponential_(generator=gen)
    return q.clamp_min_(torch.finfo(q.dtype).tiny)


def _race(probs: Tensor, rows: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
    """One token per row of probs [R, V] (or weights: unnormalized is fine), row r's exponential noise drawn by
    generators[r]: argmax(p / E), E ~ Exp(1), picks id i with probability p_i (the exponential race, as the
    unseeded rows draw; one noise launch a row where multinomial ran a dozen kernels). A row that allows no
    token (every logit -inf: a grammar and allowed_token_ids or bad_words excluding each other) has NaN
    probabilities: it takes the argmax of `rows` (its logits) instead, not failing the batch (the grammar then
    rejects it and ends the sequence)."""
    drawn = (probs / _noise(probs, generators)).argmax(dim=-1)
    ok = torch.isfinite(probs).all(dim=-1) & (probs.sum(dim=-1) > 0)
    return torch.where(ok, drawn, rows.argmax(dim=-1))


# ---------------------------------------------------------------------------------------------------------
# Stop strings


class StopStringMatcher:
    """Streaming stop-string detection over detokenized text deltas.

    Text that could still turn into a stop string is held back. The stop taken is the first one to be
    completed in the text (earliest end; on a tie, the longest), which is what a token-by-token stream
    sees, so the output does not depend on how the text is split into deltas.
    """

    def __init__(self, stop: list[str] | None, include_stop_str_in_output: bool = False) -> None:
        self.stop = [s for s in (stop or []) if s]
        self.include_stop_str_in_output = include_stop_str_in_output
        self.stopped = False
        self.matched: str | None = None  # which stop string ended the text
        self._held = ""
        self._unchecked = 0  # leading chars of _held fed with check=False: no stop may end inside them

    def _find_stop(self, text: str, min_end: int = 0) -> tuple[int, str] | None:
        """The first stop completed in `text` past its first min_end chars: (start, stop)."""
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self.stop:
            i = text.find(s, max(0, min_end - len(s) + 1))
            if i >= 0:
                key = (i + len(s), -len(s), s)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, _, s = best
        return end - len(s), s

    def _held_len(self, text: str) -> int:
        """Longest suffix of `text` that is a proper prefix of some stop string."""
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def feed(self, delta: str, check: bool = True) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, whether a stop string was hit). check=False: text in
        which no stop string may end (vLLM's min_tokens: stop strings apply from the token after them); what
        could begin one is still held back, so a stop that starts there and ends in later text is found."""
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        text = self._held + delta
        found = self._find_stop(text, self._unchecked) if check else None
        if found is not None:
            start, s = found
            self.stopped, self.matched, self._held = True, s, ""
            return text[: start + len(s) if self.include_stop_str_in_output else start], True
        hold = self._held_len(text)
        self._held = text[len(text) - hold :]
        self._unchecked = len(self._held) if not check else max(0, self._unchecked - (len(text) - hold))
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Return the held-back tail at the end of generation (empty after a stop)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
