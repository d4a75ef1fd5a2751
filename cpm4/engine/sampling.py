"""Sampling: request parameters, per-step logits processing, seeded samplers and stop strings."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cpm4.model.transfer import to_device

# Temperatures below this are treated as greedy (as vLLM does): dividing by ~0 overflows.
_GREEDY_EPS = 1e-5


# SamplingParams fields that each give a grammar (at most one per request).
GRAMMAR_FIELDS = ("guided_json", "structural_tag", "guided_regex", "guided_choice", "guided_grammar")


def valid_text(s: str) -> bool:
    """Whether s is valid Unicode text (no lone surrogate, which the tokenizer refuses with a TypeError)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _is_number(v: Any) -> bool:
    """An int or float, not a bool (a JSON true is no temperature)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """Per-request sampling settings with vLLM/OpenAI semantics."""

    max_tokens: int = 256
    n: int = 1  # completions per prompt (offline; with a seed, completion j draws with seed + j)
    # vLLM's: EOS and stop_token_ids cannot be sampled before this many tokens are generated (stop strings
    # still apply).
    min_tokens: int = 0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    # OpenAI's penalties over the generated tokens (vLLM's rule: the prompt does not count): each logit is
    # lowered by presence_penalty if its token was generated, and by frequency_penalty per time it was.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit before anything else
    allowed_token_ids: list[int] | None = None  # vLLM's: only these ids may be sampled (EOS too, if listed)
    skip_special_tokens: bool = True  # vLLM's: special tokens are left out of the text (their ids stay)
    truncate_prompt_tokens: int | None = None  # vLLM's: keep only the prompt's last this many tokens
    # vLLM's: words never generated; a word's last token is banned where the output ends with the rest of it
    # (each word as encoded alone and after a space)
    bad_words: list[str] | None = None
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # return the sampled token's log-probability and this many top alternatives
    # vLLM's: each prompt token's log-probability and this many alternatives (offline outputs; one more
    # forward pass over the prompt)
    prompt_logprobs: int | None = None
    # Structured output (grammar-constrained decoding with xgrammar, see `cpm4.engine.guided`): a JSON schema
    # (dict or its JSON text) the output must follow, or True for any JSON object (OpenAI's json_object).
    guided_json: dict[str, Any] | str | bool | None = None
    # Or an xgrammar structural tag (dict or JSON text), e.g. `guided.tool_call_structural_tag` for forced calls.
    structural_tag: dict[str, Any] | str | None = None
    # Or (vLLM's) a regular expression the whole output matches, a list of strings it is exactly one of, or a
    # context-free grammar in xgrammar's EBNF (GBNF-style, rule `root` first).
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is not None:
            self.stop = list(self.stop)
        if self.stop_token_ids is not None:
            self.stop_token_ids = list(self.stop_token_ids)

        # `not (x >= lo)` also rejects NaN.
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 1:
            raise ValueError(f"n must be a positive int, got {self.n!r}")
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens!r}")
        if isinstance(self.min_tokens, bool) or not isinstance(self.min_tokens, int) or \
                not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens must be an int in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}")
        # Logits are processed in float32: a temperature or penalty past ~1e38 (or a penalty below ~1e-38)
        # became inf (0) there, and 0 * inf or inf / inf made NaN logits, which argmax and the sampler took for
        # the best token (even one allowed_token_ids excluded). 1e30 leaves room for any logit.
        if not _is_number(self.temperature) or not 0 <= self.temperature <= 1e30:
            raise ValueError(f"temperature must be a number in [0, 1e30], got {self.temperature!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (off) or positive, got {self.top_k!r}")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not _is_number(self.repetition_penalty) or not 1e-30 <= self.repetition_penalty <= 1e30:
            raise ValueError(f"repetition_penalty must be a number in [1e-30, 1e30], got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not _is_number(v) or not -2 <= v <= 2:
                raise ValueError(f"{name} must be a number in [-2, 2], got {v!r}")
        if self.logit_bias is not None:
            bias = {}
            for t, b in dict(self.logit_bias).items():
                # ints, or their digits as strings (OpenAI sends the ids as JSON object keys); not floats or
                # bools, which int() would quietly truncate to another id.
                if isinstance(t, str) and t.strip().lstrip("+-").isdecimal():
                    tid = int(t)
                elif isinstance(t, int) and not isinstance(t, bool):
                    tid = t
                else:
                    raise ValueError(f"logit_bias keys must be token ids, got {t!r}")
                if tid < 0 or not _is_number(b) or not -100 <= b <= 100:
                    raise ValueError(f"logit_bias needs token ids >= 0 and biases in [-100, 100], got {t!r}: {b!r}")
                bias[tid] = float(b)
            self.logit_bias = bias or None
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 20):
                raise ValueError(f"{name} must be an int in [0, 20] or None, got {v!r}")
        # int64, as OpenAI's and the server's (completion j of n draws with seed + j, still a valid torch seed).
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**63):
            raise ValueError(f"seed must be an int in [-2**63, 2**63) or None, got {self.seed!r}")
        if self.stop is not None:
            for s in self.stop:
                if not isinstance(s, str) or not s or not valid_text(s):
                    raise ValueError(f"stop strings must be non-empty str, got {s!r}")
        if self.allowed_token_ids is not None:
            ids = self.allowed_token_ids
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids or \
                    not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
                raise ValueError(f"allowed_token_ids must be a non-empty list of token ids, got {ids!r:.80}")
            self.allowed_token_ids = sorted(set(ids))
        if self.bad_words is not None:
            if isinstance(self.bad_words, str) or not isinstance(self.bad_words, Sequence) or \
                    not all(isinstance(w, str) and w.strip() and valid_text(w) for w in self.bad_words):
                raise ValueError(f"bad_words must be a list of non-empty strings, got {self.bad_words!r:.80}")
            self.bad_words = list(self.bad_words) or None
        if not isinstance(self.skip_special_tokens, bool):
            raise ValueError(f"skip_special_tokens must be a bool, got {self.skip_special_tokens!r}")
        t = self.truncate_prompt_tokens
        if t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"truncate_prompt_tokens must be a positive int or None, got {t!r}")
        if self.stop_token_ids is not None:
            for t in self.stop_token_ids:
                if not isinstance(t, int) or t < 0:
                    raise ValueError(f"stop_token_ids must be non-negative ints, got {t!r}")
        if self.guided_json is False:
            self.guided_json = None
        if self.guided_json is not None and self.guided_json is not True:
            self.guided_json = _json_object("guided_json", self.guided_json, "True, a JSON schema object")
        if self.structural_tag is not None:
            self.structural_tag = _json_object("structural_tag", self.structural_tag, "a structural tag object")
        for name in ("guided_regex", "guided_grammar"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, str) or not v.strip() or not valid_text(v)):
                raise ValueError(f"{name} must be a non-empty string, got {v!r:.80}")
        if self.guided_choice is not None:
            if isinstance(self.guided_choice, str) or not isinstance(self.guided_choice, Sequence) or \
                    not self.guided_choice or not all(isinstance(c, str) and c and valid_text(c)
                                                      for c in self.guided_choice):
                raise ValueError(f"guided_choice must be a non-empty list of non-empty strings, got "
                                 f"{self.guided_choice!r}")
            self.guided_choice = list(self.guided_choice)
        given = [n for n in GRAMMAR_FIELDS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are exclusive: give one grammar")
        if self.min_tokens and self.guided:  # a finished grammar allows only EOS: nothing would be left
            raise ValueError(f"min_tokens cannot be combined with {given[0]}")

    @property
    def guided(self) -> bool:
        """Whether the output is constrained by a grammar."""
        return any(getattr(self, n) is not None for n in GRAMMAR_FIELDS)

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    def check_vocab(self, vocab: int) -> None:
        """Token ids these params name (logit_bias) must be ids of the model: checked when a request is
        added, so a bad one fails alone instead of the batch step it would join."""
        if self.logit_bias and max(self.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token id {max(self.logit_bias)} is outside the vocabulary ({vocab} ids)")
        if self.allowed_token_ids and self.allowed_token_ids[-1] >= vocab:
            raise ValueError(f"allowed_token_ids id {self.allowed_token_ids[-1]} is outside the vocabulary "
                             f"({vocab} ids)")

    def truncate(self, prompt: list[int]) -> list[int]:
        """The prompt as generation sees it: its last truncate_prompt_tokens tokens when that is set."""
        t = self.truncate_prompt_tokens
        return prompt[-t:] if t is not None and len(prompt) > t else prompt


def nth_seed(seed: int | None, j: int) -> int | None:
    """The seed of completion j of n drawn with `seed` (None: unseeded), as the server and the offline engine
    derive it: seed + j, wrapped into SamplingParams' int64 range (a seed near 2**63 - 1 plus j left it)."""
    if seed is None:
        return None
    return (seed + j + 2**63) % 2**64 - 2**63


