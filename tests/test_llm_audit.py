"""`LLM` as code ported from vLLM's offline API uses it: vLLM's engine arguments, SamplingParams' vLLM-only fields
and helpers, request ids, a callable use_tqdm and vLLM's prompt dicts."""

import pytest
from tqdm import tqdm

from cpm4 import LLM, SamplingParams
from cpm4.cli import DEFAULT_MODEL

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(DEFAULT_MODEL, device="cpu")


def test_vllm_engine_args_that_cannot_change_outputs_are_taken():
    """vLLM's harmless engine arguments were a TypeError; those that would change the outputs are refused by name,
    a typo still a TypeError; seed seeds unseeded sampling (was a TypeError)."""
    sampled = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = []
    for _ in range(2):
        llm = LLM(DEFAULT_MODEL, device="cpu", seed=7, trust_remote_code=True, tensor_parallel_size=1,
                  quantization=None, swap_space=4, disable_log_stats=True, enable_chunked_prefill=True,
                  max_num_batched_tokens=2048, kv_cache_dtype="auto", tokenizer_mode="auto")
        runs.append(llm.generate("Once upon a time", sampled)[0].token_ids)
    assert runs[0] == runs[1]
    for kw, what in ((dict(tensor_parallel_size=2), "tensor_parallel_size=2"),
                     (dict(quantization="awq"), "quantization='awq'"), (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"),
                     (dict(seed=1.5), "seed must be an int")):
        with pytest.raises(ValueError, match=what):
            LLM(DEFAULT_MODEL, device="cpu", **kw)
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_num_seq'"):
        LLM(DEFAULT_MODEL, device="cpu", max_num_seq=4)


def test_sampling_params_vllm_helpers_and_fields():
    """clone, from_optional and extra_args were missing (AttributeError / TypeError); SamplingParams(2) set
    max_tokens where vLLM's first field is n: fields are taken by name only."""
    sp = SamplingParams(temperature=0.5, stop=["a"], extra_args={"tag": 1})
    twin = sp.clone()
    twin.stop.append("b")
    assert sp.stop == ["a"] and twin == SamplingParams(temperature=0.5, stop=["a", "b"], extra_args={"tag": 1})
    opt = SamplingParams.from_optional(temperature=None, top_p=None, n=None, presence_penalty=None,
                                       logit_bias={"5": 250.0, 6: -1.0}, max_tokens=10)
    assert (opt.temperature, opt.top_p, opt.n, opt.presence_penalty) == (1.0, 1.0, 1, 0.0)
    assert opt.logit_bias == {5: 100.0, 6: -1.0} and opt.max_tokens == 10
    with pytest.raises(TypeError):
        SamplingParams(2)


def test_truncate_prompt_tokens_minus_one_is_the_context():
    """vLLM's truncate_prompt_tokens=-1 (keep what the context holds) was refused."""
    llm = LLM(DEFAULT_MODEL, device="cpu", max_model_len=64)
    ids = list(range(10, 110))
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=4, truncate_prompt_tokens=-1))[0]
    assert out.prompt_token_ids == ids[-63:] and len(out.token_ids) == 1  # the context leaves room for one
    assert llm.generate([ids[:20]], SamplingParams(max_tokens=2, truncate_prompt_tokens=-1))[0].prompt_token_ids \
        == ids[:20]
    for bad in (0, -2, -1.0, True):
        with pytest.raises(ValueError, match="truncate_prompt_tokens must be"):
            SamplingParams(truncate_prompt_tokens=bad)


def test_detokenize_false_gives_token_ids_only(llm):
    """vLLM's detokenize=False (was a TypeError): the same tokens, no text; stop strings need the text."""
    want = llm.generate("Once upon a time", GREEDY)[0]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, detokenize=False)
    out = llm.generate("Once upon a time", sp)[0]
    assert out.token_ids == want.token_ids and want.text and out.text == ""
    n2 = llm.generate("Once upon a time", SamplingParams(n=2, seed=1, max_tokens=3, detokenize=False))[0]
    assert [c.text for c in n2.outputs] == ["", ""] and all(len(c.token_ids) for c in n2.outputs)
    with pytest.raises(ValueError, match="need detokenize=True"):
        SamplingParams(stop=["x"], detokenize=False)
    with pytest.raises(ValueError, match="detokenize must be a bool"):
        SamplingParams(detokenize="no")


def test_request_ids_and_callable_use_tqdm(llm):
    """RequestOutput.request_id was missing; a callable use_tqdm (vLLM's: it makes the bar) was ignored for tqdm."""
    made = []

    def bar(**kwargs):
        made.append(kwargs["total"])
        return tqdm(disable=True, **kwargs)

    outs = llm.generate(["a", "b"], GREEDY, use_tqdm=bar)
    assert made == [2]
    ids = [o.request_id for o in outs]
    later = llm.generate("c", SamplingParams(n=2, seed=0, max_tokens=2))[0]
    assert len({*ids, later.request_id}) == 3 and all(isinstance(i, str) for i in ids)
    assert int(later.request_id) > max(map(int, ids)) and {c.request_id for c in later.outputs} == {later.request_id}
    assert outs[0] == llm.generate("a", GREEDY)[0]  # outputs still compare by content


def test_prompt_dicts_refuse_what_they_would_drop(llm):
    """vLLM's multi_modal_data was dropped silently (the answer ignores the image), and prompt_token_ids given as
    text was encoded as text; both are refused, and the LLM goes on serving."""
    want = llm.generate("Hello there", GREEDY)[0].token_ids
    with pytest.raises(ValueError, match="multi_modal_data is not supported"):
        llm.generate(["Hello there", {"prompt": "What is this?", "multi_modal_data": {"image": object()}}], GREEDY)
    with pytest.raises(ValueError, match="prompt_token_ids must be token ids"):
        llm.generate({"prompt_token_ids": "Hello there"}, GREEDY)
    ids = llm.tokenizer.encode("Hello there")
    outs = llm.generate(["Hello there", {"prompt": "Hello there", "multi_modal_data": None},
                         {"prompt_token_ids": ids}], GREEDY)
    assert [o.token_ids for o in outs] == [want] * 3
