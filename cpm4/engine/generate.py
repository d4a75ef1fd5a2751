"""The generate loop: one prefill of the whole batch (right-padded), then one decode step per token into
a preallocated KV cache. Each sequence keeps its own positions, sampler, detokenizer and stop rules, so a
prompt gives the same tokens alone or in a batch (greedy; seeded sampling likewise).
"""

from __future__ import annotations

import dataclasses
import operator
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from cpm4.model.config import MiniCPM4Config, is_int
from cpm4.model.modeling import MiniCPM4ForCausalLM
from cpm4.model.tokenizer import IncrementalDetokenizer, Tokenizer

from .kv_cache import KVCache
from .sampling import Sampler, SamplingParams, StopStringMatcher, sample_batch


class PromptTooLongError(ValueError):
    pass


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (stop token or string), "length" or "abort"
    prompt: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # with SamplingParams.prompt_logprobs
    # With SamplingParams.n > 1, every completion of the prompt (this object's own fields are the first's).
    choices: list[GenerationOutput] | None = field(default=None, repr=False)
    # Prompt tokens served from cached prefix pages (vLLM's num_cached_tokens); None without a paged cache.
    num_cached_tokens: int | None = None
    # What ended it with finish_reason "stop", as vLLM's stop_reason: the stop string, or the id of
    # SamplingParams.stop_token_ids sampled; None for an EOS token, a grammar's end, "length" or "abort".
    stop_reason: int | str | None = None
    index: int = 0  # which of the prompt's n completions this is (vLLM's CompletionOutput.index)
    # vLLM's RequestOutput.request_id: `LLM.generate` numbers its prompts "0", "1", ... across calls
    request_id: str | None = field(default=None, compare=False)
    # vLLM's RequestOutput.finished where the front end sets it (`AsyncLLM`'s outputs: a delta output carries only
    # the completions that changed); None: whether every completion has a finish reason.
    request_finished: bool | None = field(default=None, repr=False, compare=False)
    # A delta output's (`AsyncLLM`, RequestOutputKind.DELTA) earlier tokens' log-probability sum, so that its
    # cumulative_logprob is the running total, as vLLM's; None: no earlier logprobs.
    logprob_before: float | None = field(default=None, repr=False, compare=False)

    @property
    def finished(self) -> bool:
        """Whether generation ended, every completion (vLLM's RequestOutput.finished; always so for
        `LLM.generate`'s outputs)."""
        if self.request_finished is not None:
            return self.request_finished
        return all(c.finish_reason is not None for c in self.outputs)

    @property
    def cumulative_logprob(self) -> float | None:
        """The sum of the output tokens' log-probabilities (vLLM's cumulative_logprob; None without
        SamplingParams.logprobs, which is what computes them); a delta output's, the running total."""
        if self.logprobs is None and self.logprob_before is None:
            return None
        piece = sum(lp.logprob for lp in self.logprobs or () if lp.logprob is not None)
        return float((self.logprob_before or 0.0) + piece)

    @property
    def outputs(self) -> list[GenerationOutput]:
        """The prompt's completions, as vLLM's RequestOutput.outputs: n of them (one without n)."""
        return self.choices or [self]

    def add(self, delta: StreamDelta) -> None:
        """Append one streamed delta of this sequence (what every batch front end gathers)."""
        self.text += delta.text
        self.token_ids += delta.token_ids
        if delta.cached_tokens is not None:
            self.num_cached_tokens = delta.cached_tokens
        self.finish_reason = delta.finish_reason or self.finish_reason
        if delta.stop_reason is not None:
            self.stop_reason = delta.stop_reason
        if delta.logprobs:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs += delta.logprobs


