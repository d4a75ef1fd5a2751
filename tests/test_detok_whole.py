"""`IncrementalDetokenizer.extend` decoding many ids at once (`_extend_whole`, the deferred text of an offline
batch) must give what `add` gives id by id, and leave a state from which `add` goes on the same: seeded random
scripts of whole words, characters split into byte ids (sometimes left incomplete), stray bytes, special and
other added tokens, after random prompt contexts, for byte-level BPE tokenizers (the demo's; one with thousands
of added tokens, as the benchmarks' covering tokenizer) and a SentencePiece-style one (Llama's decoder pipeline:
"▁" -> " ", byte fallback, fuse, one leading space stripped; the released MiniCPM4 tokenizer's kind)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cpm4.model.tokenizer import IncrementalDetokenizer, Tokenizer, build_tokenizer

DEMO = Path(__file__).resolve().parents[1] / "models" / "cpm4-demo"
WORDS = ["Hello", "world", "the", "a", "中文", "🦜", "naïve", "x", ",", ".", "!", " ", "\n"]
CHARS = "中文🦜é✓"


def _sentencepiece() -> Tokenizer:
    """A small Llama-style tokenizer: <unk> <s> </s>, 256 byte-fallback ids, "▁"-prefixed pieces, chat specials
    and one added token that is not special."""
    from tokenizers import AddedToken, decoders, models
    from tokenizers import Tokenizer as Backend
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for piece in ["▁", "▁Hello", "▁world", "Hello", "world", "▁the", "▁a", "a", "b", "▁中文", "中", "文", ",", ".",
                  "!", "▁▁", "he", "llo", "▁x", "x", "é", "✓"]:
        vocab[piece] = len(vocab)
    backend = Backend(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in ("<|im_end|>", "<|im_start|>")])
    backend.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    return Tokenizer(PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                             unk_token="<unk>"))


def _covering() -> Tokenizer:
    tok = build_tokenizer(512)
    tok.hf.add_tokens([f"<t{i}>" for i in range(3000)])
    return tok


@pytest.fixture(scope="module", params=["demo", "covering", "sentencepiece"])
def tok(request) -> Tokenizer:
    return {"demo": lambda: Tokenizer.from_dir(DEMO), "covering": _covering,
            "sentencepiece": _sentencepiece}[request.param]()


def _byte_ids(tok: Tokenizer) -> dict[int, int]:
    """Byte value -> its id: "<0xXX>" ids, else the byte-level symbol of each byte."""
    if tok.token_id("<0x41>") is not None:
        return {b: tok.token_id(f"<0x{b:02X}>") for b in range(256)}
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: tok.token_id(chr(c)) for b, c in zip(bs, cs)}


def _script(rng: random.Random, tok: Tokenizer, byte_id: dict[int, int], added: list[int], clean: bool) -> list[int]:
    """Random ids; `clean`: whole words only (the text a trained model writes)."""
    out: list[int] = []
    while len(out) < rng.randint(1, 120):
        kind = 0.0 if clean else rng.random()
        if kind < 0.5:
            out += tok.encode(rng.choice(WORDS) + (" " if rng.random() < 0.5 else ""), add_bos=False)
        elif kind < 0.7:  # a character as byte ids, sometimes incomplete
            ids = [byte_id[b] for b in rng.choice(CHARS).encode()]
            out += ids[: rng.randint(1, len(ids))] if rng.random() < 0.3 else ids
        elif kind < 0.8:
            out.append(byte_id[rng.choice([0x80, 0xBF, 0xC0, 0xE4, 0xF0, 0xFF, 0x41, 0x20])])
        elif kind < 0.9:
            out.append(rng.choice(added))
        else:
            out.append(rng.randrange(tok.vocab_size))
    return out


def test_extend_at_once_equals_add_id_by_id(tok: Tokenizer, monkeypatch) -> None:
    rng = random.Random(5)
    byte_id = _byte_ids(tok)
    added = sorted(int(i) for i in tok.hf.backend_tokenizer.get_added_tokens_decoder())
    assert tok.whole_decode_rule is not None
    whole = {"used": 0}
    fast = IncrementalDetokenizer._extend_whole

    def counted(self, new, last):
        text = fast(self, new, last)
        whole["used"] += text is not None
        return text

    monkeypatch.setattr(IncrementalDetokenizer, "_extend_whole", counted)
    clean_used = 0
    for trial in range(400):
        clean = trial % 4 == 0
        skip = rng.random() < 0.6
        prompt = _script(rng, tok, byte_id, added, clean=rng.random() < 0.7)[-rng.randint(0, 8):]
        ids = _script(rng, tok, byte_id, added, clean)
        more = _script(rng, tok, byte_id, added, clean)
        one = IncrementalDetokenizer(tok, prompt, skip)
        ref = "".join(one.add(t) for t in ids)
        ref_more = "".join(one.add(t) for t in more) + one.flush()
        why = (trial, prompt, ids, more, skip)
        # Ids, then more ids one by one (a byte-level tokenizer may take the one window for the first ids).
        at_once = IncrementalDetokenizer(tok, prompt, skip)
        got = at_once.extend(ids)
        got_more = "".join(at_once.add(t) for t in more) + at_once.flush()
        assert (got, got_more) == (ref, ref_more), why
        assert at_once.text == one.text, why
        # A sequence's last ids (any known decoder may take the one window), then flush.
        last = IncrementalDetokenizer(tok, prompt, skip)
        before = whole["used"]
        assert last.extend(ids + more, last=True) + last.flush() == ref + ref_more, why
        assert last.text == one.text, why
        if clean and whole["used"] > before:
            clean_used += 1
    # The one window is taken for clean text (and where it is not, the id-by-id path gave the same above).
    assert clean_used >= 60, clean_used


def test_finish_many_equals_each_alone(tok: Tokenizer) -> None:
    """Ended sequences' texts decoded together (`finish_many`: one batch decode per skip setting) are each one's
    `extend(last=True)` + `flush`, from any state (fresh, or after ids taken one by one, maybe mid-character),
    for empty remainders too."""
    rng = random.Random(11)
    byte_id = _byte_ids(tok)
    added = sorted(int(i) for i in tok.hf.backend_tokenizer.get_added_tokens_decoder())
    for _ in range(12):
        cases = []
        for _ in range(rng.randint(1, 24)):
            prompt = _script(rng, tok, byte_id, added, clean=rng.random() < 0.7)[-rng.randint(0, 8):]
            before = _script(rng, tok, byte_id, added, rng.random() < 0.5) if rng.random() < 0.4 else []
            rest = _script(rng, tok, byte_id, added, rng.random() < 0.5) if rng.random() < 0.9 else []
            cases.append((prompt, before, rest, rng.random() < 0.6))

        def started(cases=cases):
            dets = [IncrementalDetokenizer(tok, p, skip) for p, _, _, skip in cases]
            for d, (_, before, _, _) in zip(dets, cases):
                for t in before:
                    d.add(t)
            return dets

        alone = started()
        want = [d.extend(rest, last=True) + d.flush() for d, (_, _, rest, _) in zip(alone, cases)]
        together = started()
        assert IncrementalDetokenizer.finish_many(together, [rest for _, _, rest, _ in cases]) == want, cases
        assert [d.text for d in together] == [d.text for d in alone]


def test_whole_decode_rule_by_decoder() -> None:
    assert build_tokenizer(512).whole_decode_rule == (frozenset(), True)
    sp = _sentencepiece()
    added, fffd_ok = sp.whole_decode_rule
    assert not fffd_ok and {sp.token_id("<|im_end|>"), sp.token_id("<tool_call>")} <= added
    # A decoder outside the known pipelines (WordPiece's) takes the id-by-id path.
    from tokenizers import decoders

    wp = _sentencepiece()
    wp.hf.backend_tokenizer.decoder = decoders.WordPiece()
    assert wp.whole_decode_rule is None
