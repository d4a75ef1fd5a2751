"""`LLM` and the module-level entry points as a vLLM user calls them: sampling_params by name, chat options,
prompts as arrays, a tokenizer named by path, and clear errors for what they cannot take."""

import numpy as np
import pytest
import torch

from cpm4 import LLM, SamplingParams, stream
from cpm4.cli import DEFAULT_MODEL

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(DEFAULT_MODEL, device="cpu")


def test_sampling_params_by_vllms_name_and_ours(llm):
    want = llm.generate("hi", GREEDY)[0].token_ids
    assert len(want) == 4
    assert llm.generate("hi", sampling_params=GREEDY)[0].token_ids == want
    assert llm.generate("hi", params=GREEDY)[0].token_ids == want
    assert llm.chat([{"role": "user", "content": "hi"}], sampling_params=GREEDY)[0].token_ids == \
        llm.chat([{"role": "user", "content": "hi"}], GREEDY)[0].token_ids
    assert len(llm.chat([{"role": "user", "content": "hi"}], sampling_params=GREEDY)[0].token_ids) == 4  # was ignored
    one = llm.chat([{"role": "user", "content": "hi"}], GREEDY)  # a list, as vLLM's, for one conversation too
    assert isinstance(one, list) and len(one) == 1 and one[0].outputs[0].text == one[0].text
    assert "".join(llm.stream("hi", sampling_params=GREEDY)) == llm.generate("hi", GREEDY)[0].text
    with pytest.raises(TypeError, match="not both"):
        llm.generate("hi", GREEDY, params=GREEDY)
    with pytest.raises(ValueError, match="2 prompts but 0 sampling params"):  # was: the defaults, silently
        llm.generate(["a", "b"], [])


def test_chat_options_reach_the_template(llm):
    tok = llm.tokenizer
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hel"}]
    out = llm.chat(msgs, GREEDY, add_generation_prompt=False, continue_final_message=True)[0]
    assert out.prompt_token_ids == tok.encode_chat(msgs, add_generation_prompt=False, continue_final_message=True)
    user = msgs[:1]
    plain = llm.chat(user, GREEDY)[0].prompt_token_ids
    via_kwargs = llm.chat(user, GREEDY, chat_template_kwargs={"enable_thinking": False})[0].prompt_token_ids
    assert via_kwargs == tok.encode_chat(user, enable_thinking=False) != plain  # was dropped
    assert llm.chat(user, GREEDY, enable_thinking=False)[0].prompt_token_ids == via_kwargs
    with pytest.raises(ValueError, match="messages must be a list"):  # a dict was a KeyError
        llm.chat({"role": "user", "content": "hi"}, GREEDY)


def test_prompts_as_arrays_and_bytes(llm):
    ids = llm.tokenizer.encode("Once upon a time")
    want = llm.generate([ids], GREEDY)[0].token_ids
    for given in (np.array(ids), torch.tensor(ids), [np.array(ids)]):
        assert llm.generate(given, GREEDY)[0].token_ids == want  # was a TypeError from deep inside
    assert [o.token_ids for o in llm.generate(np.array([ids, ids]), GREEDY)] == [want, want]  # 2-D: a batch
    with pytest.raises(ValueError, match="got bytes"):  # was run as the ids of its bytes
        llm.generate(b"abc", GREEDY)


def test_module_stream_checks_and_truncates_as_generate(llm):
    ids = llm.tokenizer.encode("a longer prompt of several words, cut to its last few tokens")
    sp = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, truncate_prompt_tokens=4)
    want = llm.generate([ids], sp)[0].text
    assert "".join(stream(llm.model, llm.tokenizer, ids, sp)) == want  # the whole prompt was used
    long = [5] * (llm.model.config.max_position_embeddings + 10)
    assert "".join(stream(llm.model, llm.tokenizer, long, sp)) == llm.generate([long], sp)[0].text  # was too long
    with pytest.raises(ValueError, match="n must be 1"):  # was taken as 1
        list(stream(llm.model, llm.tokenizer, ids, SamplingParams(n=2)))
    with pytest.raises(ValueError, match="prompt token id -1 is not in the vocabulary"):  # was an OverflowError
        list(llm.stream([5, -1], GREEDY))


