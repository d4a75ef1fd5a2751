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


def beam_search(generate: Callable[[list[list[int]], list[SamplingParams]], list[GenerationOutput]],
                decode: Callable[[list[int]], str], prompts: Sequence[Sequence[int]], params: BeamSearchParams,
                eos_ids: Sequence[int], context: int) -> list[BeamSearchOutput]:
    """Beam search for each token-id prompt. generate: one token per prompt with logprobs (`OfflineEngine.generate`);
    decode: ids -> text; context: the longest sequence (a beam reaching it ends with "length")."""
    eos = frozenset(eos_ids)
    step = SamplingParams(max_tokens=1, logprobs=2 * params.beam_width, temperature=params.temperature,
                          ignore_eos=True)

    def score(b: BeamSearchSequence) -> float:
        return beam_score(b.tokens, b.cum_logprob, eos, params.length_penalty)

    live = [[BeamSearchSequence(list(p))] for p in prompts]
    done: list[list[BeamSearchSequence]] = [[] for _ in prompts]
    for _ in range(params.max_tokens):
        beams = [(i, b) for i, bs in enumerate(live) for b in bs]
        if not beams:
            break
        outs = generate([b.tokens for _, b in beams], [step] * len(beams))
        grown: list[list[BeamSearchSequence]] = [[] for _ in prompts]
        for (i, b), out in zip(beams, outs):
            lp = out.logprobs[0]
            candidates = dict(lp.top)
            candidates.setdefault(lp.token_id, lp.logprob)  # the sampled one, if outside the top (temperature)
            for tok, logprob in candidates.items():
                new = BeamSearchSequence(b.tokens + [tok], b.logprobs + [TokenLogprob(tok, logprob, lp.top)],
                                         b.cum_logprob + logprob)
                if tok in eos and not params.ignore_eos:
                    new.finish_reason, new.stop_reason = "stop", tok
                    done[i].append(new)
                else:
                    grown[i].append(new)
        for i, g in enumerate(grown):
            g.sort(key=score, reverse=True)
            live[i] = g[:params.beam_width]
            for b in [b for b in live[i] if len(b.tokens) >= context]:  # no room for another token
                b.finish_reason = "length"
                done[i].append(b)
            live[i] = [b for b in live[i] if b.finish_reason is None]
    outputs = []
    for i, p in enumerate(prompts):
        for b in live[i]:
            b.finish_reason = "length"
        best = sorted(done[i] + live[i], key=score, reverse=True)[:params.beam_width]
        for b in best:
            gen = b.tokens[len(p):]
            b.text = decode(gen[:-1] if b.finish_reason == "stop" else gen)
        outputs.append(BeamSearchOutput(best))
    return outputs
