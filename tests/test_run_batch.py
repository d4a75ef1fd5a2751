"""`cpm4 run-batch` (cpm4/serve/batch.py): OpenAI Batch API JSONL files answered offline through the server's app."""

from __future__ import annotations

import asyncio
import json
import weakref

import pytest

from cpm4.cli import main
from cpm4.serve.batch import read_batch, run_batch

pytest.importorskip("fastapi")
pytest.importorskip("httpx")


def _line(cid: str, url: str, body: dict, method: str = "POST") -> str:
    return json.dumps({"custom_id": cid, "method": method, "url": url, "body": body})


def _write(path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _outputs(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


PROMPTS = ["Hello there", "The cat", "One two three", "A", "Numbers: 1 2", "x y z w", "Hi", "The end"]


@pytest.fixture(scope="module")
def app(tiny_checkpoint):
    from cpm4.serve import load_app

    app, engine = load_app(tiny_checkpoint, device="cpu", max_batch_size=3, log_stats_interval=0,
                           model_name=["tiny", str(tiny_checkpoint)], engine_process=False)
    yield app
    engine.shutdown()


def test_answers_equal_generation_alone_in_input_order(app, tiny_checkpoint, tmp_path):
    """Completions and chat lines, more than the engine batches and than may be in flight: every answer is the
    greedy generation of that prompt alone (the `LLM` API: the reference), the lines keep the input's order and
    custom_ids, and usage counts are the tokens'."""
    from cpm4.engine.params import SamplingParams
    from cpm4.llm import LLM

    lines, expect = [], []
    llm = LLM(tiny_checkpoint, device="cpu")
    for i, p in enumerate(PROMPTS):
        n = 3 + i % 5
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        if i % 2:
            lines.append(_line(f"req-{i}", "/v1/completions",
                               {"model": "tiny", "prompt": p, "max_tokens": n, "temperature": 0, "ignore_eos": True}))
            out = llm.generate([p], params)[0].outputs[0]
        else:
            msgs = [{"role": "user", "content": p}]
            lines.append(_line(f"req-{i}", "/v1/chat/completions",
                               {"model": "tiny", "messages": msgs, "max_tokens": n, "temperature": 0,
                                "ignore_eos": True}))
            out = llm.chat(msgs, params)[0].outputs[0]
        expect.append((out.text, len(out.token_ids)))
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, lines)
    counts = asyncio.run(run_batch(app, read_batch(src), dst, max_concurrency=5, progress=False))
    assert counts == {"total": len(PROMPTS), "completed": len(PROMPTS), "failed": 0}
    outs = _outputs(dst)
    assert [o["custom_id"] for o in outs] == [f"req-{i}" for i in range(len(PROMPTS))]
    assert len({o["id"] for o in outs}) == len(outs)
    for i, (o, (text, n)) in enumerate(zip(outs, expect)):
        assert o["error"] is None and o["response"]["status_code"] == 200
        body = o["response"]["body"]
        assert body["model"] == "tiny"
        choice = body["choices"][0]
        got = choice["text"] if i % 2 else choice["message"]["content"]
        assert got == text and body["usage"]["completion_tokens"] == n and choice["finish_reason"] == "length"


def test_a_refused_line_is_its_own_error_and_the_rest_go_on(app, tmp_path):
    """Per line, as the server answers the same request: an unknown model is 404 model_not_found, a bad field a 400
    naming it; an endpoint run-batch does not serve and a stream are refused by name; the good lines answer."""
    good = {"prompt": "Hi", "max_tokens": 2, "temperature": 0}
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [
        _line("ok1", "/v1/completions", good),
        _line("model", "/v1/completions", {**good, "model": "nope"}),
        _line("field", "/v1/completions", {**good, "max_tokens": -3}),
        _line("url", "/v1/embeddings", {"input": "x"}),
        _line("stream", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
        "",
        _line("ok2", "/v1/responses", {"input": "Hi", "max_output_tokens": 2, "temperature": 0}),
    ])
    counts = asyncio.run(run_batch(app, read_batch(src), dst, progress=False))
    assert counts == {"total": 6, "completed": 2, "failed": 4}
    outs = {o["custom_id"]: o for o in _outputs(dst)}
    assert list(outs) == ["ok1", "model", "field", "url", "stream", "ok2"]
    assert outs["ok1"]["response"]["body"]["object"] == "text_completion"
    assert outs["ok2"]["response"]["body"]["object"] == "response"
    st = {k: (o["response"]["status_code"], o["response"]["body"], o["error"]) for k, o in outs.items()}
    assert st["model"][0] == 404 and st["model"][1] is None and st["model"][2]["code"] == "model_not_found"
    assert st["field"][0] == 400 and st["field"][2]["param"] == "max_tokens"
    assert st["url"][0] == 400 and "/v1/embeddings" in st["url"][2]["message"] and "line 4" in st["url"][2]["message"]
    assert st["stream"][0] == 400 and st["stream"][2]["param"] == "stream"


@pytest.mark.parametrize("text,match", [
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\nnot json\n', r"in.jsonl:2: not JSON"),
    ('[1, 2]\n', r":1: expected a JSON object, got list"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n'
     '{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}}\n',
     r":2: custom_id 'a' repeats line 1"),
    ('{"custom_id": "a", "method": "GET", "url": "/v1/completions", "body": {}}\n', r":1: method must be \"POST\""),
    ('{"method": "POST", "url": "/v1/completions", "body": {}}\n', r":1: custom_id must be a non-empty string"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": "x"}\n',
     r":1: body must be a JSON object"),
    ('{"custom_id": "a", "method": "POST", "url": 3, "body": {}}\n', r":1: url must be a string"),
    ('{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {}, "extra": 1}\n',
     r":1: unknown field\(s\) extra"),
])
def test_malformed_files_are_refused_naming_the_line(tmp_path, text, match):
    src = tmp_path / "in.jsonl"
    src.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        read_batch(src)


def test_malformed_file_refused_before_the_model_loads(tmp_path, capsys):
    """The CLI checks the file first: a bad line is the error (exit 2) even where the model does not exist, and
    no output file appears; a missing input file is named."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    src.write_text('{"custom_id": "a"\n', encoding="utf-8")
    assert main(["run-batch", "-i", str(src), "-o", str(dst), "--model", str(tmp_path / "no-model")]) == 2
    assert "in.jsonl:1: not JSON" in capsys.readouterr().err and not dst.exists()
    assert main(["run-batch", "-i", str(tmp_path / "none.jsonl"), "-o", str(dst), "--device", "cpu"]) == 2
    assert "no batch input file" in capsys.readouterr().err
    src.write_text(b"\xff\xfe".decode("latin-1"), encoding="latin-1")
    assert main(["run-batch", "-i", str(src), "-o", str(dst), "--device", "cpu"]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    # vLLM's run-batch takes URLs; here one was a path ("https:/host/out.jsonl", a folder made for it)
    assert main(["run-batch", "-i", "https://host/in.jsonl", "-o", str(dst), "--device", "cpu"]) == 2
    assert "URLs are not supported" in capsys.readouterr().err
    assert main(["run-batch", "-i", str(src), "-o", "https://host/out.jsonl", "--device", "cpu"]) == 2
    assert "-o https://host/out.jsonl: URLs are not supported" in capsys.readouterr().err


def test_interrupted_run_leaves_the_old_output_whole(app, tmp_path, monkeypatch):
    """A run that stops part-way (here an error outside any one line) leaves whatever was at the output path as it
    was and no temporary file beside it."""
    import cpm4.serve.batch as batch

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [_line(f"r{i}", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}) for i in range(6)])
    dst.write_text("previous results\n")
    answer = batch._answer

    async def failing(client, req):
        if req.custom_id == "r3":
            raise KeyboardInterrupt
        return await answer(client, req)

    monkeypatch.setattr(batch, "_answer", failing)
    with pytest.raises(KeyboardInterrupt):
        asyncio.run(run_batch(app, read_batch(src), dst, max_concurrency=2, progress=False))
    assert dst.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def test_cli_end_to_end(tiny_checkpoint, tmp_path, capsys):
    """`cpm4 run-batch` loads the model, answers, and writes the file; bodies may name the model by its folder name
    or as given on the command line, and answers carry the latter (vLLM's)."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "sub" / "out.jsonl"
    _write(src, [_line("a", "/v1/completions", {"model": tiny_checkpoint.name, "prompt": "Hi", "max_tokens": 3}),
                 _line("b", "/v1/chat/completions", {"model": str(tiny_checkpoint), "max_tokens": 2,
                                                     "messages": [{"role": "user", "content": "Hi"}]})])
    rc = main(["run-batch", "-i", str(src), "-o", str(dst), "--model", str(tiny_checkpoint), "--device", "cpu",
               "--no-progress", "--max-num-seqs", "2", "--engine-process"])  # the engine CUDA gets by default
    assert rc == 0
    err = capsys.readouterr().err
    assert "2 requests: 2 answered, 0 failed" in err
    outs = _outputs(dst)
    assert [o["custom_id"] for o in outs] == ["a", "b"]
    assert all(o["response"]["status_code"] == 200 and o["response"]["body"]["model"] == str(tiny_checkpoint)
               for o in outs)
    assert main(["run-batch", "-i", str(src), "-o", str(tmp_path), "--model", str(tiny_checkpoint)]) == 2
    assert "is a directory" in capsys.readouterr().err


@pytest.mark.gpu
def test_run_batch_on_cuda_equals_llm(tiny_checkpoint, tmp_path, capsys):
    """On CUDA (engine in a child process, CUDA graphs): greedy answers equal `LLM.generate`'s on the same GPU."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from cpm4.engine.params import SamplingParams
    from cpm4.llm import LLM

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [_line(f"r{i}", "/v1/completions", {"prompt": p, "max_tokens": 6, "temperature": 0,
                                                     "ignore_eos": True}) for i, p in enumerate(PROMPTS)])
    import gc

    # Small fixed caches: the default takes 90% of the GPU (a later test's engine would find none left).
    assert main(["run-batch", "-i", str(src), "-o", str(dst), "--model", str(tiny_checkpoint), "--device", "cuda",
                 "--dtype", "float32", "--no-progress", "--kv-cache-tokens", "4096"]) == 0
    llm = LLM(tiny_checkpoint, device="cuda", dtype="float32", kv_cache_tokens=4096)
    want = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    got = [o["response"]["body"]["choices"][0]["text"] for o in _outputs(dst)]
    assert got == [w.text for w in want]


def _track(held: dict, line: int, obj) -> None:
    """Count `line` held while any object of its (its request, its answer) is live: what the run holds in memory,
    not what it says it holds."""
    objs = held["objs"]
    objs[line] = objs.get(line, 0) + 1
    held["max"] = max(held["max"], len(objs))

    def freed() -> None:
        objs[line] -= 1
        if not objs[line]:
            del objs[line]

    weakref.finalize(obj, freed)


def test_memory_stays_bounded_and_order_kept_when_later_lines_finish_first(tmp_path, monkeypatch):
    """A file many times the window: checking it holds no request, and the run holds at most `max_buffered`
    requests and answers at once (every one read, in flight, or answered but waiting for an earlier one) with at
    most `max_concurrency` in flight; lines answered out of order are written in the input's."""
    import cpm4.serve.batch as batch

    n, concurrency, window = 300, 3, 8
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [_line(f"r{i}", "/v1/completions", {"prompt": "x" * 100, "i": i}) for i in range(n)])
    held = {"objs": {}, "max": 0}
    flight = {"now": 0, "max": 0}
    finished: list[int] = []

    class Request(batch.BatchRequest):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            _track(held, self.line, self)

    class Output(dict):  # a dict cannot be weakly referenced, a subclass can
        pass

    async def answer(client, req):
        flight["now"] += 1
        flight["max"] = max(flight["max"], flight["now"])
        i = req.body["i"]
        await asyncio.sleep(0.005 if i % 4 == 0 else 0)  # every fourth line is slow: those after it finish first
        flight["now"] -= 1
        finished.append(i)
        out = Output(batch._output(req.custom_id, 200, {"i": i}, None))
        _track(held, req.line, out)
        return out

    monkeypatch.setattr(batch, "BatchRequest", Request)
    monkeypatch.setattr(batch, "_answer", answer)
    requests = read_batch(src)
    assert len(requests) == n and held == {"objs": {}, "max": 1}  # checked one line at a time, none kept
    counts = asyncio.run(run_batch(None, requests, dst, max_concurrency=concurrency, max_buffered=window,
                                   progress=False))
    assert counts == {"total": n, "completed": n, "failed": 0}
    assert finished != sorted(finished)
    assert [o["response"]["body"]["i"] for o in _outputs(dst)] == list(range(n))
    assert flight["max"] == concurrency
    # The window, plus the one request just read that waits for room in it.
    assert window <= held["max"] <= window + 1, held


def test_a_file_changed_after_its_check_is_refused(tmp_path):
    """The check ran before the model loaded; a file rewritten since (a repeated custom_id now) is not run unchecked."""
    src = tmp_path / "in.jsonl"
    _write(src, [_line("a", "/v1/completions", {"prompt": "Hi"})])
    requests = read_batch(src)
    assert [r.custom_id for r in requests] == [r.custom_id for r in requests] == ["a"]  # read afresh each time
    _write(src, [_line("a", "/v1/completions", {"prompt": "Hi"})] * 2)
    with pytest.raises(ValueError, match="changed since it was checked"):
        list(requests)


def _cut_while_running(monkeypatch, src, keep: int, at: int) -> None:
    """Answer every line at once, and when line `at` is answered cut the input in place to its first `keep` lines
    (past what has been read: the rest of the file just ends)."""
    import os

    import cpm4.serve.batch as batch

    size = sum(len(x) for x in src.read_bytes().splitlines(keepends=True)[:keep])

    async def answer(client, req):
        await asyncio.sleep(0)
        if req.line == at:
            os.truncate(src, size)
        return batch._output(req.custom_id, 200, {"line": req.line}, None)

    monkeypatch.setattr(batch, "_answer", answer)


def test_a_file_cut_or_grown_while_it_runs_leaves_no_output(tmp_path, monkeypatch):
    """The input is read again as the requests run: cut in place meanwhile, the run ended where the file did and
    wrote a whole, short output (200 of 300 lines) as a success; now it fails with no output, the old one kept. A
    line added meanwhile (a repeated custom_id) is not run. The output may be the input itself: it replaces it only
    once every line is read and answered."""
    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [_line(f"r{i}", "/v1/completions", {"prompt": "Hi"}) for i in range(300)])
    requests = read_batch(src)
    dst.write_text("previous results\n")
    _cut_while_running(monkeypatch, src, keep=200, at=50)
    with pytest.raises(ValueError, match="changed while it was run"):
        asyncio.run(run_batch(None, requests, dst, max_concurrency=2, max_buffered=4, progress=False))
    assert dst.read_text() == "previous results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]

    _write(src, [_line(f"r{i}", "/v1/completions", {"prompt": "Hi"}) for i in range(20)])
    requests = read_batch(src)

    async def grow(client, req):
        if req.line == 1:
            with open(src, "a", encoding="utf-8") as f:
                f.write(_line("r0", "/v1/completions", {"prompt": "Hi"}) + "\n")
        return {"id": "x", "custom_id": req.custom_id, "error": None}

    import cpm4.serve.batch as batch

    monkeypatch.setattr(batch, "_answer", grow)
    with pytest.raises(ValueError, match="changed while it was run"):
        asyncio.run(run_batch(None, requests, dst, max_concurrency=1, max_buffered=2, progress=False))
    assert dst.read_text() == "previous results\n"

    monkeypatch.setattr(batch, "_answer", lambda client, req: asyncio.sleep(0, batch._output(
        req.custom_id, 200, {"line": req.line}, None)))
    _write(src, [_line(f"r{i}", "/v1/completions", {"prompt": "Hi"}) for i in range(50)])
    counts = asyncio.run(run_batch(None, read_batch(src), src, max_concurrency=2, max_buffered=3, progress=False))
    assert counts["total"] == 50
    assert [o["response"]["body"]["line"] for o in _outputs(src)] == list(range(1, 51))