def test_tokenizer_named_by_path(llm, tiny_checkpoint):
    from cpm4.model.tokenizer import Tokenizer

    other = LLM(DEFAULT_MODEL, device="cpu", tokenizer=str(tiny_checkpoint))
    assert other.tokenizer.vocab_size == Tokenizer.from_dir(tiny_checkpoint).vocab_size != llm.tokenizer.vocab_size
    again = LLM(llm.model, tokenizer=DEFAULT_MODEL)  # a model in memory with a tokenizer path (was a LookupError)
    assert again.generate("hi", GREEDY)[0].token_ids == llm.generate("hi", GREEDY)[0].token_ids
    with pytest.raises(FileNotFoundError, match="not found: /no/such/tokenizer"):
        LLM(DEFAULT_MODEL, device="cpu", tokenizer="/no/such/tokenizer")  # was ignored: the model's was used
    with pytest.raises(TypeError, match="tokenizer must be a Tokenizer or a folder"):
        LLM(DEFAULT_MODEL, device="cpu", tokenizer=3)


@pytest.mark.parametrize("kw,needle", [({"stop": 5}, "stop must be a string or a list of strings"),
                                       ({"stop": b"x"}, "stop must be"),
                                       ({"stop_token_ids": 5}, "stop_token_ids must be a list of token ids"),
                                       ({"stop_token_ids": "ab"}, "stop_token_ids must be a list")])
def test_sampling_params_stop_types(kw, needle):
    with pytest.raises(ValueError, match=needle):  # were TypeErrors ('int' object is not iterable)
        SamplingParams(**kw)


def test_generation_config_eos_ids_end_generation(llm, tmp_path):
    import json
    import shutil

    from cpm4.engine.generation_config import serving_config

    folder = tmp_path / "demo"
    shutil.copytree(DEFAULT_MODEL, folder)
    cfg = json.loads((folder / "config.json").read_text())
    im_end = llm.tokenizer.token_id("<|im_end|>")
    assert im_end in cfg["eos_token_id"]
    cfg["eos_token_id"] = 2  # the chat turn's end listed only in generation_config.json
    (folder / "config.json").write_text(json.dumps(cfg))
    gen = folder / "generation_config.json"
    extra = json.loads(gen.read_text()) if gen.is_file() else {}
    gen.write_text(json.dumps({**extra, "eos_token_id": [2, im_end]}))
    assert serving_config(folder).eos_token_ids == [2, im_end]  # what a server's API process reads
    msgs = [{"role": "user", "content": "hi"}]
    sp = SamplingParams(temperature=0, max_tokens=200)
    want = llm.chat(msgs, sp)[0]
    assert want.finish_reason == "stop" and want.token_ids[-1] == im_end
    other = LLM(folder, device="cpu")
    assert other.model.config.eos_token_ids == [2, im_end]
    got = other.chat(msgs, sp)[0]
    assert (got.token_ids, got.finish_reason) == (want.token_ids, "stop")  # ran on to max_tokens before
    gen.write_text(json.dumps({"eos_token_id": ["x"]}))
    with pytest.raises(ValueError, match="generation_config.json: eos_token_id must be a token id"):
        LLM(folder, device="cpu")
    gen.write_text(json.dumps({"eos_token_id": 10**6}))
    with pytest.raises(ValueError, match="eos_token_id 1000000 is outside the vocabulary"):
        LLM(folder, device="cpu")


def test_max_tokens_none_runs_to_the_context(tmp_path):
    """vLLM's max_tokens=None: generate until a stop or the context (max_model_len) is full; was refused."""
    small = LLM(DEFAULT_MODEL, device="cpu", max_model_len=24)
    sp = SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)
    ids = small.tokenizer.encode("Once upon a time")
    out = small.generate([ids], sp)[0]
    assert len(ids) + len(out.token_ids) == 24 and out.finish_reason == "length"
    capped = small.generate([ids], SamplingParams(temperature=0, max_tokens=24 - len(ids), ignore_eos=True))[0]
    assert out.token_ids == capped.token_ids
    assert "".join(small.stream(ids, sp)) == out.text  # the plain loop on the CPU
    assert "".join(stream(small.model, small.tokenizer, ids, sp, context=24)) == out.text
    assert SamplingParams(max_tokens=None, min_tokens=5).min_tokens == 5
    with pytest.raises(ValueError, match="max_tokens must be >= 1 or None"):
        SamplingParams(max_tokens=0)


