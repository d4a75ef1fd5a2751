"""Tokenizer: offline byte-level BPE build, save/load, ChatML rendering, incremental detokenization."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from cpm4.model.tokenizer import (
    CHAT_TOKENS,
    CHATML_TEMPLATE,
    MIN_VOCAB_SIZE,
    IncrementalDetokenizer,
    Tokenizer,
    build_tokenizer,
)

V = 1024
SAMPLES = [
    "",
    "Hello, world!",
    " leading and trailing spaces  ",
    "naïve café — résumé, Ångström, façade",
    "中文分词测试：你好，世界。日本語のテキスト、한국어",
    "emoji 🦜🎉 and a family 👩‍👩‍👧 with ZWJ",
    "tabs\tand\nnewlines\r\n\n  indented\n\t\tmore",
    "rare CJK 𠀀𪚥 and control \x00\x07\x7f chars",
    'code: def f(x):\n    return {"a": [1, 2.5e-3]}  # ok',
]
CONVO = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
]
CONVO_TEXT = (
    "<|im_start|>system\nYou are terse.<|im_end|>\n"
    "<|im_start|>user\nHi there<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n"
    "<|im_start|>user\n2+2?<|im_end|>\n"
)
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return build_tokenizer(V)


def test_round_trip(tok: Tokenizer) -> None:
    for text in SAMPLES:
        ids = tok.encode(text, add_bos=False)
        assert tok.decode(ids) == text
        with_bos = tok.encode(text)
        assert with_bos == [tok.bos_token_id, *ids]
        assert tok.decode(with_bos) == text
        assert tok.decode(with_bos, skip_special_tokens=False) == "<s>" + text


def test_special_ids_and_vocab_layout(tok: Tokenizer) -> None:
    assert tok.vocab_size == V
    assert [tok.token_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    assert [tok.token_id(t) for t in CHAT_TOKENS] == list(range(V - 8, V))
    assert tok.token_id("<|im_end|>") == V - 8 and tok.token_id("<|im_start|>") == V - 7
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert tok.stop_token_ids == [2, V - 8]
    # ids 3..258 are the 256 byte symbols: each decodes to exactly one byte on its own
    byte_tokens = tok.hf.convert_ids_to_tokens(list(range(3, 259)))
    assert len(set(byte_tokens)) == 256 and all(len(t) == 1 for t in byte_tokens)
    # specials in text become single ids
    assert tok.encode("<|im_start|>user<|im_end|>", add_bos=False)[0] == V - 7
    assert tok.encode("x</s>", add_bos=False)[-1] == 2


@pytest.mark.parametrize("size", [MIN_VOCAB_SIZE, 600, 4096])
def test_exact_vocab_size(size: int) -> None:
    t = build_tokenizer(size)
    assert t.vocab_size == size
    assert t.token_id("<|im_end|>") == size - 8 and t.token_id("<|fim_suffix|>") == size - 1
    assert t.decode(t.encode(SAMPLES[5])) == SAMPLES[5]


def test_small_corpus_is_padded_to_size() -> None:
    t = build_tokenizer(2000, texts=["a tiny corpus", "with few merges"])
    assert t.vocab_size == 2000
    assert [t.token_id(x) for x in CHAT_TOKENS] == list(range(1992, 2000))
    assert t.token_id("<|reserved_0|>") is not None
    for text in SAMPLES:
        assert t.decode(t.encode(text)) == text


def test_too_small_vocab_raises() -> None:
    with pytest.raises(ValueError, match="too small"):
        build_tokenizer(MIN_VOCAB_SIZE - 1)


def test_build_is_deterministic(tok: Tokenizer) -> None:
    # a fresh process (other hash seed, no cached corpus, nothing else imported) builds the same tokenizer
    code = (
        "import sys; from cpm4.model.tokenizer import build_tokenizer; "
        f"sys.stdout.write(build_tokenizer({V}).hf.backend_tokenizer.to_str())"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": path}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout == tok.hf.backend_tokenizer.to_str()


def test_save_and_reload(tok: Tokenizer, tmp_path) -> None:
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["unk_token"]) == ("<s>", "</s>", "<unk>")
    assert config["chat_template"] == CHATML_TEMPLATE
    assert isinstance(config["model_max_length"], int)

    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.vocab_size == V
    assert loaded.stop_token_ids == tok.stop_token_ids
    for text in SAMPLES:
        assert loaded.encode(text) == tok.encode(text)
        # the HF object itself also prepends BOS (post-processor / add_bos_token), like released checkpoints
        assert loaded.hf.encode(text) == tok.encode(text)
    assert loaded.render_chat(CONVO, tools=[WEATHER_TOOL]) == tok.render_chat(CONVO, tools=[WEATHER_TOOL])
    assert loaded.encode_chat(CONVO) == tok.encode_chat(CONVO)


def test_fallback_when_autotokenizer_fails(tok: Tokenizer, tmp_path, monkeypatch) -> None:
    import transformers

    tok.save(tmp_path)

    def broken(*args, **kwargs):
        raise ValueError("unknown tokenizer class")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.encode(SAMPLES[4]) == tok.encode(SAMPLES[4])
    assert loaded.render_chat(CONVO) == tok.render_chat(CONVO)
    assert loaded.stop_token_ids == tok.stop_token_ids


def test_from_dir_without_tokenizer_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer.json") as err:
        Tokenizer.from_dir(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError):
        Tokenizer.from_dir(tmp_path / "missing")


def test_chat_rendering_matches_chatml(tok: Tokenizer) -> None:
    assert tok.render_chat(CONVO, add_generation_prompt=False) == CONVO_TEXT
    assert tok.render_chat(CONVO) == CONVO_TEXT + "<|im_start|>assistant\n"
    no_system = tok.render_chat(CONVO[1:2])
    assert no_system == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"


def test_template_independent_of_jinja_whitespace_settings() -> None:
    import jinja2

    for env in (jinja2.Environment(), jinja2.Environment(trim_blocks=True, lstrip_blocks=True)):
        out = env.from_string(CHATML_TEMPLATE).render(messages=CONVO, add_generation_prompt=True)
        assert out == CONVO_TEXT + "<|im_start|>assistant\n"


def test_encode_chat_single_bos_and_special_ids(tok: Tokenizer) -> None:
    ids = tok.encode_chat(CONVO)
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    im_start = tok.token_id("<|im_start|>")
    assert ids[1] == im_start and ids.count(im_start) == 5
    assert ids.count(tok.token_id("<|im_end|>")) == 4
    assert tok.decode(ids, skip_special_tokens=False) == "<s>" + tok.render_chat(CONVO)

    # a template that writes the BOS itself must not get a second one
    original = tok.hf.chat_template
    try:
        tok.hf.chat_template = "{{ bos_token }}" + CHATML_TEMPLATE
        assert tok.render_chat(CONVO).startswith("<s><|im_start|>")
        assert tok.encode_chat(CONVO) == ids
    finally:
        tok.hf.chat_template = original


def test_tools_rendering(tok: Tokenizer) -> None:
    messages = [
        *CONVO[:2],
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}},
            ],
        },
        {"role": "tool", "content": '{"temp_c": 21}'},
    ]
    text = tok.render_chat(messages, tools=[WEATHER_TOOL])
    assert text.startswith("<|im_start|>system\nYou are terse.\n\n# Tools\n")
    assert json.dumps(WEATHER_TOOL, ensure_ascii=False) in text
    assert text.count("<|im_start|>system\n") == 1
    assert (
        "<|im_start|>assistant\n"
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '<|tool_call|>{"name": "get_weather", "arguments": {"city": "Rome"}}<|im_end|>\n'
        '<|im_start|>tool\n{"temp_c": 21}<|im_end|>\n'
        "<|im_start|>assistant\n"
    ) in text
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok.encode_chat(messages, tools=[WEATHER_TOOL])
    assert ids.count(tok.token_id("<|tool_call|>")) == 3  # 2 calls + the syntax line in the system turn

    # without a system message the tools still get a system turn of their own
    only_user = tok.render_chat(CONVO[1:2], tools=[WEATHER_TOOL])
    assert only_user.startswith("<|im_start|>system\n# Tools\n")
    # an assistant turn with content and calls puts each call on its own line after the content
    mixed = tok.render_chat(
        [{"role": "assistant", "content": "Checking.", "tool_calls": [{"name": "f", "arguments": {}}]}],
        add_generation_prompt=False,
    )
    call = '<|tool_call|>{"name": "f", "arguments": {}}'
    assert mixed == f"<|im_start|>assistant\nChecking.\n{call}<|im_end|>\n"


def test_enable_thinking(tok: Tokenizer) -> None:
    off = tok.render_chat(CONVO, enable_thinking=False)
    assert off == CONVO_TEXT + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.render_chat(CONVO, enable_thinking=True) == CONVO_TEXT + "<|im_start|>assistant\n"
    assert tok.render_chat(CONVO, add_generation_prompt=False, enable_thinking=False) == CONVO_TEXT


def test_chat_errors(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="role"):
        tok.render_chat([{"content": "hi"}])
    with pytest.raises(ValueError, match="content"):
        tok.render_chat([{"role": "user", "content": 5}])
    # a null or missing content renders as "" (vLLM's, and the server's); text parts joined with newlines
    assert tok.render_chat([{"role": "user"}]) == tok.render_chat([{"role": "user", "content": None}]) \
        == tok.render_chat([{"role": "user", "content": ""}])
    assert tok.render_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]) \
        == tok.render_chat([{"role": "user", "content": "a\nb"}])
    with pytest.raises(ValueError, match="message 0: content part 1 of type 'image_url' is not supported"):
        tok.render_chat([{"role": "user", "content": ["a", {"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(ValueError, match=r"message 1.tool_calls\[0\].function.arguments must be a JSON object"):
        tok.render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}])
    with pytest.raises(ValueError):
        tok.encode_chat([])
    original = tok.hf.chat_template
    try:
        tok.hf.chat_template = None
        with pytest.raises(ValueError, match="chat_template"):
            tok.render_chat(CONVO)
        with pytest.raises(ValueError, match="chat_template"):
            tok.encode_chat(CONVO)
    finally:
        tok.hf.chat_template = original


def test_missing_chat_template_after_reload(tok: Tokenizer, tmp_path) -> None:
    # a bare tokenizer.json (no config) loads, but has no chat template
    (tmp_path / "tokenizer.json").write_text(tok.hf.backend_tokenizer.to_str(), encoding="utf-8")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.decode(loaded.encode(SAMPLES[3])) == SAMPLES[3]
    with pytest.raises(ValueError, match="chat_template"):
        loaded.render_chat(CONVO)


def _stream(tok: Tokenizer, ids: list[int], **kwargs) -> tuple[list[str], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.add(i) for i in ids]
    return deltas, detok.flush(), detok


def test_incremental_detokenizer_split_characters(tok: Tokenizer) -> None:
    text = "a🦜b𠀀c 中文 naïve ✓ 👩‍👩‍👧!"
    ids = tok.encode(text, add_bos=False)
    # the case is only meaningful if byte-level tokens really split characters
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    deltas, rest, detok = _stream(tok, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert rest == ""
    assert "".join(deltas) == tok.decode(ids) == text == detok.text
    # held back while partial: the 4 byte tokens of the parrot give '', '', '', '🦜'
    parrot = tok.encode("🦜", add_bos=False)
    assert len(parrot) == 4
    assert _stream(tok, parrot)[0] == ["", "", "", "🦜"]


def test_incremental_detokenizer_prompt_and_specials(tok: Tokenizer) -> None:
    prompt = tok.encode_chat(CONVO)
    gen = tok.encode("Four — 四 🦜.", add_bos=False) + [tok.token_id("<|im_end|>")]
    deltas, rest, detok = _stream(tok, gen, prompt_ids=prompt)
    assert "".join(deltas) + rest == tok.decode(gen) == "Four — 四 🦜."
    assert all("\ufffd" not in d for d in deltas)
    deltas, rest, detok = _stream(tok, gen, prompt_ids=prompt, skip_special_tokens=False)
    assert "".join(deltas) + rest == tok.decode(gen, skip_special_tokens=False) == detok.text
    assert detok.text.endswith("<|im_end|>")


def test_incremental_detokenizer_flush_partial(tok: Tokenizer) -> None:
    ids = tok.encode("x🦜", add_bos=False)[:-1]  # stop mid-character
    deltas, rest, detok = _stream(tok, ids)
    assert deltas == ["x", "", "", ""]
    assert rest == "\ufffd"
    assert "".join(deltas) + rest == tok.decode(ids)


def test_incremental_detokenizer_long_stream(tok: Tokenizer) -> None:
    text = "".join(SAMPLES) * 40  # long enough to trim the consumed ids
    ids = tok.encode(text, add_bos=False)
    assert len(ids) > 2 * IncrementalDetokenizer._TRIM_AT
    deltas, rest, detok = _stream(tok, ids)
    assert "".join(deltas) + rest == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(detok._ids) < IncrementalDetokenizer._TRIM_AT + 64


def test_incremental_detokenizer_prompt_ends_mid_character(tok: Tokenizer) -> None:
    parrot = tok.encode("🦜", add_bos=False)
    prompt, gen = tok.encode("x", add_bos=False) + parrot[:2], parrot[2:] + tok.encode("y", add_bos=False)
    deltas, rest, _ = _stream(tok, gen, prompt_ids=prompt)
    # the generated ids alone hold two stray continuation bytes; the stream agrees with decode() on that
    assert "".join(deltas) + rest == tok.decode(gen) == "\ufffd\ufffdy"


def test_light_tokenizer_equals_transformers(tmp_path):
    # Our own tokenizer folders load without transformers; everything must match the transformers path.
    import sys

    from cpm4.model.light_tokenizer import JsonTokenizer

    tok = build_tokenizer(600)
    tok.save(tmp_path / "t")
    light = Tokenizer.from_dir(tmp_path / "t")
    assert isinstance(light.hf, JsonTokenizer)
    ref = Tokenizer(Tokenizer._load_tokenizer_json(tmp_path / "t"))
    texts = ["Hello, world!", "  spaces\tand\nnewlines ", "ünïcödé 漢字 🙂", "<|im_start|>user\nhi<|im_end|>", ""]
    for t in texts:
        assert light.encode(t) == ref.encode(t) and light.encode(t, add_bos=False) == ref.encode(t, add_bos=False)
        ids = ref.encode(t)
        for skip in (True, False):
            assert light.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (light.bos_token_id, light.eos_token_id, light.vocab_size, light.stop_token_ids) == \
        (ref.bos_token_id, ref.eos_token_id, ref.vocab_size, ref.stop_token_ids)
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather <now> & 'then'",
                                                "parameters": {"type": "object", "properties": {}}}}]
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}],
        [{"role": "user", "content": "weather?"},
         {"role": "assistant", "content": None, "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}]},
         {"role": "tool", "content": "sunny"}],
    ]
    for msgs in chats:
        for gen in (True, False):
            for kw in ({}, {"enable_thinking": False}):
                for t in (None, tools):
                    assert light.render_chat(msgs, add_generation_prompt=gen, tools=t, **kw) == \
                        ref.render_chat(msgs, add_generation_prompt=gen, tools=t, **kw)
    # An assistant prefill written on (vLLM's continue_final_message), trailing spaces and newlines included.
    for last in ("The answer is", "The answer is ", "  Sure:\n", "4"):
        msgs = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": last}]
        got = light.render_chat(msgs, add_generation_prompt=False, continue_final_message=True)
        assert got == ref.render_chat(msgs, add_generation_prompt=False, continue_final_message=True), last
        assert got.rstrip().endswith(last.strip()) and not got.endswith("<|im_end|>\n")
    for t in (light, ref):
        with pytest.raises(ValueError):
            t.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True, continue_final_message=True)
    blank = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]  # cut where transformers cuts
    assert light.render_chat(blank, add_generation_prompt=False, continue_final_message=True) == \
        ref.render_chat(blank, add_generation_prompt=False, continue_final_message=True)
    assert light.hf.convert_ids_to_tokens([3, 4]) == ref.hf.convert_ids_to_tokens([3, 4])
    light.save(tmp_path / "a")
    ref.save(tmp_path / "b")
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    # A fresh interpreter loads and uses it without importing transformers.
    code = ("import sys; from cpm4.model.tokenizer import Tokenizer; "
            f"t = Tokenizer.from_dir({str(tmp_path / 't')!r}); t.render_chat([{{'role': 'user', 'content': 'x'}}]); "
            "print('transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("which", ["synthetic", "demo"])
def test_decode_equals_transformers_decode(which):
    """`decode` calls the fast backend directly (the engine detokenizes every row every step): the same text
    as transformers' decode without clean-up, special tokens skipped or kept, on random ids."""
    from pathlib import Path

    from cpm4.model.tokenizer import Tokenizer, build_tokenizer

    tk = build_tokenizer(1024) if which == "synthetic" else \
        Tokenizer.from_dir(Path(__file__).resolve().parents[1] / "models" / "cpm4-demo")
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        ids = torch.randint(0, tk.vocab_size, (int(torch.randint(1, 30, (1,), generator=g)),), generator=g).tolist()
        for skip in (True, False):
            assert tk.decode(ids, skip_special_tokens=skip) == \
                tk._hf.decode(ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False)


