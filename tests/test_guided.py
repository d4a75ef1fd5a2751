"""Structured outputs (xgrammar): SamplingParams.guided_json / structural_tag on the tiny random model, through
the plain generate loop and the continuous-batching engine (which must agree token for token)."""

import functools
import json
import re

import pytest
import torch
from conftest import random_model

from cpm4 import LLM, SamplingParams
from cpm4.engine.generate import generate_ids
from cpm4.engine.sampling import Sampler, process_logits
from cpm4.engine.scheduler import build_engine
from cpm4.model.tokenizer import TOOL_CALL, build_tokenizer
from cpm4.serve.tool_calls import ToolCallCollector

xgr = pytest.importorskip("xgrammar")
from cpm4.engine import guided  # noqa: E402

# Bounded values, so that a random model completes the object within a few dozen tokens. (Not maxLength for
# the string: xgrammar 0.2.9's length-bounded strings admit raw control characters, which JSON forbids.)
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": -5, "maximum": 999},
                                           "b": {"type": "boolean"}, "c": {"enum": ["x", "y"]},
                                           "d": {"type": "string", "pattern": "^[a-z ]{1,5}$"}},
          "required": ["a", "b", "c", "d"]}


@functools.cache
def tok():
    return build_tokenizer(1024)


@functools.cache
def model():
    return random_model("tiny", dtype=torch.float32)


def prompt(i=0):
    return tok().encode(["Give me JSON:", "An object please", "x"][i % 3])


def gen(params):
    params = params if isinstance(params, list) else [params]
    return generate_ids(model(), tok(), [prompt(i) for i in range(len(params))], params)


def matcher(**kw):
    return guided.new_matcher(tok(), model().config.vocab_size, model().config.eos_token_ids, SamplingParams(**kw))


def check_schema(obj):
    assert set(obj) == {"a", "b", "c", "d"}
    assert isinstance(obj["a"], int) and -5 <= obj["a"] <= 999 and isinstance(obj["b"], bool)
    assert obj["c"] in ("x", "y") and re.fullmatch("[a-z ]{1,5}", obj["d"])


def test_params_validation():
    assert SamplingParams(guided_json=False).guided_json is None and not SamplingParams().guided
    assert SamplingParams(guided_json=True).guided and SamplingParams(guided_json='{"type": "object"}').guided
    for bad in (1, "not json", "[1]", ["a"]):
        with pytest.raises(ValueError, match="^guided_json must be"):
            SamplingParams(guided_json=bad)
    with pytest.raises(ValueError, match="^structural_tag must be"):
        SamplingParams(structural_tag="[]")
    with pytest.raises(ValueError, match="exclusive"):
        SamplingParams(guided_json=True, structural_tag={"type": "structural_tag"})
    # A schema xgrammar rejects fails when the sequence starts, in either path, naming the field.
    bad = SamplingParams(guided_json={"type": "bogus"}, max_tokens=3)
    with pytest.raises(ValueError, match="^guided_json is not a valid JSON schema"):
        gen(bad)
    eng = build_engine(model(), tok(), 1024, 2)
    with pytest.raises(ValueError, match="^guided_json"):
        eng.add_request("r", prompt(), bad)
    assert not eng.has_work()
    with pytest.raises(ValueError, match="not among the tools"):
        guided.tool_call_structural_tag([{"name": "f"}], "g")
    # A guided row needs its matcher.
    with pytest.raises(ValueError, match="matchers"):
        process_logits(torch.zeros(1, 1024), [SamplingParams(guided_json=True)], [[]])


def test_a_regex_of_spaces_is_one_a_grammar_of_spaces_is_not():
    """guided_regex=" " is a pattern (one space), refused as blank before (the guided fuzz drew it at another
    seed); a grammar of spaces has no rule and is still refused."""
    (out,) = gen(SamplingParams(guided_regex="  ", max_tokens=8, seed=1, temperature=1.0))
    assert out.text == "  " and out.finish_reason == "stop"
    for field in ("guided_grammar", "guided_regex"):
        with pytest.raises(ValueError, match=f"^{field} must be a non-empty string"):
            SamplingParams(**{field: " \n" if field == "guided_grammar" else ""})