def test_stop_reason_names_what_ended_the_output(llm):
    """vLLM's CompletionOutput.stop_reason: the stop string, or the stop_token_ids id; None for an EOS token and
    the other finish reasons. Both front ends: the scheduler's (`LLM.generate`) and the plain loop."""
    from cpm4.engine.generate import generate_ids

    prompt = llm.tokenizer.encode("Once upon a time")
    free = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert (free.finish_reason, free.stop_reason) == ("length", None)
    k = 4
    tok = free.token_ids[k]
    first = free.token_ids.index(tok)
    by_id = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[tok])
    stop = free.text[len(llm.tokenizer.decode(free.token_ids[:3])):][:3]
    assert stop.strip(), free.text
    by_text = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=["\x00never", stop])
    for run in (lambda sp: llm.generate([prompt], sp)[0],
                lambda sp: generate_ids(llm.model, llm.tokenizer, [prompt], [sp])[0]):
        out = run(by_id)
        assert (out.finish_reason, out.stop_reason) == ("stop", tok)
        assert out.token_ids == free.token_ids[:first + 1]
        out = run(by_text)
        assert (out.finish_reason, out.stop_reason) == ("stop", stop)
        assert out.text == free.text[:free.text.index(stop)]
    chat = llm.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=200))[0]
    assert chat.finish_reason == "stop" and chat.token_ids[-1] in llm.model.config.eos_token_ids
    assert chat.stop_reason is None  # an EOS token, as vLLM


def test_cumulative_logprob_is_the_sum_of_the_tokens_logprobs(llm):
    """Against a float64 log-softmax of one full forward pass over prompt + output."""
    prompt = llm.tokenizer.encode("The quick brown fox")
    sp = SamplingParams(temperature=1.0, seed=3, max_tokens=6, ignore_eos=True, logprobs=0)
    out = llm.generate([prompt], sp)[0]
    ids = prompt + out.token_ids
    with torch.no_grad():
        logits = llm.model(torch.tensor([ids]))[0].double()
    lp = torch.log_softmax(logits, -1)
    want = sum(lp[len(prompt) - 1 + i, t].item() for i, t in enumerate(out.token_ids))
    assert out.cumulative_logprob == pytest.approx(want, abs=1e-3)
    assert llm.generate([prompt], SamplingParams(max_tokens=2))[0].cumulative_logprob is None


def test_vllm_sampling_rules(llm):
    """vLLM's rules found missing by an audit: seed -1 is unseeded (was a fixed seed: every call the same);
    min_tokens holds the EOS back even with ignore_eos; a bad word's leading spaces are dropped before it is
    encoded alone and after a space (" cat" banned " cat" only, "cat" went through); spaces_between_special_tokens
    is taken."""
    from cpm4.engine.generate import bad_word_ids
    from cpm4.engine.params import nth_seed

    assert SamplingParams(seed=-1).seed is None and nth_seed(-1, 1) is None and nth_seed(-2, 1) == -1
    prompt = llm.tokenizer.encode("Once upon a time")
    sp = SamplingParams(temperature=1.5, seed=-1, max_tokens=24, ignore_eos=True)
    assert len({tuple(llm.generate([prompt], sp)[0].token_ids) for _ in range(3)}) > 1
    n3 = llm.generate([prompt], SamplingParams(temperature=1.5, seed=-1, n=3, max_tokens=24, ignore_eos=True))[0]
    assert len({tuple(o.token_ids) for o in n3.outputs}) == 3  # was: completion 1 seeded with 0

    eos = llm.model.config.eos_token_ids[0]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5, min_tokens=3, ignore_eos=True,
                                                logit_bias={eos: 30.0}))[0]
    assert eos not in out.token_ids[:3] and out.token_ids[3:] == [eos, eos]  # was [eos] * 5

    tok = llm.tokenizer
    cat, spaced = tuple(tok.encode("cat", add_bos=False)), tuple(tok.encode(" cat", add_bos=False))
    assert cat != spaced and len(cat) == 1
    assert set(bad_word_ids(tok, [" cat"])) == set(bad_word_ids(tok, ["cat"])) == {cat, spaced}
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, bad_words=[" cat"],
                                                logit_bias={cat[0]: 30.0}))[0]
    assert cat[0] not in out.token_ids  # was "catcatcatcat"

    assert SamplingParams(spaces_between_special_tokens=False).spaces_between_special_tokens is False
    with pytest.raises(ValueError, match="spaces_between_special_tokens must be a bool"):
        SamplingParams(spaces_between_special_tokens="no")