@dataclass(frozen=True)
class Logprob:
    """One token's entry in a `TokenLogprob` read as vLLM's dict: its log-probability, its rank among the
    vocabulary (1: the most likely) and its text (None where the output was not made by a front end with a
    tokenizer)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class TokenLogprob(Mapping):
    """The sampled token's log-probability under the model (raw logits, before sampling transforms), its rank
    (1: the most likely; None where not computed) and the most likely alternatives, as OpenAI's `logprobs`
    reports them. logprob is None (and top empty) for a prompt's first token, which nothing predicts.

    It also reads as vLLM's `dict[int, Logprob]`: the sampled token first, then the alternatives
    (`out.logprobs[i][out.token_ids[i]].logprob`); empty for a prompt's first token, where vLLM has None.
    `text_of` (set by `LLM` and `AsyncLLM`) gives the entries' decoded_token."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]
    rank: int | None = None
    text_of: Callable[[int], str] | None = field(default=None, repr=False, compare=False)

    def _entries(self) -> dict[int, Logprob]:
        if self.logprob is None:
            return {}
        text = self.text_of or (lambda _: None)
        ranks = {t: r for r, (t, _) in reversed(list(enumerate(self.top, 1)))}  # the first of equal ids
        own = self.rank if self.rank is not None else ranks.get(self.token_id)
        out = {self.token_id: Logprob(float(self.logprob), own, text(self.token_id))}
        for t, v in self.top:
            if t not in out:
                out[t] = Logprob(float(v), ranks[t], text(t))
        return out

    def __getitem__(self, token_id: int) -> Logprob:
        return self._entries()[token_id]

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries())

    def __len__(self) -> int:
        return len(self._entries())


@dataclass
class StreamDelta:
    index: int  # which prompt of the batch
    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop", "length" or "abort"
    logprobs: list[TokenLogprob] | None = None
    # Prompt tokens found in the paged cache's shared prefixes when the request was admitted (None: no paged
    # cache, or not admitted yet).
    cached_tokens: int | None = None
    stop_reason: int | str | None = None  # on the last delta: `SequenceState.stop_reason`


def name_logprobs(entries: Iterable[TokenLogprob | None], text_of: Callable[[int], str]) -> None:
    """Give these logprobs entries their tokens' text (`TokenLogprob.text_of`: vLLM's decoded_token)."""
    for lp in entries:
        if lp is not None:
            lp.text_of = text_of


def output_logprobs(outputs: Iterable[GenerationOutput]) -> Iterator[TokenLogprob]:
    """Every logprobs entry of these outputs: each completion's tokens', then the prompt's."""
    for o in outputs:
        for c in {id(x): x for x in (o, *o.outputs)}.values():
            yield from c.logprobs or ()
            yield from c.prompt_logprobs or ()


def context_length(model: MiniCPM4ForCausalLM | MiniCPM4Config, max_model_len: int | None = None) -> int:
    """Tokens one sequence may hold, prompt and output: the model's (or config's) max_position_embeddings, or
    `max_model_len` (vLLM's option) when given, which may only be smaller (a server that caps its requests'
    length, and on the CPU sizes its default KV cache by it)."""
    n = getattr(model, "config", model).max_position_embeddings
    if max_model_len is None:
        return n
    if not is_int(max_model_len) or max_model_len < 2:
        raise ValueError(f"max_model_len must be an int >= 2, got {max_model_len!r}")
    if max_model_len > n:
        raise ValueError(f"max_model_len {max_model_len} is longer than the model's context "
                         f"(max_position_embeddings {n})")
    return max_model_len


def check_prompt(n_tokens: int, context: int, cache_tokens: int | None = None, scoring: bool = False) -> None:
    """Refuse an empty prompt (ValueError) and one that leaves no token to generate in the context or, given
    `cache_tokens`, in a paged KV cache of that many tokens (PromptTooLongError, which the server answers with
    400 context_length_exceeded). Only the prompt is checked against the cache: a prompt that fits, but whose
    output then outgrows a cache it shares with nobody, still ends with finish_reason "length". scoring: a
    prompt only scored (its prompt logprobs, nothing generated, no cache) may fill the context."""
    if n_tokens == 0:
        raise ValueError("empty prompt: at least one token is needed")
    if n_tokens > context or (n_tokens == context and not scoring):
        raise PromptTooLongError(f"prompt too long: {n_tokens} tokens, the maximum context length (max_model_len) is "
                                 f"{context}" + ("" if scoring else " (at least one token must be left to generate)"))
    if scoring:
        return
    if cache_tokens is not None and n_tokens >= cache_tokens:
        raise PromptTooLongError(f"prompt too long: the prompt of {n_tokens} tokens does not fit the KV cache, "
                                 f"which holds {cache_tokens} (at least one token must be left to generate)")


def _as_int64(ids: list[int]) -> np.ndarray | None:
    """Plain ints as an int64 array (through `array`: ~1.5x faster than min() and max() over the list); None when
    one does not fit."""
    try:
        return np.frombuffer(array("q", ids), dtype=np.int64)
    except OverflowError:
        return None


