"""End-to-end tests of the `cpm4` command line (init, generate, chat), run as real subprocesses.

One tiny checkpoint is written per session with `cpm4 init`. Every non-interactive command is started up
front on a small thread pool (each subprocess spends seconds importing torch, so running them side by side
keeps the file fast); each test then waits for, and checks, the result of its own command(s). The Ctrl-C
scenarios (Popen, SIGINT) run on the same pool.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from cpm4 import LLM, SamplingParams

N = 8  # tokens per reply: small, so every run is fast
PROMPT = "The capital of France is"
PROMPT2 = "Once upon a time"
GREEDY = ["--temperature", "0", "--max-tokens", str(N), "--ignore-eos"]
SEEDED = ["--temperature", "1.0", "--top-k", "50", "--top-p", "0.9", "--seed", "1234", "--max-tokens", str(N)]
ENV = {**os.environ, "PYTHONIOENCODING": "utf-8", "TRANSFORMERS_VERBOSITY": "error"}
CLI = [sys.executable, "-m", "cpm4.cli"]
TIMEOUT = 180


@dataclass
class Result:
    rc: int
    out: str
    err: str


def run_cli(*args: str | Path, stdin: str | None = None, exe: list[str] | None = None) -> Result:
    """Run the CLI to completion. Output is compared byte-exactly (no universal-newline translation)."""
    p = subprocess.run([*(exe or CLI), *map(str, args)], input=None if stdin is None else stdin.encode(),
                       stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True, env=ENV,
                       timeout=TIMEOUT)
    return Result(p.returncode, p.stdout.decode("utf-8"), p.stderr.decode("utf-8", "replace"))


def assert_usage_error(r: Result, *needles: str) -> None:
    assert r.rc == 2, r
    assert "cpm4: error:" in r.err, r.err
    assert "Traceback" not in r.err, r.err
    for n in needles:
        assert n in r.err, f"{n!r} not in stderr:\n{r.err}"


# ---------------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    r = run_cli("init", "--config", "tiny", "--out", out, "--seed", "0")
    assert r.rc == 0, r
    assert "Traceback" not in r.err
    return out


def _broken_copies(ckpt: Path, root: Path) -> dict[str, Path]:
    """Checkpoint folders with one defect each."""
    out = {}
    d = out["bad_json"] = root / "bad_json"
    shutil.copytree(ckpt, d)
    (d / "config.json").write_text('{"vocab_size": 1024, oops')

    d = out["missing_field"] = root / "missing_field"
    shutil.copytree(ckpt, d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["hidden_size"]
    (d / "config.json").write_text(json.dumps(cfg))

    from safetensors.torch import load_file, save_file

    d = out["missing_tensor"] = root / "missing_tensor"
    shutil.copytree(ckpt, d)
    state = load_file(str(d / "model.safetensors"))
    del state["model.layers.1.self_attn.k_proj.weight"]
    save_file(state, str(d / "model.safetensors"))

    d = out["not_empty"] = root / "not_empty"
    d.mkdir()
    (d / "junk.txt").write_text("old contents")
    return out


@pytest.fixture(scope="module")
def dirs(ckpt, tmp_path_factory) -> dict[str, Path]:
    return _broken_copies(ckpt, tmp_path_factory.mktemp("broken"))


@pytest.fixture(scope="module")
def jobs(ckpt, dirs, tmp_path_factory):
    """Start every CLI run at once (the Ctrl-C scenarios too); tests pick their results by name."""
    m = ["--model", ckpt, "--device", "cpu"]
    script = Path(sys.executable).with_name("cpm4")
    specs: dict[str, tuple[tuple, dict]] = {
        # init
        "reinit": (("init", "--config", "tiny", "--out", ckpt), {}),
        "overwrite": (("init", "--config", "tiny", "--out", dirs["not_empty"], "--overwrite", "--seed", "1"), {}),
        "unknown_preset": (("init", "--config", "huge", "--out", tmp_path_factory.mktemp("x") / "m"), {}),
        # generate
        "greedy_stream": (("generate", *m, *GREEDY, PROMPT), {}),
        "greedy_nostream": (("generate", *m, *GREEDY, "--no-stream", PROMPT), {}),
        "batch": (("generate", *m, *GREEDY, PROMPT, PROMPT2), {}),
        "seeded_stream": (("generate", *m, *SEEDED, PROMPT), {}),
        "seeded_nostream": (("generate", *m, *SEEDED, "--no-stream", PROMPT), {}),
        "stdin_script": (("generate", *m, *GREEDY), {"stdin": PROMPT2, "exe": [str(script)]}),
        # bad input
        "bad_path": (("generate", "--model", dirs["not_empty"].parent / "no-such-model", "hi"), {}),
        "bad_json": (("generate", "--model", dirs["bad_json"], "hi"), {}),
        "missing_field": (("generate", "--model", dirs["missing_field"], "hi"), {}),
        "missing_tensor": (("generate", "--model", dirs["missing_tensor"], "--device", "cpu", "hi"), {}),
        "too_long": (("generate", *m, "a " * 5000), {}),
        "bad_temperature": (("generate", *m, "--temperature", "-1", "hi"), {}),
        "bad_top_p": (("generate", *m, "--top-p", "0", "hi"), {}),
        "bad_presence": (("generate", *m, "--presence-penalty", "3", "hi"), {}),
        "bad_kv_cache": (("serve", *m, "--kv-cache-tokens", "0"), {}),
        "bad_port": (("serve", *m, "--port", "70000"), {}),
        "two_models": (("serve", "some/model", *m), {}),
        "bad_device": (("generate", *m, "--device", "tpu", "hi"), {}),
        "bad_chat_template": (("serve", *m, "--chat-template", "no-such-template.jinja"), {}),
        "bad_generation_config": (("serve", *m, "--generation-config", "no-such-dir"), {}),
        # the bundled demo model is the default, and --chat renders the prompt as a user turn
        "demo_chat": (("generate", "--device", "cpu", "--chat", *GREEDY, "--no-stream", "What does json do?"), {}),
        # chat (greedy, stdin fed at once)
        "chat_reset": (("chat", *m, "--temperature", "0", "--max-tokens", str(N)),
                       {"stdin": "hello\n/reset\nhi again\n/exit\n"}),
        "chat_multi": (("chat", *m, "--temperature", "0", "--max-tokens", str(N)),
                       {"stdin": "hello\nhow are you\n"}),  # ends with EOF, no /exit
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures: dict[str, Future] = {name: pool.submit(run_cli, *a, **kw) for name, (a, kw) in specs.items()}
        futures["chat_sigint_prompt"] = pool.submit(chat_ctrl_c_at_prompt, ckpt)
        futures["chat_sigint_reply"] = pool.submit(chat_ctrl_c_during_reply, ckpt)
        futures["generate_sigint"] = pool.submit(generate_ctrl_c_while_streaming, ckpt)
        yield futures
        for f in futures.values():
            f.cancel()


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt, device="cpu")


def greedy_params(**kw) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=N, **kw)


# ---------------------------------------------------------------------------------------------------------
# init


def test_init_writes_loadable_checkpoint(ckpt, llm):
    for f in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (ckpt / f).is_file(), f
    cfg = llm.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.max_position_embeddings) == (128, 4, 4096)
    assert llm.generate(PROMPT, greedy_params())[0].finish_reason in ("stop", "length")


def test_init_refuses_non_empty_folder(jobs, ckpt, llm):
    r = jobs["reinit"].result()
    assert_usage_error(r, str(ckpt), "not empty", "--overwrite")
    assert (ckpt / "model.safetensors").is_file()  # left as it was


def test_init_overwrite(jobs, dirs):
    r = jobs["overwrite"].result()
    assert r.rc == 0, r
    d = dirs["not_empty"]
    assert not (d / "junk.txt").exists()
    m = LLM(d, device="cpu")
    assert m.model.config.hidden_size == 128


def test_init_unknown_preset(jobs):
    assert_usage_error(jobs["unknown_preset"].result(), "huge", "tiny", "minicpm4-0.5b", "minicpm4-8b")


# ---------------------------------------------------------------------------------------------------------
# generate


def test_generate_greedy_matches_api_and_is_deterministic(jobs, llm):
    expected = llm.generate(PROMPT, greedy_params(ignore_eos=True))[0]
    stream, nostream = jobs["greedy_stream"].result(), jobs["greedy_nostream"].result()
    assert stream.rc == 0 and nostream.rc == 0, (stream, nostream)
    # stdout carries the text only (logs go to stderr), streaming or not
    assert stream.out == expected.text + "\n"
    assert nostream.out == stream.out
    assert "[cpm4] loaded" in stream.err and "[cpm4] loaded" not in stream.out


def test_generate_max_tokens_bounds_output(jobs, llm):
    # same settings as the CLI run above: exactly N tokens, cut by the limit
    expected = llm.generate(PROMPT, greedy_params(ignore_eos=True))[0]
    assert len(expected.token_ids) == N and expected.finish_reason == "length"
    assert jobs["greedy_stream"].result().out == expected.text + "\n"
    short = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0]
    assert len(short.token_ids) == 2 and short.finish_reason == "length"


def test_generate_batch_prints_both(jobs, llm):
    outs = llm.generate([PROMPT, PROMPT2], greedy_params(ignore_eos=True))
    r = jobs["batch"].result()
    assert r.rc == 0, r
    assert r.out == "".join(f"--- [{i}] ({o.finish_reason})\n{o.text}\n" for i, o in enumerate(outs))
    # each prompt of the batch gets what it gets alone
    assert outs[0].text == llm.generate(PROMPT, greedy_params(ignore_eos=True))[0].text


def test_generate_seeded_sampling_reproduces(jobs, llm):
    a, b = jobs["seeded_stream"].result(), jobs["seeded_nostream"].result()
    assert a.rc == 0 and b.rc == 0, (a, b)
    assert a.out == b.out
    expected = llm.generate(PROMPT, SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=1234,
                                                   max_tokens=N))[0]
    assert a.out == expected.text + "\n"


def test_generate_prompt_from_stdin_via_console_script(jobs, llm):
    r = jobs["stdin_script"].result()
    assert r.rc == 0, r
    assert r.out == llm.generate(PROMPT2, greedy_params(ignore_eos=True))[0].text + "\n"


# ---------------------------------------------------------------------------------------------------------
# bad input: exit code 2 and a message naming what is wrong


@pytest.mark.slow
def test_serve_rejects_bad_cache_size(jobs):
    r = jobs["bad_kv_cache"].result()  # argparse's own usage error: exit 2 before any model load
    assert r.rc == 2 and "--kv-cache-tokens" in r.err and "positive integer" in r.err and "Traceback" not in r.err


def test_serve_rejects_bad_port_and_unknown_device(jobs):
    r = jobs["bad_port"].result()  # uvicorn would serve 70000 on 70000 - 65536 = 4464
    assert r.rc == 2 and "--port" in r.err and "[0, 65535]" in r.err and "Traceback" not in r.err
    r = jobs["bad_device"].result()  # argparse's usage error, before torch is imported
    assert r.rc == 2 and "argument --device: unknown device 'tpu'" in r.err and "Traceback" not in r.err
    assert_usage_error(jobs["two_models"].result(), "two models given", "some/model")


def test_serve_rejects_missing_chat_template(jobs):
    assert_usage_error(jobs["bad_chat_template"].result(), "no-such-template.jinja", "no such file")


def test_serve_rejects_missing_generation_config(jobs):
    assert_usage_error(jobs["bad_generation_config"].result(), "no-such-dir", "generation config not found")


def test_default_model_is_the_bundled_demo_and_chat_flag(jobs):
    from cpm4.cli import DEFAULT_MODEL

    bundled = Path(__file__).resolve().parents[1] / "models" / "cpm4-demo"
    assert Path(DEFAULT_MODEL) == bundled
    r = jobs["demo_chat"].result()
    assert r.rc == 0, r
    assert "cpm4-demo" in r.err
    demo = LLM(bundled, device="cpu")
    prompt = demo.tokenizer.render_chat([{"role": "user", "content": "What does json do?"}])
    assert r.out == demo.generate(prompt, greedy_params(ignore_eos=True))[0].text + "\n"


def test_bad_model_path(jobs, dirs):
    assert_usage_error(jobs["bad_path"].result(), str(dirs["not_empty"].parent / "no-such-model"), "not found")


def test_corrupt_config_json(jobs):
    assert_usage_error(jobs["bad_json"].result(), "config.json")


def test_config_missing_required_field(jobs):
    assert_usage_error(jobs["missing_field"].result(), "hidden_size")


def test_checkpoint_missing_tensor(jobs):
    assert_usage_error(jobs["missing_tensor"].result(), "model.layers.1.self_attn.k_proj.weight")


def test_prompt_too_long(jobs):
    assert_usage_error(jobs["too_long"].result(), "prompt too long", "4096")


@pytest.mark.parametrize("job,field", [("bad_temperature", "temperature"), ("bad_top_p", "top_p"),
                                       ("bad_presence", "presence_penalty")])
def test_invalid_sampling_value(jobs, job, field):
    r = jobs[job].result()
    assert_usage_error(r, field)
    assert "[cpm4] loaded" not in r.err  # rejected before the model is loaded


# ---------------------------------------------------------------------------------------------------------
# chat


def test_chat_reset_clears_history(jobs, llm):
    r = jobs["chat_reset"].result()
    assert r.rc == 0, r
    assert "conversation cleared" in r.err
    first = llm.chat([{"role": "user", "content": "hello"}], greedy_params())[0].text
    fresh = llm.chat([{"role": "user", "content": "hi again"}], greedy_params())[0].text
    # stdout: a "> " prompt per line read, each reply followed by a newline; /reset and /exit print none
    assert r.out == f"> {first}\n> > {fresh}\n> "


def test_chat_multi_turn_keeps_history_and_eof_exits(jobs, llm):
    r = jobs["chat_multi"].result()
    assert r.rc == 0, r
    u1, u2 = {"role": "user", "content": "hello"}, {"role": "user", "content": "how are you"}
    a1 = llm.chat([u1], greedy_params())[0].text
    a2 = llm.chat([u1, {"role": "assistant", "content": a1}, u2], greedy_params())[0].text
    assert r.out == f"> {a1}\n> {a2}\n> \n"


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C: the scenarios run on the pool like the other commands; each returns the child's exit code,
# stdout and stderr after the interrupt.


# The CLI with Ctrl-C delivered as from a terminal: a shell starts background jobs with SIGINT ignored, and a
# Python started so never raises KeyboardInterrupt (a test run launched with `make test &` would then fail).
CLI_SIGINT = [sys.executable, "-c", "import runpy, signal, sys; "
              "signal.signal(signal.SIGINT, signal.default_int_handler); "
              "sys.argv[0] = 'cpm4'; runpy.run_module('cpm4.cli', run_name='__main__', alter_sys=True)"]


def _popen(*args: str | Path, stdin=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([*CLI_SIGINT, *map(str, args)], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=ENV)


def _read_until(p: subprocess.Popen, buf: bytearray, pred, timeout: float = 120.0) -> None:
    """Read the child's stdout into buf until pred(buf) holds."""
    fd = p.stdout.fileno()
    deadline = time.monotonic() + timeout
    while not pred(bytes(buf)):
        left = deadline - time.monotonic()
        if left <= 0 or (p.poll() is not None and not select.select([fd], [], [], 0)[0]):
            p.kill()
            out, err = p.communicate()
            raise AssertionError(f"no expected output: rc={p.returncode} stdout={bytes(buf) + out!r} "
                                 f"stderr={err!r}")
        if select.select([fd], [], [], min(left, 0.5))[0]:
            buf += os.read(fd, 65536)


