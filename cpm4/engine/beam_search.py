"""Beam search over the batching engine, as vLLM's `LLM.beam_search`: every step, each live beam of every prompt
is one request for a single token with the top 2 x beam_width log-probabilities; each beam's candidates are those
tokens, the beams of a prompt are ranked by `beam_score`, and the best beam_width go on. A beam ends when it
samples an EOS id (unless ignore_eos) or reaches max_tokens / the context. The beams of a prompt share their
prefix pages through prefix caching, so a step recomputes about a page per beam, not the whole sequence.

The log-probabilities are the model's (raw logits, as `TokenLogprob` reports them), so temperature changes only
which extra token each step samples beside the top ones (as in vLLM, whose beam search reads raw logprobs too).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from cpm4.model.config import is_int, is_number

from .generate import GenerationOutput, TokenLogprob
from .params import SamplingParams

# logprobs above 20 are refused (SamplingParams), and a step asks for 2 x beam_width of them.
MAX_BEAM_WIDTH = 10


@dataclass
class BeamSearchParams:
    """vLLM's beam search settings: beam_width beams (and outputs) per prompt, up to max_tokens each."""

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False  # vLLM's field; an EOS never enters the text either way

    def __post_init__(self) -> None:
        if not is_int(self.beam_width) or not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be an int in [1, {MAX_BEAM_WIDTH}], got {self.beam_width!r}")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
        if not is_number(self.temperature) or not 0 <= self.temperature <= 1e30:
            raise ValueError(f"temperature must be a number in [0, 1e30], got {self.temperature!r}")
        if not is_number(self.length_penalty) or not -1e3 <= self.length_penalty <= 1e3:  # (NaN too)
            raise ValueError(f"length_penalty must be a number in [-1000, 1000], got {self.length_penalty!r}")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass
class BeamSearchSequence:
    """One beam: tokens are the prompt's and then the generated ones (vLLM's); logprobs one per generated token
    (its log-probability and the step's top alternatives); text the generated text without an ending EOS."""

    tokens: list[int]
    logprobs: list[TokenLogprob] = field(default_factory=list)
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None  # "stop" (an EOS id) or "length"
    stop_reason: int | None = None  # the EOS id that ended it


@dataclass
class BeamSearchOutput:
    """A prompt's best beams, best first (at most beam_width)."""

    sequences: list[BeamSearchSequence]


def beam_score(tokens: Sequence[int], cum_logprob: float, eos_ids: frozenset[int], length_penalty: float) -> float:
    """vLLM's ranking: the summed log-probability over the sequence's length (prompt included, an ending EOS not)
    to the power length_penalty."""
    n = len(tokens) - (1 if tokens and tokens[-1] in eos_ids else 0)
    return cum_logprob / (n ** length_penalty)


class BeamSearch:
    """The search's state for a batch of token-id prompts, stepped by a driver that runs the engine: `requests()`
    gives the sequences to extend and the SamplingParams to run them with (one token, the top logprobs),
    `advance(outputs)` takes one `GenerationOutput` each, `done` says when to stop, `results()` gives the outputs.
    `beam_search` drives it with a synchronous engine, the server with its async one."""

    def __init__(self, prompts: Sequence[Sequence[int]], params: BeamSearchParams, eos_ids: Sequence[int],
                 context: int) -> None:
        self.prompts = [list(p) for p in prompts]
        self.params = params
        self.eos = frozenset(eos_ids)
        self.context = context  # the longest sequence: a beam reaching it ends with "length"
        self.step_params = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width,
                                          temperature=params.temperature, ignore_eos=True)
        self.live = [[BeamSearchSequence(list(p))] for p in prompts]
        self.ended: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        self.steps = 0
        self._asked: list[tuple[int, BeamSearchSequence]] = []

    def score(self, b: BeamSearchSequence) -> float:
        return beam_score(b.tokens, b.cum_logprob, self.eos, self.params.length_penalty)

    @property
    def done(self) -> bool:
        return self.steps >= self.params.max_tokens or not any(self.live)

    def requests(self) -> list[list[int]]:
        """The live beams' tokens, one request each (run with `step_params`)."""
        self._asked = [(i, b) for i, bs in enumerate(self.live) for b in bs]
        return [b.tokens for _, b in self._asked]

    def advance(self, outputs: Sequence[GenerationOutput]) -> None:
        """Grow every beam `requests` gave by its candidates and keep each prompt's best beam_width."""
        grown: list[list[BeamSearchSequence]] = [[] for _ in self.prompts]
        for (i, b), out in zip(self._asked, outputs, strict=True):
            lp = out.logprobs[0]
            candidates = dict(lp.top)
            candidates.setdefault(lp.token_id, lp.logprob)  # the sampled one, if outside the top (temperature)
            for tok, logprob in candidates.items():
                entry = TokenLogprob(tok, logprob, lp.top, lp.rank if tok == lp.token_id else None)
                new = BeamSearchSequence(b.tokens + [tok], b.logprobs + [entry],
                                         b.cum_logprob + logprob)
                if tok in self.eos and not self.params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", tok
                    self.ended[i].append(new)
                else:
                    grown[i].append(new)
        for i, g in enumerate(grown):
            g.sort(key=self.score, reverse=True)
            self.live[i] = []
            for b in g[:self.params.beam_width]:
                if len(b.tokens) >= self.context:  # no room for another token
                    b.finish_reason = "length"
                    self.ended[i].append(b)
                else:
                    self.live[i].append(b)
        self.steps += 1

    def results(self, decode: Callable[[list[int]], str]) -> list[BeamSearchOutput]:
        """Each prompt's best beam_width beams, ended or still live (those end with "length"), best first, their
        generated text decoded (an ending EOS left out)."""
        outputs = []
        for i, p in enumerate(self.prompts):
            for b in self.live[i]:
                b.finish_reason = "length"
            best = sorted(self.ended[i] + self.live[i], key=self.score, reverse=True)[:self.params.beam_width]
            for b in best:
                gen = b.tokens[len(p):]
                b.text = decode(gen[:-1] if b.finish_reason == "stop" else gen)
            outputs.append(BeamSearchOutput(best))
        return outputs


def beam_search(generate: Callable[[list[list[int]], list[SamplingParams]], list[GenerationOutput]],
                decode: Callable[[list[int]], str], prompts: Sequence[Sequence[int]], params: BeamSearchParams,
                eos_ids: Sequence[int], context: int) -> list[BeamSearchOutput]:
    """Beam search for each token-id prompt. generate: one token per prompt with logprobs (`OfflineEngine.generate`);
    decode: ids -> text; context: the longest sequence (a beam reaching it ends with "length")."""
    search = BeamSearch(prompts, params, eos_ids, context)
    while not search.done:
        asked = search.requests()
        search.advance(generate(asked, [search.step_params] * len(asked)))
    return search.results(decode)