def test_incremental_detokenizer_extend_equals_add():
    """`extend` (windows decoded in batches) gives what `add` gives id by id, whatever the split, with random
    ids (partial characters, ids past the vocabulary, special tokens) and real text."""
    import random

    from cpm4.model.tokenizer import IncrementalDetokenizer

    tok = build_tokenizer(1024)
    rnd = random.Random(0)
    real = tok.encode("Héllo wörld — ünïcode 日本語 text, and plain words too. " * 3)
    for trial in range(120):
        prompt = [rnd.randint(0, 1023) for _ in range(rnd.randint(0, 8))]
        hi = rnd.choice([300, 1024, 2000])
        gen = real[:] if trial % 10 == 0 else [rnd.randint(0, hi - 1) for _ in range(rnd.randint(0, 80))]
        a = IncrementalDetokenizer(tok, prompt)
        pieces = [a.add(t) for t in gen] + [a.flush()]
        b = IncrementalDetokenizer(tok, prompt)
        k = rnd.randint(0, len(gen))
        got = "".join(b.add(t) for t in gen[:k]) + b.extend(gen[k:]) + b.flush()
        assert got == "".join(pieces) and b.text == a.text, trial
    assert tok.decode_batch([[5, 6], [], real]) == [tok.decode([5, 6]), "", tok.decode(real)]


def test_set_chat_template_file_text_and_errors(tmp_path) -> None:
    """vLLM's --chat-template: a Jinja file or the template text replaces the checkpoint's; a missing file
    or a template that does not render is refused and the old template stays."""
    tok = build_tokenizer(V)  # its own copy: the module fixture keeps ChatML
    plain = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    f = tmp_path / "t.jinja"
    f.write_text(plain, encoding="utf-8")
    tok.set_chat_template(f)
    assert tok.render_chat(CONVO[:2]) == "[system] You are terse.\n[user] Hi there\n"
    tok.set_chat_template("{{ messages[0]['content'] | upper }}")
    assert tok.render_chat(CONVO[:2]) == "YOU ARE TERSE."
    with pytest.raises(ValueError, match="no such file"):
        tok.set_chat_template(tmp_path / "missing.jinja")
    with pytest.raises(ValueError, match="does not render"):
        tok.set_chat_template("{% if %}")
    assert tok.render_chat(CONVO[:2]) == "YOU ARE TERSE."  # unchanged by the failures