def test_mask_allows_only_grammar_tokens():
    m = matcher(guided_json=True)
    logits = torch.randn(2, model().config.vocab_size)
    params = [SamplingParams(guided_json=True), SamplingParams()]
    x = process_logits(logits, params, [[], []], matchers=[m, None])
    allowed = torch.isfinite(x[0]).nonzero().flatten().tolist()
    assert allowed and all(tok().decode([t]).lstrip().startswith("{") for t in allowed)
    assert torch.equal(x[1], logits[1])  # the unguided row is untouched
    s = Sampler(params[0], matcher=m)
    assert s.matcher is m


def test_json_object_outputs_parse():
    outs = gen([SamplingParams(max_tokens=120, seed=s, guided_json=True) for s in range(6)])
    assert any(o.finish_reason == "stop" for o in outs)
    for o in outs:
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:  # cut by max_tokens: still a prefix the grammar accepts
            m = matcher(guided_json=True)
            assert all(m.accept_token(t) for t in o.token_ids) and not m.is_terminated()


def test_json_schema_outputs_validate_greedy_and_sampled():
    params = [SamplingParams(max_tokens=80, temperature=0, guided_json=SCHEMA)]
    params += [SamplingParams(max_tokens=80, seed=s, temperature=1.2, top_p=0.95, guided_json=json.dumps(SCHEMA))
               for s in range(5)]
    for o in gen(params):
        assert o.finish_reason == "stop", o.text
        check_schema(json.loads(o.text))
    # ignore_eos does not run past the grammar's end: a complete document ends the sequence.
    (o,) = gen(SamplingParams(max_tokens=80, temperature=0, guided_json=SCHEMA, ignore_eos=True))
    assert o.finish_reason == "stop" and o.text == gen(params[0])[0].text


@pytest.mark.parametrize("async_output", [False, True])
def test_engine_equals_plain_loop(async_output):
    params = [SamplingParams(max_tokens=40, temperature=0, guided_json=SCHEMA),
              SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),  # unguided rows in the same batch
              SamplingParams(max_tokens=40, seed=7, guided_json=True),
              SamplingParams(max_tokens=40, seed=3, guided_json=SCHEMA),
              SamplingParams(max_tokens=15, seed=1)]
    ps = [prompt(i) for i in range(len(params))]
    refs = generate_ids(model(), tok(), ps, params)
    if async_output:  # launches decode steps ahead while only unguided rows are left
        eng = build_engine(model(), tok(), 4096, 3, async_output=True)
        for i, (p, sp) in enumerate(zip(ps, params)):
            eng.add_request(str(i), p, sp)
        res = eng.run_to_completion()
        outs = [res[str(i)] for i in range(len(ps))]
    else:
        outs = [(o.text, o.token_ids, o.finish_reason)
                for o in LLM(model(), tokenizer=tok(), max_num_seqs=3).generate(ps, params)]
    for o, r in zip(outs, refs, strict=True):
        assert o == (r.text, r.token_ids, r.finish_reason)
    check_schema(json.loads(refs[0].text))


def test_forced_tool_call_grammar():
    tools = [{"name": "get_weather", "parameters": {"type": "object", "properties": {
                 "city": {"enum": ["Paris", "Oslo"]}, "days": {"type": "integer"}}, "required": ["city", "days"]}},
             {"name": "noop"}]
    marker = tok().token_id(TOOL_CALL)
    for name, seed in [("get_weather", 0), (None, 1), (None, 2)]:
        tag = guided.tool_call_structural_tag(tools, name, parallel=False)
        (o,) = gen(SamplingParams(max_tokens=100, seed=seed, structural_tag=tag))
        assert o.finish_reason == "stop" and o.token_ids[0] == marker
        col = ToolCallCollector(tok())
        assert col.feed("", o.token_ids) == ""  # everything from the marker on is held for parsing
        _, calls = col.finish()
        assert len(calls) == 1
        fn = calls[0]["function"]
        assert fn["name"] == name or (name is None and fn["name"] in ("get_weather", "noop"))
        args = json.loads(fn["arguments"])
        if fn["name"] == "get_weather":
            assert args["city"] in ("Paris", "Oslo") and isinstance(args["days"], int)
        else:
            assert args == {}