def check_prompt_ids(ids: Sequence[int], context: int, vocab_size: int | None = None,
                     cache_tokens: int | None = None, scoring: bool = False) -> list[int]:
    """A prompt's ids as a list of ints, each in [0, vocab_size) (numpy or torch integers are converted; floats
    and bools refused), then `check_prompt`: bad input is refused before it reaches a batch (where it would fail
    mid-step and take the other requests' work with it)."""
    return checked_prompt(ids, context, vocab_size, cache_tokens, scoring)[0]


def checked_prompt(ids: Sequence[int], context: int, vocab_size: int | None = None, cache_tokens: int | None = None,
                   scoring: bool = False) -> tuple[list[int], np.ndarray | None]:
    """`check_prompt_ids`' list, and the same ids as an int64 array when they fit one (made for the range check:
    prefix caching hashes and compares pages from it, `PagedKVCache.chain`)."""
    if type(ids) is list and ids and set(map(type, ids)) == {int}:
        a = _as_int64(ids)
        if a is not None and (vocab_size is None or bool(a.min() >= 0 and a.max() < vocab_size)):
            # Plain ints in range, the usual case: checked in C loops (one by one, 32 prompts of 4K tokens took 70
            # ms of a step's admission); anything else goes the careful way, which names the bad id.
            check_prompt(len(ids), context, cache_tokens, scoring)
            return list(ids), a
    out = []
    for t in ids:
        try:
            v = None if isinstance(t, bool) else operator.index(t)  # any integer type, nothing that only rounds
        except TypeError:
            v = None
        if v is None or (vocab_size is not None and not 0 <= v < vocab_size):
            what = f"not in the vocabulary [0, {vocab_size})" if vocab_size is not None else "not an integer"
            raise ValueError(f"prompt token id {repr(t) if v is None else v} is {what}")
        out.append(v)
    check_prompt(len(out), context, cache_tokens, scoring)
    return out, _as_int64(out)


def fit_to_context(n_prompt: int, params: SamplingParams, context: int) -> SamplingParams:
    """`params` with max_tokens cut to the room a prompt of n_prompt tokens leaves in `context` (a prompt that
    leaves none is refused, `check_prompt`): for a loop that knows only the model's own context, run under a
    shorter max_model_len."""
    check_prompt(n_prompt, context)
    room = context - n_prompt
    if params.max_tokens is not None and params.max_tokens <= room:
        return params
    return dataclasses.replace(params, max_tokens=room, min_tokens=min(params.min_tokens, room))


def bad_word_ids(tokenizer: Tokenizer, words: Sequence[str] | None) -> list[tuple[int, ...]]:
    """Each bad word as token ids, alone and after a space, its leading spaces dropped (as vLLM encodes them; vLLM
    skips the spaced form when it has another token count, which let " happiness" through), without
    duplicates."""
    seqs: dict[tuple[int, ...], None] = {}  # in order, without duplicates (a list's lookups were quadratic)
    for w in words or ():
        for text in (w.lstrip(), " " + w.lstrip()):
            ids = tuple(tokenizer.encode(text, add_bos=False))
            if ids:
                seqs[ids] = None
    return list(seqs)