def _finish(p: subprocess.Popen, buf: bytearray, timeout: float = 20.0) -> Result:
    """Wait (briefly: the interrupt must take effect promptly) for the child to exit."""
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"still running {timeout}s after SIGINT; stderr={err!r}") from None
    return Result(p.returncode, (bytes(buf) + out).decode("utf-8"), err.decode("utf-8", "replace"))


def chat_ctrl_c_at_prompt(ckpt: Path) -> Result:
    p = _popen("chat", "--model", ckpt, "--device", "cpu", "--temperature", "0")
    buf = bytearray()
    _read_until(p, buf, lambda b: b.endswith(b"> "))
    time.sleep(0.5)  # let it block in the read
    p.send_signal(signal.SIGINT)
    return _finish(p, buf)


def chat_ctrl_c_during_reply(ckpt: Path) -> Result:
    p = _popen("chat", "--model", ckpt, "--device", "cpu", "--temperature", "0", "--max-tokens", "100000",
               "--ignore-eos")
    buf = bytearray()
    _read_until(p, buf, lambda b: b.endswith(b"> "))
    p.stdin.write(b"hello\n")
    p.stdin.flush()
    _read_until(p, buf, lambda b: len(b) > 4)  # the reply is streaming
    p.send_signal(signal.SIGINT)
    _read_until(p, buf, lambda b: b"[interrupted]\n> " in b)  # reply cut, back at the prompt
    p.stdin.write(b"/exit\n")
    p.stdin.flush()
    return _finish(p, buf)


