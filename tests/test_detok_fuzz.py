"""Seeded randomized property test of incremental detokenization and stop handling (`SequenceState`).

Random id scripts (whole words, emoji/CJK split into single-byte ids, partial characters, special tokens,
random ids) are fed one id at a time through `SequenceState.step`, with random stop strings, stop token ids,
EOS, min_tokens, max_tokens, include_stop_str_in_output and skip_special_tokens, and compared with a naive
reference built only from `Tokenizer.decode` of the whole output:

1. the streamed deltas plus `finish` give decode(generated ids) cut at the first completed stop string;
2. every streamed prefix is a prefix of that final text (nothing a later stop match removes leaks, and no
   U+FFFD of a character still being completed);
3. finish reason and token ids follow the documented rules (a stop token / EOS ends with "stop" and is in
   the ids, its text only with include_stop_str_in_output; min_tokens bans stop ids (and the EOS, even with
   ignore_eos) in the sampler, and no stop string ends the text in what the first min_tokens tokens show
   (vLLM's rules);
   max_tokens, capped by the context, ends with "length" unless its last token completes a stop string);
4. stream_text=False gives the same final text and ids, with nothing before the last delta;
5. stop strings spanning token boundaries, overlapping, prefixes of each other or inside multi-token
   characters (drawn from the output text itself) behave as the reference says.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cpm4.engine.generate import DetachedText, SequenceState
from cpm4.engine.sampling import SamplingParams, sample_batch
from cpm4.model.tokenizer import IM_END, IncrementalDetokenizer, Tokenizer, build_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "models" / "cpm4-demo"
FFFD = "\ufffd"
SAMPLES = [
    "Hello, world! ", "中文测试，你好。", "🦜🦜 parrot", "👩‍👩‍👧 family", "naïve café ", "𠀀 rare",
    "a\nb\n\n", "<|im_end|> literal", "Ünïcödé ✓ ", "日本語のテキスト", "\ufffd literal", "x🦜y",
    "stop STOP st op ", "ab" * 5,
]
CHARS = "中文🦜👩‍👧𠀀éü✓日"  # multi-byte characters to split into single-byte ids


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's byte -> symbol table, which both byte-level vocabularies use for their 256 byte tokens.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


class Tok:
    """A tokenizer with the id pools the generator draws from."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.vocab = tok.vocab_size
        table = _bytes_to_unicode()
        self.byte_id = {b: tok.token_id(table[b]) for b in range(256)}
        assert None not in self.byte_id.values()
        self.specials = sorted(tok.hf.backend_tokenizer.get_added_tokens_decoder())
        self.eos = tok.stop_token_ids  # </s> and <|im_end|>, as the engine's model config gives them
        assert tok.token_id(IM_END) in self.eos

    def decode(self, ids: list[int], skip: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module", params=["synthetic", "demo"])
def tok(request) -> Tok:
    return Tok(build_tokenizer(1024) if request.param == "synthetic" else Tokenizer.from_dir(DEMO))


def _cut(text: str, stops: list[str], include: bool, min_end: int = 0) -> tuple[str, bool]:
    """The documented rule (`StopStringMatcher`): the first stop string completed in the text (earliest end,
    on a tie the longest) past its first min_end chars ends it, kept iff include. Naive: a find per stop string
    on the whole text."""
    best = None
    for s in stops:
        i = next((j for j in range(len(text)) if text.startswith(s, j) and j + len(s) > min_end), -1)
        if i >= 0 and (best is None or (i + len(s), -len(s)) < (best[0] + len(best[1]), -len(best[1]))):
            best = (i, s)
    if best is None:
        return text, False
    i, s = best
    return text[: i + len(s)] if include else text[:i], True


def reference(t: Tok, script: list[int], stop_ids: set[int], stops: list[str], include: bool, skip: bool,
              max_tokens: int, min_tokens: int = 0) -> tuple[list[int], str, str]:
    """(token ids, text, finish reason) from whole-output decodes. A stop string is seen once the text that
    contains it is shown: decode() of the ids so far, except while it ends in U+FFFD (a character still
    partial, which the detokenizer holds back, as vLLM's does). A script that runs out is aborted. min_tokens
    (vLLM's): no stop string ends the text before more tokens than it are out, nor ends inside the text shown
    when it was reached."""
    gen: list[int] = []
    shown = ""
    boundary = 0  # chars shown once min_tokens tokens were out

    def cut(text: str) -> tuple[str, bool]:
        return _cut(text, stops, include, boundary) if len(gen) > min_tokens else (text, False)

    for tid in script:
        if tid in stop_ids:  # the stop token's id is output, its text only with include (vLLM's rule, in step)
            return gen + [tid], cut(t.decode(gen + [tid] if include else gen, skip))[0], "stop"
        gen.append(tid)
        full = t.decode(gen, skip)
        if len(gen) >= max_tokens:
            text, hit = cut(full)
            return gen, text, "stop" if hit else "length"
        if not full.endswith(FFFD):
            shown = full
        if len(gen) == min_tokens:
            boundary = len(shown)
        text, hit = cut(shown)
        if hit:
            return gen, text, "stop"
    return gen, cut(t.decode(gen, skip))[0], "abort"


def _chunk(rng: random.Random, t: Tok) -> list[int]:
    kind = rng.random()
    if kind < 0.35:  # real text, as the model would write it
        s = rng.choice(SAMPLES)
        a = rng.randrange(len(s))
        return t.tok.encode(s[a: a + rng.randint(1, 12)], add_bos=False)
    if kind < 0.6:  # a character split into single-byte ids, sometimes left incomplete
        b = rng.choice(CHARS).encode()
        ids = [t.byte_id[x] for x in b]
        return ids[: rng.randint(1, len(ids))] if rng.random() < 0.25 else ids
    if kind < 0.75:
        return [rng.choice(t.specials)]
    if kind < 0.85:  # stray bytes: lone continuation bytes, invalid lead bytes
        return [t.byte_id[rng.choice([0x80, 0xBF, 0xC0, 0xE4, 0xF0, 0xFF, 0x41])]]
    return [rng.randrange(t.vocab)]


def _stops(rng: random.Random, text: str) -> list[str]:
    """Stop strings that hit: substrings of the text (so across token boundaries and inside multi-token
    characters), prefixes and overlapping shifts of each other; plus some that (mostly) miss."""
    out: list[str] = []
    for _ in range(rng.randint(0, 3)):
        r = rng.random()
        if text and r < 0.6:
            a = rng.randrange(len(text))
            s = text[a: a + rng.randint(1, 6)]
            out.append(s)
            if len(s) > 1 and rng.random() < 0.4:
                out.append(s[: rng.randint(1, len(s) - 1)])  # a prefix of another stop
            if len(s) > 1 and rng.random() < 0.3:
                out.append(s[1:] + rng.choice("ab中"))  # overlaps the other's tail
        elif r < 0.8:
            out.append(rng.choice(["STOP", "\n\n", "<|im_end|>", "中", "🦜", FFFD, "ab", "ba"]))
        else:
            out.append("".join(rng.choice("ab 中") for _ in range(rng.randint(1, 3))))
    return [s for s in out if s]


def _run(t: Tok, prompt: list[int], script: list[int], params: SamplingParams, context: int, stream: bool,
         min_fallback: int | None, detokenize: bool = True, per_step: list | None = None):
    """Feed the script through step one id at a time (through the real sampler when min_tokens is set);
    a script that runs out is aborted. Returns (deltas, token ids, finish reason); `per_step` gets each step's
    (ids, finish reason)."""
    st = SequenceState(list(prompt), params, t.tok, "cpu", context, t.eos, stream_text=stream, vocab_size=t.vocab,
                       detokenize=detokenize)
    deltas: list[str] = []
    ids: list[int] = []
    for tid in script:
        if params.min_tokens:
            # Greedy logits that want the script's id, with a fallback second: min_tokens must make the
            # sampler take the fallback instead of a stop id (the only place min_tokens acts).
            logits = torch.zeros(1, t.vocab)
            logits[0, min_fallback] = 4.0
            logits[0, tid] = 5.0
            tid = sample_batch(logits, [st.sampler], [params], [st.history], outputs=[st.generated])[0]
        text, toks = st.step(tid)
        deltas.append(text)
        ids += toks
        if per_step is not None:
            per_step.append((toks, st.finish_reason))
        if st.finish_reason is not None:
            break
    else:
        deltas.append(st.finish("abort"))
        if per_step is not None:
            per_step.append(([], "abort"))
    assert st.finish(st.finish_reason or "abort") == ""  # ended once
    assert st.text == "".join(deltas)
    return deltas, ids, st.finish_reason


def _case(rng: random.Random, t: Tok):
    prompt = t.tok.encode(rng.choice(SAMPLES), add_bos=True)
    if rng.random() < 0.3:  # a prompt that ends mid-character or on a special token
        prompt += [t.byte_id[0xE4]] if rng.random() < 0.5 else [rng.choice(t.specials)]
    script: list[int] = []
    while len(script) < rng.randint(1, 40):
        script += _chunk(rng, t)
    skip = rng.random() < 0.6
    include = rng.random() < 0.5
    stops = _stops(rng, t.decode(script, skip))
    stop_token_ids = rng.sample(sorted(set(script)), min(len(set(script)), rng.randint(0, 2))) \
        if rng.random() < 0.4 else None
    ignore_eos = rng.random() < 0.3
    max_tokens = rng.randint(1, 50)
    min_tokens = rng.randint(0, max_tokens) if rng.random() < 0.25 else 0
    context = len(prompt) + rng.randint(1, 60) if rng.random() < 0.2 else 1 << 20
    params = SamplingParams(max_tokens=max_tokens, min_tokens=min_tokens, temperature=0.0, stop=stops or None,
                            stop_token_ids=stop_token_ids, ignore_eos=ignore_eos,
                            include_stop_str_in_output=include, skip_special_tokens=skip)
    stop_ids = set(stop_token_ids or []) | (set() if ignore_eos else set(t.eos))
    held = set(stop_token_ids or []) | set(t.eos)  # what min_tokens bans: the EOS even with ignore_eos (vLLM)
    fallback = next(i for i in rng.sample(range(t.vocab), 50) if i not in held)
    # min_tokens: before it the sampler cannot pick a held id, so the reference sees the fallback there.
    ref_script = [fallback if i < min_tokens and x in held else x for i, x in enumerate(script)]
    eff_max = min(max_tokens, context - len(prompt))
    ref = reference(t, ref_script, stop_ids, stops, include, skip, eff_max, min_tokens)
    return prompt, script, params, context, fallback, ref


def test_stream_matches_naive_reference(tok: Tok) -> None:
    rng = random.Random(1234)
    for trial in range(1200):
        prompt, script, params, context, fallback, (ref_ids, ref_text, ref_reason) = _case(rng, tok)
        why = (trial, script, params, context)
        deltas, ids, reason = _run(tok, prompt, script, params, context, True, fallback)
        final = "".join(deltas)
        assert (final, ids, reason) == (ref_text, ref_ids, ref_reason), why
        # 2: the text streamed before the end is always a prefix of the final text.
        for k in range(len(deltas)):
            assert final.startswith("".join(deltas[:k])), why
        # 4: deferred text (offline batches) ends the same, and shows nothing before the last delta; with
        # stop strings it cannot defer, and still must agree.
        d2, ids2, reason2 = _run(tok, prompt, script, params, context, False, fallback)
        assert ("".join(d2), ids2, reason2) == (final, ids, reason), why
        if not params.stop:
            assert not any(d2[:-1]), why


def test_detached_text_matches_the_engines(tok: Tok) -> None:
    """An engine that sends ids without text (SequenceState(stream_text=False, detokenize=False): a server's engine
    process) and the reading process decoding them (`DetachedText`), steps' deltas joined at random (a reader
    behind the engine): the same text as the engine's own, streamed as prefixes of it, or all at the end."""
    rng = random.Random(4321)
    checked = 0
    for trial in range(1200):
        prompt, script, params, context, fallback, (ref_ids, ref_text, ref_reason) = _case(rng, tok)
        if params.stop:
            with pytest.raises(ValueError, match="stop strings"):
                DetachedText(tok.tok, prompt, params, tok.eos, True)
            continue
        steps: list = []
        d, ids, reason = _run(tok, prompt, script, params, context, False, fallback, detokenize=False, per_step=steps)
        assert not any(d) and (ids, reason) == (ref_ids, ref_reason), trial  # no text from the engine
        joined = []
        for step_ids, fin in steps:
            if joined and joined[-1][1] is None and rng.random() < 0.4:
                joined[-1] = (joined[-1][0] + list(step_ids), fin)
            else:
                joined.append((list(step_ids), fin))
        for stream in (True, False):
            det = DetachedText(tok.tok, prompt, params, tok.eos, stream)
            pieces = [det.take(i, f) for i, f in joined]
            assert "".join(pieces) == ref_text, (trial, script, params, stream)
            if not stream:
                assert not any(pieces[:-1]), trial
        checked += 1
    assert checked > 200, checked  # cases without stop strings: about a quarter


def test_detokenizer_prefix_and_no_split_characters(tok: Tok) -> None:
    """The detokenizer alone: the emitted text so far is always decode() of the ids so far or of a shorter
    prefix of them (held back while a character is partial), never a U+FFFD the full decode lacks."""
    rng = random.Random(99)
    for trial in range(300):
        skip = rng.random() < 0.5
        prompt = tok.tok.encode(rng.choice(SAMPLES), add_bos=False)[-rng.randint(0, 8):]
        ids: list[int] = []
        while len(ids) < rng.randint(1, 60):
            ids += _chunk(rng, tok)
        d = IncrementalDetokenizer(tok.tok, prompt, skip)
        out = ""
        for k in range(len(ids)):
            out += d.add(ids[k])
            full = tok.decode(ids[: k + 1], skip)
            assert full.startswith(out), (trial, ids[: k + 1], skip)
            if not full.endswith(FFFD):
                assert out == full, (trial, ids[: k + 1], skip)
        out += d.flush()
        assert out == tok.decode(ids, skip) == d.text, (trial, ids, skip)


def test_detokenizer_long_random_streams(tok: Tok) -> None:
    """Past `_TRIM_AT` ids the consumed ids are dropped: random bytes and specials must still decode whole."""
    rng = random.Random(7)
    for skip in (True, False):
        ids: list[int] = []
        while len(ids) < IncrementalDetokenizer._TRIM_AT + 300:
            ids += _chunk(rng, tok)
        d = IncrementalDetokenizer(tok.tok, None, skip)
        out = "".join(d.add(i) for i in ids) + d.flush()
        assert out == tok.decode(ids, skip)