class SequenceState:
    """Per-sequence state of one generation: sampler, detokenizer, stop rules, generated tokens."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: Tokenizer, device,
                 context: int, eos_ids: list[int], stream_text: bool = True, vocab_size: int | None = None,
                 detokenize: bool = True):
        """stream_text=False: nobody reads the text before the end (offline batches), so without stop
        strings the text is detokenized once, when the sequence ends, and returned with its last delta (the
        same text in all: `IncrementalDetokenizer.extend`) instead of piece by piece every step; with
        detokenize=False too, not even then: the caller takes it from `finish_texts` (several ended sequences
        decoded together).
        vocab_size: the model's (its logits' width), needed when params carry a grammar (ValueError for a
        grammar that does not compile)."""
        self.params = params
        self.history = list(prompt_ids)
        self.generated: list[int] = []
        self.max_tokens = context - len(prompt_ids) if params.max_tokens is None else \
            min(params.max_tokens, context - len(prompt_ids))
        self.matcher = None
        if params.guided:
            if vocab_size is None:
                raise ValueError("a guided sequence needs the model's vocab_size")
            from .guided import new_matcher

            # The EOS ids end a guided sequence once its grammar is complete, even with ignore_eos.
            self.matcher = new_matcher(tokenizer, vocab_size, eos_ids, params, prompt_ids)
        self.stop_ids = stop_ids(params, eos_ids)
        # min_tokens holds back the EOS ids even with ignore_eos (vLLM's rule), besides stop_token_ids
        held = set(params.stop_token_ids or []) | set(eos_ids) if params.min_tokens else ()
        self.sampler = Sampler(params, device, self.matcher, held, bad_word_ids(tokenizer, params.bad_words))
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop or [], params.include_stop_str_in_output)
        self.finish_reason: str | None = None
        self.text = ""
        self.defer_text = not stream_text and not self.stops.stop
        self.text_by_caller = self.defer_text and not detokenize
        self.text_pending = False  # ended, its text left to `finish_texts`
        self._detok_upto = 0  # generated ids given to the detokenizer (deferred text)
        self._stop_text_ids: list[int] = []  # the stop token, when its text is kept (deferred text)
        self.stop_token: int | None = None  # the stop id that ended it

    @property
    def stop_reason(self) -> int | str | None:
        """What ended the sequence with "stop" (vLLM's stop_reason): the stop string matched, else the id of
        params.stop_token_ids sampled; None for the EOS ids, a grammar's end, and any other finish_reason."""
        if self.finish_reason != "stop":
            return None
        if self.stops.matched is not None:
            return self.stops.matched
        if self.stop_token is not None and self.stop_token in (self.params.stop_token_ids or ()):
            return self.stop_token
        return None

    @property
    def _stops_apply(self) -> bool:
        """Whether stop strings may end the text the last token added (vLLM's min_tokens: not before it)."""
        return len(self.generated) > self.params.min_tokens

    def step(self, token: int) -> tuple[str, list[int]]:
        """Take a sampled token; returns (text to emit, token ids to emit) and sets finish_reason."""
        stop = token in self.stop_ids
        if self.matcher is not None:
            # Terminated: a stop token closed the grammar. Rejected cannot happen under the grammar's mask;
            # should it, the sequence ends rather than leave its grammar.
            stop = stop or not self.matcher.accept_token(token) or self.matcher.is_terminated()
        if stop:
            # The stop token is part of the output's ids (and usage counts, and logprobs), as in vLLM and
            # transformers' generate, but not of its text unless include_stop_str_in_output (vLLM's rule; a special
            # token's text is still skipped with skip_special_tokens); a grammar's rejection (no stop token) emits
            # nothing.
            if token not in self.stop_ids:
                return self.finish("stop"), []
            self.stop_token = token
            keep = self.params.include_stop_str_in_output
            if keep and self.defer_text:
                self._stop_text_ids = [token]
            return self.finish("stop", self.detok.add(token) if keep and not self.defer_text else ""), [token]
        self.generated.append(token)
        self.history.append(token)
        if len(self.generated) >= self.max_tokens:
            return self.finish("length", "" if self.defer_text else self.detok.add(token)), [token]
        if self.defer_text:
            return "", [token]
        text, stopped = self.stops.feed(self.detok.add(token), self._stops_apply)
        if stopped:
            self.finish_reason = "stop"
        self.text += text
        return text, [token]

    def finish(self, reason: str, delta: str = "") -> str:
        """End the sequence with `reason` (every end goes through here: a stop, max_tokens, and those decided
        outside `step`, an abort or a full cache); returns the text still to emit: `delta` (the last token's
        piece), the deferred text, and what the detokenizer and stop-string matcher held back. A stop string
        completed by that text ends the sequence with "stop" instead, unless it was aborted. '' once ended."""
        if self.finish_reason is not None:
            return ""
        self.finish_reason = reason
        if self.text_by_caller:
            self.text_pending = True
            return ""
        if self.defer_text:  # no stop strings then (see __init__)
            return finish_texts([self])[0]
        else:
            text, stopped = self.stops.feed(delta + self.detok.flush(), self._stops_apply)
            if not stopped:
                text += self.stops.flush()
            elif reason != "abort":
                self.finish_reason = "stop"
        self.text += text
        return text


def stop_ids(params: SamplingParams, eos_ids: Sequence[int]) -> set[int]:
    """The ids that end a sequence when sampled: its stop_token_ids and, unless ignore_eos, the EOS ids. Part of
    the output's ids, not of its text."""
    return set(params.stop_token_ids or []) | (set() if params.ignore_eos else set(eos_ids))


class DetachedText:
    """The text of a sequence whose engine sends only its token ids (`SequenceState(stream_text=False,
    detokenize=False)`: a server's engine process, which leaves detokenizing to the API process as vLLM's engine
    core does): the same text `SequenceState` gives, built from the deltas' ids. Only for sequences without stop
    strings (those need the text inside the engine). stream: text with every delta (else all with the last)."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams,
                 eos_ids: Sequence[int], stream: bool):
        if params.stop:
            raise ValueError("a sequence with stop strings is detokenized by its engine")
        self.detok = IncrementalDetokenizer(tokenizer, list(prompt_ids), params.skip_special_tokens)
        self.stop_ids = stop_ids(params, eos_ids)
        self.keep_stop_text = params.include_stop_str_in_output
        self.stream = stream
        self._held: list[int] = []  # ids not decoded yet (not streamed)

    def take(self, token_ids: Sequence[int], finish_reason: str | None) -> str:
        """The text of one delta's ids (a trailing stop id has none unless include_stop_str_in_output, as in
        `SequenceState.step`); at the end the rest held back."""
        ids = list(token_ids)
        if finish_reason == "stop" and ids and ids[-1] in self.stop_ids and not self.keep_stop_text:
            ids.pop()
        if not self.stream:
            self._held += ids
            if finish_reason is None:
                return ""
            ids, self._held = self._held, []
            return IncrementalDetokenizer.finish_many([self.detok], [ids])[0]
        text = self.detok.extend(ids)
        return text + self.detok.flush() if finish_reason is not None else text


def finish_texts(states: Sequence[SequenceState]) -> list[str]:
    """The text still owed by each ended sequence whose text was deferred (`SequenceState.defer_text`: decoded
    at its end; `text_by_caller`: left to this call), every one decoded in one batch
    (`IncrementalDetokenizer.finish_many`); '' for the others. Each state's `text` is complete after."""
    owed = [i for i, st in enumerate(states) if st.defer_text and st.finish_reason is not None
            and (st.text_pending or not st.text_by_caller)]
    texts = IncrementalDetokenizer.finish_many([states[i].detok for i in owed],
                                               [states[i].generated[states[i]._detok_upto:] + states[i]._stop_text_ids
                                                for i in owed])
    out = [""] * len(states)
    for i, text in zip(owed, texts):
        st = states[i]
        st._detok_upto, st.text_pending, st._stop_text_ids = len(st.generated), False, []
        st.text += text
        out[i] = text
    return out