def test_a_pipe_or_directory_is_refused_when_checked(tmp_path):
    """The input is read twice (checked before the model loads, then run): a pipe (`-i <(zcat ...)`) was checked,
    then, after the model loaded, refused as "changed since it was checked" (or the second open waited for a
    writer forever); it is refused at the check now, without being opened, and so is a directory."""
    import os
    import threading

    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)

    def feed() -> None:
        try:
            with open(fifo, "w", encoding="utf-8") as f:
                f.write(_line("a", "/v1/completions", {"prompt": "Hi"}) + "\n")
        except BrokenPipeError:
            pass

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        with pytest.raises(ValueError, match="must be a regular file"):
            read_batch(fifo)
    finally:
        fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # the writer's open returns: its thread ends
        writer.join(10)
        os.close(fd)
    with pytest.raises(ValueError, match="must be a regular file"):
        read_batch(tmp_path)


def test_concurrency_below_one_is_refused_and_a_small_window_bounds_the_flight(tmp_path, monkeypatch):
    """max_concurrency 0 failed with an IndexError, or, with a window given, let no request start (the run waited
    forever), and max_buffered 0 was taken as the default: both are refused. A window smaller than max_concurrency
    holds at most the window in flight, in order."""
    import cpm4.serve.batch as batch

    src, dst = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write(src, [_line(f"r{i}", "/v1/completions", {"prompt": "Hi"}) for i in range(20)])
    for kw in ({"max_concurrency": 0}, {"max_concurrency": 0, "max_buffered": 5}, {"max_buffered": 0},
               {"max_concurrency": -2}):
        with pytest.raises(ValueError, match="must be a positive int"):
            asyncio.run(asyncio.wait_for(run_batch(None, read_batch(src), dst, progress=False, **kw), 5))
    flight = {"now": 0, "max": 0}

    async def answer(client, req):
        flight["now"] += 1
        flight["max"] = max(flight["max"], flight["now"])
        await asyncio.sleep(0.001 * (req.line % 3))
        flight["now"] -= 1
        return batch._output(req.custom_id, 200, {"line": req.line}, None)

    monkeypatch.setattr(batch, "_answer", answer)
    asyncio.run(run_batch(None, read_batch(src), dst, max_concurrency=5, max_buffered=2, progress=False))
    assert flight["max"] == 2 and [o["custom_id"] for o in _outputs(dst)] == [f"r{i}" for i in range(20)]
