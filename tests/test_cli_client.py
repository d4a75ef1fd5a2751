"""`cpm4 chat --url` and `cpm4 generate --url` (vLLM's chat / complete commands): the commands against a running
server, their replies those the server gives the same request; errors said in one line."""

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import test_serve  # noqa: E402
from test_serve import _Server  # noqa: E402

from cpm4.cli import main  # noqa: E402
from cpm4.serve import AsyncEngine, create_app  # noqa: E402

llm = test_serve.llm  # the tiny model on the CPU (module-scoped fixture)
OPTS = ["--temperature", "0", "--max-tokens", "6", "--ignore-eos"]


@pytest.fixture(scope="module")
def server(llm):
    eng = AsyncEngine(llm.model, llm.tokenizer, max_batch_size=4)
    srv = _Server(create_app(eng, ["tiny", "other"], api_key="k"))
    yield srv
    srv.stop()
    eng.shutdown()


def _direct(srv, kind: str, **kw) -> str:
    c = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="k", max_retries=0)
    common = dict(model="tiny", max_tokens=6, temperature=0, extra_body={"ignore_eos": True})
    if kind == "chat":
        return c.chat.completions.create(messages=kw["messages"], **common).choices[0].message.content
    return c.completions.create(prompt=kw["prompt"], **common).choices[0].text


def test_chat_quick_and_interactive(server, capsys, monkeypatch):
    url = f"{server.url}/v1"
    assert main(["chat", "--url", url, "--api-key", "k", "-q", "Hello there", *OPTS]) == 0
    want = _direct(server, "chat", messages=[{"role": "user", "content": "Hello there"}])
    assert capsys.readouterr().out == want + "\n"
    # Interactive: the second turn carries the first; /reset forgets it.
    lines = iter(["Hi", "And then?", "/reset", "And then?", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "--url", server.url, "--api-key", "k", "--system", "Be brief.", *OPTS]) == 0
    out = capsys.readouterr().out.splitlines()
    sys_msg = {"role": "system", "content": "Be brief."}
    first = _direct(server, "chat", messages=[sys_msg, {"role": "user", "content": "Hi"}])
    second = _direct(server, "chat", messages=[sys_msg, {"role": "user", "content": "Hi"},
                                               {"role": "assistant", "content": first},
                                               {"role": "user", "content": "And then?"}])
    fresh = _direct(server, "chat", messages=[sys_msg, {"role": "user", "content": "And then?"}])
    assert out == [first, second, fresh]


def test_generate_url(server, capsys):
    assert main(["generate", "--url", server.url, "--api-key", "k", "--model-name", "tiny", *OPTS,
                 "The sky", "Once"]) == 0
    out = capsys.readouterr().out
    assert out == "".join(f"--- [{i}]\n{_direct(server, 'complete', prompt=p)}\n" for i, p in
                          enumerate(["The sky", "Once"]))


def test_url_errors(server, capsys):
    assert main(["chat", "--url", "http://127.0.0.1:9", "-q", "Hi"]) == 2
    assert "cannot reach a server at http://127.0.0.1:9/v1" in capsys.readouterr().err
    assert main(["chat", "--url", server.url, "--api-key", "k", "--model-name", "nope", "-q", "Hi"]) == 2
    assert "serves tiny, other, not nope" in capsys.readouterr().err
    assert main(["chat", "--url", server.url, "--api-key", "wrong", "-q", "Hi"]) == 2
    assert "answered 401" in capsys.readouterr().err
    # A refused request (max_tokens beyond the context) is said in one line.
    assert main(["chat", "--url", server.url, "--api-key", "k", "-q", "Hi", "--max-tokens", "100000"]) == 2
    assert "cpm4: error:" in capsys.readouterr().err