def test_structured_outputs_in_vllms_offline_form(llm):
    """`SamplingParams(structured_outputs=StructuredOutputsParams(...))` (and the older `guided_decoding=
    GuidedDecodingParams(...)`, or a dict) constrains the output as the flat guided_* field does: the same tokens
    for the same request; one kind at a time, not beside a flat field, only xgrammar as the backend."""
    pytest.importorskip("xgrammar")
    from cpm4 import GuidedDecodingParams, StructuredOutputsParams

    choices = ["yes", "no", "maybe so"]
    flat = llm.generate("Answer:", SamplingParams(temperature=1.0, seed=3, guided_choice=choices))[0]
    assert flat.text in choices
    for sp in (SamplingParams(temperature=1.0, seed=3, structured_outputs=StructuredOutputsParams(choice=choices)),
               SamplingParams(temperature=1.0, seed=3, guided_decoding=GuidedDecodingParams(choice=choices)),
               SamplingParams(temperature=1.0, seed=3, structured_outputs={"choice": choices})):
        assert sp.guided_choice == choices and sp.structured_outputs is None and sp.guided_decoding is None
        assert llm.generate("Answer:", sp)[0].token_ids == flat.token_ids
    out = llm.generate("Digits:", SamplingParams(
        temperature=0, max_tokens=16, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[0-9]{2}")))[0]
    assert out.finish_reason == "stop" and len(out.text) == 6 and out.text[3] == "-"
    assert SamplingParams(structured_outputs=StructuredOutputsParams(json_object=True)).guided_json is True
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    assert SamplingParams(guided_decoding=GuidedDecodingParams(json=schema)).guided_json == schema
    with pytest.raises(ValueError, match="exactly one of .*got regex, choice"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="got none"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="backend 'outlines' is not available"):
        StructuredOutputsParams(choice=["a"], backend="outlines")
    with pytest.raises(ValueError, match="structured_outputs and guided_regex both give a grammar"):
        SamplingParams(guided_regex="a", structured_outputs=StructuredOutputsParams(regex="b"))
    with pytest.raises(ValueError, match="guided_decoding must be a StructuredOutputsParams"):
        SamplingParams(guided_decoding="json")


def test_vllms_output_and_tokenizer_accessors(llm):
    """vLLM's `get_tokenizer()` (the Hugging Face tokenizer: its chat template renders what `chat` feeds the
    model), `CompletionOutput.index` over n completions, and `RequestOutput.finished`."""
    tok = llm.get_tokenizer()
    msgs = [{"role": "user", "content": "Is water wet?"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert llm.tokenizer.encode_chat(msgs) == llm.chat(msgs, GREEDY)[0].prompt_token_ids
    assert llm.tokenizer.render_chat(msgs) == text
    assert tok.decode(tok.encode("plain words", add_special_tokens=False)) == "plain words"
    out = llm.generate("Hi", SamplingParams(n=3, seed=5, max_tokens=3))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2] and out.finished and all(c.finished for c in out.outputs)
    assert llm.generate("Hi", GREEDY)[0].outputs[0].index == 0