def generate_ctrl_c_while_streaming(ckpt: Path) -> Result:
    p = _popen("generate", "--model", ckpt, "--device", "cpu", "--temperature", "0", "--max-tokens", "100000",
               "--ignore-eos", PROMPT, stdin=subprocess.DEVNULL)
    buf = bytearray()
    _read_until(p, buf, lambda b: len(b) > 0)
    p.send_signal(signal.SIGINT)
    return _finish(p, buf)


def test_chat_ctrl_c_at_prompt_quits(jobs):
    r = jobs["chat_sigint_prompt"].result()
    assert r.rc in (0, 130), r
    assert "Traceback" not in r.err, r.err


def test_chat_ctrl_c_during_reply_continues(jobs):
    r = jobs["chat_sigint_reply"].result()
    assert r.rc == 0, r
    assert "Traceback" not in r.err, r.err
    assert r.out.count("[interrupted]") == 1


def test_generate_ctrl_c_while_streaming(jobs):
    r = jobs["generate_sigint"].result()
    assert r.rc == 130, r
    assert "Traceback" not in r.err, r.err
    assert "interrupted" in r.err
    assert len(r.out) > 0


def test_generate_and_chat_size_the_engine_to_their_prompts(monkeypatch):
    """`cpm4 generate` builds its LLM for as many sequences as it has prompts (capped at LLM's default 256)
    and `cpm4 chat` for one: on CUDA the LLM captures a decode graph per bucket up to that at start-up."""
    import cpm4.llm
    from cpm4.cli import main

    class Built(Exception):
        pass

    seen = []

    def fake_llm(*args, **kw):
        seen.append(kw["max_num_seqs"])
        raise Built

    monkeypatch.setattr(cpm4.llm, "LLM", fake_llm)
    for argv in (["generate", "a", "b", "c"], ["generate", *"x" * 300], ["generate", "one"], ["chat"]):
        with pytest.raises(Built):
            main(argv)
    assert seen == [3, 256, 1, 1]
