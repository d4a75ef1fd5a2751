"""vLLM's `tokenizer` option: a checkpoint folder without tokenizer files runs with another folder's tokenizer,
offline (`LLM(..., tokenizer=)`) and served (`load_app(tokenizer=)`, `--tokenizer`), in a thread or a child
process; without one, the missing tokenizer is said before the weights are read."""

import shutil

import pytest

from cpm4 import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


@pytest.fixture(scope="module")
def bare(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint's config and weights alone."""
    out = tmp_path_factory.mktemp("bare") / "weights-only"
    out.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name in ("config.json", "generation_config.json") or f.suffix == ".safetensors" or \
                f.name.endswith(".safetensors.index.json"):
            shutil.copy(f, out / f.name)
    return out


def test_llm_with_another_folders_tokenizer(bare, tiny_checkpoint, monkeypatch):
    want = LLM(tiny_checkpoint, device="cpu").generate(["Hello there"], GREEDY)[0]
    got = LLM(bare, device="cpu", tokenizer=tiny_checkpoint).generate(["Hello there"], GREEDY)[0]
    assert (got.token_ids, got.text) == (want.token_ids, want.text)

    def no_weights(*a, **k):
        raise AssertionError("the weights were read before the tokenizer was found")

    monkeypatch.setattr("cpm4.llm.load_checkpoint", no_weights)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        LLM(bare, device="cpu")


@pytest.mark.parametrize("process", [False, True])
def test_served_with_another_folders_tokenizer(bare, tiny_checkpoint, process):
    from fastapi.testclient import TestClient

    from cpm4.serve import load_app

    body = {"prompt": "Hello there", "max_tokens": 5, "temperature": 0, "ignore_eos": True}
    texts = []
    for model, tok in ((tiny_checkpoint, None), (bare, tiny_checkpoint)):
        app, engine = load_app(model, device="cpu", log_stats_interval=0, engine_process=process, tokenizer=tok,
                               max_batch_size=2, kv_cache_tokens=1024)
        try:
            with TestClient(app) as c:
                r = c.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                texts.append(r.json()["choices"][0]["text"])
                r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                         "max_tokens": 2})
                assert r.status_code == 200, r.text  # the chat template came with the tokenizer
        finally:
            engine.shutdown()
    assert texts[0] == texts[1]


def test_cli_takes_tokenizer():
    import argparse

    from cpm4.serve.cli import add_run_batch_command, add_serve_command, engine_options

    sub = argparse.ArgumentParser().add_subparsers()
    assert engine_options(add_serve_command(sub).parse_args(["--tokenizer", "x"]))["tokenizer"] == "x"
    assert engine_options(add_run_batch_command(sub).parse_args(["-i", "a", "-o", "b"]))["tokenizer"] is None