def _json_object(name: str, value: object, what: str) -> dict[str, Any] | str:
    """A dict as it is, or JSON text of an object (kept as text: the grammar compiler takes text); else a
    ValueError naming the field."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            if isinstance(json.loads(value), dict):
                return value
        except ValueError:
            pass
    raise ValueError(f"{name} must be {what} or its JSON text, got {value!r:.80}")


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
                   bad_ids: Sequence[Sequence[tuple[int, ...]]] | None = None) -> Tensor:
    """Apply the grammar masks, logit bias, repetition penalty, presence/frequency penalties, then temperature,
    top-k, top-p and min-p (Hugging Face order) to [B, V] logits.

    `history[i]` holds row i's prompt and generated ids, `outputs[i]` its generated ids alone (needed when a
    row has a presence or frequency penalty, or min_tokens: then `stop_ids[i]` are the ids it may not sample
    before, its EOS and stop_token_ids). Returns a new float32 tensor; removed tokens are -inf. Greedy
    rows only get the bias and penalties: the filters keep the argmax, so they cannot change a greedy pick.
    plan: `SamplingPlan(params, V)` kept from an earlier call with the same params (else built here).
    matchers: row i's grammar matcher where params[i] is guided (see `cpm4.engine.guided`), else None.
    bad_ids: row i's bad words as token sequences (`Sampler.bad_ids`), where params[i] has bad_words.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    bsz, vocab = logits.shape
    if len(params) != bsz or len(history) != bsz:
        raise ValueError(f"need params and history per row: B={bsz}, got {len(params)} and {len(history)}")
    if plan is None:
        plan = SamplingPlan(params, vocab)
    x = logits.to(torch.float32, copy=True)

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
        _on_rows(s, plan.k_rows, lambda t: _top_k(t, plan.ks, plan.tensor("k-1", [k - 1 for k in plan.ks], dev,
                                                                             torch.long).unsqueeze(1)),
                 plan.tensor("k_rows", plan.k_rows, dev, torch.long) if plan.k_rows else None)
        _on_rows(s, plan.p_rows, lambda t: _top_p(t, plan.ps, col("ps", plan.ps)),
                 plan.tensor("p_rows", plan.p_rows, dev, torch.long) if plan.p_rows else None)
        _on_rows(s, plan.m_rows, lambda t: _min_p(t, plan.mps, col("mps", plan.mps)),
                 plan.tensor("m_rows", plan.m_rows, dev, torch.long) if plan.m_rows else None)

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
        stop_ids: the token ids that end the sequence (its EOS unless ignore_eos, and stop_token_ids), banned
        until min_tokens are generated. bad_ids: params.bad_words as token sequences (`bad_word_ids`)."""
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
) -> list[int]:
    """Process a [B, V] logits batch and draw one token per row with that row's sampler."""
    # One host sync for the whole batch.
    return sample_tokens(logits, samplers, params, history, plan, outputs).tolist()