def token_logprobs(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The sampled token's log-probability, rank (1 + the tokens strictly more likely) and the k most likely."""
    return token_logprobs_batch(logits[None], [token], [k])[0]


def token_logprobs_batch(logits: torch.Tensor, tokens: Sequence[int], ks: Sequence[int]) -> list[TokenLogprob]:
    """`token_logprobs` of each row of logits [n, vocab] (its sampled token, its k) in one log-softmax, one top-k
    at the largest k and one device read: a step's rows asking for logprobs pay for one sync, not two each."""
    lp = torch.log_softmax(logits.float(), -1)
    own = lp.gather(1, torch.tensor([int(t) for t in tokens], device=lp.device)[:, None])
    parts = [own, (lp > own).sum(1, keepdim=True).to(lp.dtype) + 1]
    kmax = max(ks, default=0)
    if kmax:
        top = torch.topk(lp, kmax, dim=-1)
        # ids as float32: exact below 2^24 (vocabularies are far smaller), read with the values at once
        parts += [top.values, top.indices.to(lp.dtype)]
    out = []
    for t, k, row in zip(tokens, ks, torch.cat(parts, 1).tolist()):
        ids = row[2 + kmax:2 + kmax + k]
        out.append(TokenLogprob(int(t), row[0], [(int(i), v) for i, v in zip(ids, row[2:2 + k])], int(row[1])))
    return out


@torch.inference_mode()
def prompt_logprobs(model: MiniCPM4ForCausalLM, ids: Sequence[int], k: int, chunk: int = 1024
                    ) -> list[TokenLogprob]:
    """Each prompt token's log-probability given the tokens before it, with the k most likely alternatives
    (OpenAI's `echo` with `logprobs`, vLLM's prompt_logprobs); the first token's is None. One forward pass
    without a cache; the output head runs `chunk` positions at a time so the [T, vocab] logits are never
    whole."""
    ids = [int(t) for t in ids]
    check_prompt(len(ids), context_length(model), scoring=True)
    x = torch.tensor([ids], device=model.device)
    h = model.hidden_states(x)[0]
    targets = torch.tensor(ids[1:], device=model.device)
    out = [TokenLogprob(ids[0], None, [])]
    for s in range(0, len(ids) - 1, chunk):
        lp = torch.log_softmax(model.logits(h[s:s + chunk][: len(ids) - 1 - s]).float(), -1)
        tgt = targets[s:s + lp.shape[0]]
        own_t = lp.gather(1, tgt[:, None])
        ranks = ((lp > own_t).sum(1) + 1).tolist()
        own = own_t[:, 0].tolist()
        if k:
            top = torch.topk(lp, k, dim=-1)
            alts = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        else:
            alts = [[] for _ in own]
        out += [TokenLogprob(t, v, a, r) for t, v, a, r in zip(tgt.tolist(), own, alts, ranks)]
    return out


@torch.inference_mode()
def generate_stream(model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                    params: Sequence[SamplingParams], cancelled: Callable[[int], bool] | None = None
                    ) -> Iterator[list[StreamDelta]]:
    """Yield, after every step, the new text and tokens of each sequence that produced some.

    `cancelled(i)` is asked before each step; a sequence it answers True for ends with finish_reason
    "abort" and stops taking part in the batch."""
    if len(prompts) != len(params):
        raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
    if not prompts:
        return
    ctx = context_length(model)
    for p, sp in zip(prompts, params):
        check_prompt(len(p), ctx)
        sp.check_vocab(model.config.vocab_size)
    dev = model.device
    eos = model.config.eos_token_ids
    seqs = [SequenceState(list(p), sp, tokenizer, dev, ctx, eos, vocab_size=model.config.vocab_size)
            for p, sp in zip(prompts, params)]
    b = len(prompts)
    max_len = max(len(p) + s.max_tokens for p, s in zip(prompts, seqs))
    cache = KVCache(model.config, b, max_len, dev, model.dtype)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    ids = torch.zeros(b, int(lens.max()), dtype=torch.long, device=dev)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p, device=dev)
    logits = model(ids, cache, lens, last_only=True)
    while True:
        deltas = []
        if cancelled is not None:
            for i, sq in enumerate(seqs):
                if sq.finish_reason is None and cancelled(i):
                    deltas.append(StreamDelta(i, sq.finish("abort"), [], "abort"))
        active = [i for i, s in enumerate(seqs) if s.finish_reason is None]
        if not active:
            if deltas:
                yield deltas
            return
        toks_now = sample_batch(logits[active], [seqs[i].sampler for i in active],
                                [seqs[i].params for i in active], [seqs[i].history for i in active],
                                outputs=[seqs[i].generated for i in active])
        next_tok = torch.zeros(b, 1, dtype=torch.long, device=dev)
        for r, (tok, i) in enumerate(zip(toks_now, active)):
            k = seqs[i].params.logprobs
            lps = [token_logprobs(logits[active[r]], tok, k)] if k is not None else None
            text, toks = seqs[i].step(tok)
            if text or toks or seqs[i].finish_reason:
                reason = seqs[i].finish_reason
                deltas.append(StreamDelta(i, text, toks, reason, lps if toks else None, None,
                                          seqs[i].stop_reason if reason else None))
            next_tok[i, 0] = tok
        if deltas:
            yield deltas
        still = torch.tensor([s.finish_reason is None for s in seqs], device=dev, dtype=torch.long)
        if not bool(still.any()):
            return
        # Finished rows ride along with zero new tokens: nothing of theirs is read or advanced.
        logits = model(next_tok, cache, still, last_only=True)


def generate_ids(model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, prompts: Sequence[list[int]],
                 params: Sequence[SamplingParams]) -> list[GenerationOutput]:
    outs = [GenerationOutput(prompt_token_ids=list(p)) for p in prompts]
    for step in generate_stream(model, tokenizer, prompts, params):
        for d in step:
            outs[d.index].add(d)
    return outs
