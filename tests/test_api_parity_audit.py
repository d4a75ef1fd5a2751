"""vLLM-parity audit of the offline and async Python APIs: calls written for vLLM that failed, or rendered otherwise,
here — chat messages with OpenAI's text content parts, a null content or tool-call arguments as JSON text,
SamplingParams(logprobs=True), and beam_search's lora_request / concurrency_limit keywords."""

from __future__ import annotations

import asyncio
import copy

import pytest

from cpm4 import LLM, AsyncLLM, BeamSearchParams, SamplingParams

ONE = SamplingParams(max_tokens=1, temperature=0)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(tiny_checkpoint, device="cpu", dtype="float32")


def test_chat_text_content_parts_as_vllm(llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}, "and", {"type": "text", "text": "there"}]}]
    kept = copy.deepcopy(parts)
    want = llm.chat_ids([{"role": "user", "content": "hi\nand\nthere"}])
    out = llm.chat(parts, ONE)
    assert out[0].prompt_token_ids == want
    assert parts == kept  # the caller's messages are not changed
    # A list of conversations, one of them with parts.
    outs = llm.chat([parts, [{"role": "user", "content": "hi"}]], ONE)
    assert outs[0].prompt_token_ids == want
    assert outs[1].prompt_token_ids == llm.chat_ids([{"role": "user", "content": "hi"}])


def test_chat_non_text_part_refused_clearly(llm):
    msgs = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(ValueError, match="'image_url' is not supported.*text"):
        llm.chat(msgs, ONE)


def test_chat_null_content_is_empty(llm):
    msgs = [{"role": "system", "content": None}, {"role": "user", "content": "hi"}]
    want = llm.chat_ids([{"role": "system", "content": ""}, {"role": "user", "content": "hi"}])
    assert llm.chat(msgs, ONE)[0].prompt_token_ids == want


def test_chat_tool_call_arguments_text_parsed(llm):
    def conversation(arguments):
        call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        return [{"role": "user", "content": "weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]

    want = llm.chat_ids(conversation({"city": "Paris"}))
    msgs = conversation('{"city":"Paris"}')
    kept = copy.deepcopy(msgs)
    assert llm.chat(msgs, ONE)[0].prompt_token_ids == want
    assert msgs == kept
    assert llm.chat_ids(conversation("")) == llm.chat_ids(conversation({}))


def test_async_chat_text_content_parts(tiny_checkpoint, llm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    allm = AsyncLLM(tiny_checkpoint, device="cpu", dtype="float32", engine_process=False, max_num_seqs=4,
                    cpu_threads=1)
    try:
        async def run():
            return [o async for o in allm.chat(parts, ONE)]

        outs = asyncio.run(run())
    finally:
        allm.shutdown()
    assert outs[-1].prompt_token_ids == llm.chat_ids([{"role": "user", "content": "hi"}])


def test_logprobs_true_is_one(llm):
    sp = SamplingParams(max_tokens=2, temperature=0, logprobs=True, prompt_logprobs=True)
    assert sp.logprobs == 1 and sp.prompt_logprobs == 1
    out = llm.generate("Hello", sp)[0]
    assert [len(lp.top) for lp in out.logprobs] == [1, 1]
    assert all(len(lp.top) == 1 for lp in out.prompt_logprobs[1:])
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=False)  # (not vLLM's rule for False either: refused as before)


def test_beam_search_takes_vllm_keywords(llm):
    params = BeamSearchParams(beam_width=2, max_tokens=2)
    want = llm.beam_search(["Hello"], params)
    got = llm.beam_search(["Hello"], params, lora_request=None, concurrency_limit=1)
    assert [[s.tokens for s in o.sequences] for o in got] == [[s.tokens for s in o.sequences] for o in want]
    with pytest.raises(ValueError, match="LoRA"):
        llm.beam_search(["Hello"], params, lora_request=object())
    with pytest.raises(ValueError, match="concurrency_limit"):
        llm.beam_search(["Hello"], params, concurrency_limit=0)