def sample_tokens(
    logits: Tensor, samplers: list[Sampler], params: list[SamplingParams], history: list[list[int]],
    plan: SamplingPlan | None = None, outputs: list[list[int]] | None = None,
) -> Tensor:
    """`sample_batch` without the host sync: the tokens [B] (int64) on the logits' device. plan, outputs: see
    `process_logits`."""
    if len(samplers) != logits.shape[0]:
        raise ValueError(f"need one sampler per row: B={logits.shape[0]}, got {len(samplers)}")
    if plan is None:
        plan = SamplingPlan(params, logits.shape[1])
    matchers = [s.matcher for s in samplers] if plan.guided else None
    stop_ids = [s.stop_ids for s in samplers] if plan.min_rows else None
    bad_ids = [s.bad_ids for s in samplers] if plan.bad_rows else None
    x = process_logits(logits, params, history, plan, outputs, matchers, stop_ids, bad_ids)
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

    def _find_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, int, str] | None = None  # (end, -len, stop)
        for s in self.stop:
            i = text.find(s)
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

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add new text; return (text safe to emit now, whether a stop string was hit)."""
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        text = self._held + delta
        found = self._find_stop(text)
        if found is not None:
            start, s = found
            self.stopped, self.matched, self._held = True, s, ""
            return text[: start + len(s) if self.include_stop_str_in_output else start], True
        hold = self._held_len(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """Return the held-back tail at the end of generation (empty after a stop)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out