# ---------------------------------------------------------------------------------------------------------
# The output's UTF-8 (guided.Utf8Table, Utf8Matcher)

_PREFIX = {0: b"", 1: b"\xc3", 2: b"\xe1", 3: b"\xe0", 4: b"\xed", 5: b"\xf1", 6: b"\xf0", 7: b"\xf4"}  # a state each


def _valid_prefix(data: bytes) -> bool:
    """Python's strict decoder: data is whole characters and the start of one that some bytes complete (its
    incremental decoder takes ED A0 as pending although nothing completes it: the completions are tried)."""
    import codecs
    import itertools

    dec = codecs.getincrementaldecoder("utf-8")()
    try:
        dec.decode(data, final=False)
    except UnicodeDecodeError:
        return False
    pending = dec.getstate()[0]
    if not pending:
        return True
    need = (2 if pending[0] < 0xE0 else 3 if pending[0] < 0xF0 else 4) - len(pending)
    edges = (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)  # the continuation ranges' ends: enough to find a completion
    for tail in itertools.product(edges, repeat=need):
        try:
            (pending + bytes(tail)).decode("utf-8")
        except UnicodeDecodeError:
            continue
        return True
    return False


def _behaviour(data: bytes) -> tuple[bool, ...]:
    """Which bytes may follow `data`, then after one and two more continuation bytes: equal for two prefixes
    exactly when they leave the decoder in the same state."""
    return tuple(_valid_prefix(data + more + bytes([x])) for more in (b"", b"\x80", b"\x80\x80") for x in range(256))


def test_utf8_table_against_pythons_decoder():
    """Every (state, token) of a random byte vocabulary (all single bytes, and 1-6 byte strings biased to UTF-8's
    lead and continuation bytes): the mask bit is set exactly where the state's bytes then the token's are a valid
    UTF-8 prefix for Python's strict decoder, and the state after the token behaves as those bytes do."""
    import functools
    import random

    rng = random.Random(3)
    pool = [0x41, 0x22, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED,
            0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    vocab = [b""] + [bytes([i]) for i in range(256)] + [bytes(rng.choice(pool) for _ in range(rng.randint(2, 6)))
                                                        for _ in range(3000)]
    vocab += list(map(str.encode, ["é", "中文", "😀", "a😀b"])) + [b""] * 5
    table = guided.Utf8Table(vocab[:-5], len(vocab))  # 5 ids past the decoded vocabulary: no bytes
    bits = ((table.masks[:, :, None] >> torch.arange(32)) & 1).flatten(1)[:, :len(vocab)].bool()
    behaviour = functools.cache(_behaviour)
    assert len({behaviour(head) for head in _PREFIX.values()}) == 8  # the eight states differ
    for s, head in _PREFIX.items():
        for i, b in enumerate(vocab):
            ok = _valid_prefix(head + b)
            assert bool(bits[s, i]) == ok, (s, head, b)
            if ok:
                assert behaviour(head + b) == behaviour(_PREFIX[int(table.after[s, i])]), (s, head, b)


def test_guided_masks_keep_the_output_utf8():
    """After E0 (the start of a three-byte character) the guided mask allows A0-BF next but not 8F: xgrammar's
    mask alone allows 8F (an overlong encoding, three U+FFFD in the text: a string of maxLength 1 came back three
    characters long); after ED not A0 (a surrogate). A grammar that allows only broken bytes keeps its own mask."""
    vocab = guided._entry(tok(), model().config.vocab_size, model().config.eos_token_ids)[1].decoded_vocab
    ids = {bytes(b): i for i, b in enumerate(vocab) if len(b) == 1}
    schema = {"type": "string", "minLength": 1, "maxLength": 1}

    def allowed(m, byte):
        bm = xgr.allocate_token_bitmask(1, model().config.vocab_size)
        m.fill_next_token_bitmask(bm, 0)
        t = ids[bytes([byte])]
        return bool((bm[0, t // 32] >> (t % 32)) & 1)

    for lead, bad, good in ((0xE0, 0x8F, 0xA0), (0xED, 0xA0, 0x9F)):
        m = matcher(guided_json=schema)
        assert isinstance(m, guided.Utf8Matcher)
        assert m.accept_token(ids[b'"']) and m.accept_token(ids[bytes([lead])])
        assert allowed(m, good) and not allowed(m, bad), hex(lead)
    # A regex of one broken sequence: the mask falls back to the grammar's (the row is never left without a token).
    m = matcher(guided_regex="\\xff")
    bm = xgr.allocate_token_bitmask(1, model().config.vocab_size)
    m.fill_next_token_bitmask(bm, 0)
    assert bool(bm.any())


def test_utf8_state_follows_rollback_reset_and_strings():
    """The UTF-8 state moves with the matcher: rolled back a token (E0 undone, ED instead: 8F now allowed, A0 not),
    reset, and over strings accepted (one rollback step each, as xgrammar counts them)."""
    vocab = guided._entry(tok(), model().config.vocab_size, model().config.eos_token_ids)[1].decoded_vocab
    ids = {bytes(b): i for i, b in enumerate(vocab) if len(b) == 1}

    def allowed(m, byte):
        bm = xgr.allocate_token_bitmask(1, model().config.vocab_size)
        m.fill_next_token_bitmask(bm, 0)
        t = ids[bytes([byte])]
        return bool((bm[0, t // 32] >> (t % 32)) & 1)

    m = matcher(guided_json={"type": "string"})
    assert m.accept_token(ids[b'"']) and m.accept_token(ids[b"\xe0"])
    assert allowed(m, 0xA0) and not allowed(m, 0x8F)
    m.rollback(1)
    assert m.accept_token(ids[b"\xed"])
    assert allowed(m, 0x8F) and not allowed(m, 0xA0)
    m.reset()
    assert m.state == 0 and m.accept_string(b'"\xe0')
    assert allowed(m, 0xA0) and not allowed(m, 0x8F)
    assert not m.accept_string("\u00e9")  # a character's lead where E0 wants a continuation: refused, no step
    m.rollback(1)  # the string b'"\xe0' (one step)
    assert m.state == 0 and not allowed(m, 0x8F)
    with pytest.raises(RuntimeError):  # past the start: the matcher refuses, the states stay
        m.rollback(5)
    assert m.state == 0 and len(m.states) == 1


def test_guided_strings_of_one_character_are_one_character():
    """One-character strings with the logits pushed toward E0 and 8F (an overlong pair xgrammar's mask alone lets
    through): every finished output is valid JSON whose strings are one character each, none a U+FFFD — the
    E0 characters completed with valid bytes instead."""
    vocab = guided._entry(tok(), model().config.vocab_size, model().config.eos_token_ids)[1].decoded_vocab
    ids = {bytes(b): i for i, b in enumerate(vocab) if len(b) == 1}
    bias = {ids[b"\xe0"]: 12.0, ids[b"\x8f"]: 12.0}
    schema = {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 1}, "minItems": 1,
              "maxItems": 3}
    outs = gen([SamplingParams(guided_json=schema, seed=s, temperature=1.0, max_tokens=40, logit_bias=bias)
                for s in range(8)])
    done = [o for o in outs if o.finish_reason == "stop"]
    assert len(done) >= 4
    for o in done:
        items = json.loads(o.text)
        assert all(len(x) == 1 and x != "\ufffd" for x in items), o.text
    assert any("\u0800" <= x <= "\u0fff" for o in done for x in json.loads(o.text))  # E0's characters were made
