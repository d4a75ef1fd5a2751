"""The `cpm4` command line as a vLLM / llama.cpp / Hugging Face user drives it: --max-model-len on generate,
several --served-model-name values, one-line errors (exit 2, no traceback) for bad input of every kind, atomic
output of init and convert when the writer fails midway, convert's refusals, a closed output pipe.

Commands run in-process through `cpm4.cli.main` (fast); only the closed-pipe case needs a real process.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cpm4 import LLM, SamplingParams
from cpm4.cli import main
from cpm4.model.init import create_checkpoint

PROMPT = "hello world"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("audit") / "tiny"
    create_checkpoint("tiny", path)
    return path


@pytest.fixture(scope="module")
def llm(ckpt) -> LLM:
    return LLM(ckpt, device="cpu")


def run(argv: list, capsys) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, stderr); argparse's usage errors exit through SystemExit."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(("cpm4: error:", "cpm4 ")) and "error:" in last, err  # ours, or argparse's usage error
    for n in needles:
        assert n in last, f"{n!r} not in {last!r}"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(f.relative_to(folder)): f.read_bytes() for f in sorted(folder.rglob("*")) if f.is_file()}


# ---------------------------------------------------------------------------------------------------------
# generate --max-model-len (vLLM's flag, shared with serve)


def test_generate_max_model_len_caps_prompt_plus_output(ckpt, llm, capsys):
    n_prompt = len(llm.tokenizer.encode(PROMPT))
    cap = n_prompt + 4
    want = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0].text
    base = ["generate", "--model", ckpt, "--device", "cpu", "--temperature", "0", "--ignore-eos", "--max-tokens", "20",
            "--max-model-len", cap]
    for extra in ([], ["--no-stream"]):  # the streaming loop and the engine
        rc, out, err = run([*base, *extra, PROMPT], capsys)
        assert rc == 0, err
        assert out == want + "\n"
    # A prompt that leaves no room under the cap is refused, naming the cap.
    rc, _, err = run([*base[:-1], n_prompt, PROMPT], capsys)
    assert_one_line_error(rc, err, "prompt too long", f"maximum context length (max_model_len) is {n_prompt}")


@pytest.mark.parametrize("value,needle", [("1", "integer >= 2"), ("0", "integer >= 2"), ("x", "'x'")])
@pytest.mark.parametrize("command", ["generate", "chat", "serve"])
def test_max_model_len_validated_alike_before_loading(ckpt, capsys, command, value, needle):
    rc, _, err = run([command, "--model", ckpt, "--max-model-len", value], capsys)
    assert_one_line_error(rc, err, "--max-model-len", needle)


def test_max_model_len_longer_than_the_context(ckpt, capsys, monkeypatch):
    rc, _, err = run(["generate", "--model", ckpt, "--device", "cpu", "--max-model-len", "5000", "hi"], capsys)
    assert_one_line_error(rc, err, "max_model_len 5000", "4096")
    pytest.importorskip("uvicorn")
    monkeypatch.setattr("cpm4.serve._run_server", lambda app, **kw: pytest.fail("served despite a bad --max-model-len"))
    rc, _, err = run(["serve", "--model", ckpt, "--device", "cpu", "--max-model-len", "5000",
                      "--log-stats-interval", "0"], capsys)
    assert_one_line_error(rc, err, "max_model_len 5000", "4096")


# ---------------------------------------------------------------------------------------------------------
# serve --served-model-name a b


def test_serve_several_model_names(ckpt, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    pytest.importorskip("httpx")
    from fastapi.testclient import TestClient

    seen: dict = {}

    def fake_run(app, **kw):
        with TestClient(app) as tc:
            seen["models"] = tc.get("/v1/models").json()
            seen["one"] = tc.get("/v1/models/beta").json()
            body = {"prompt": "hi", "max_tokens": 2, "temperature": 0}
            seen["by_alias"] = tc.post("/v1/completions", json={**body, "model": "beta"}).json()
            seen["chat"] = tc.post("/v1/chat/completions", json={
                "model": "alpha", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}).json()
            r = tc.post("/v1/completions", json={**body, "model": "gamma"})
            seen["unknown"] = (r.status_code, r.json())

    monkeypatch.setattr("cpm4.serve._run_server", fake_run)
    rc, _, err = run(["serve", ckpt, "--device", "cpu", "--served-model-name", "alpha", "beta",
                      "--log-stats-interval", "0", "--max-batch-size", "2"], capsys)
    assert rc == 0, err
    assert [m["id"] for m in seen["models"]["data"]] == ["alpha", "beta"]
    assert seen["one"]["id"] == "beta"
    assert seen["by_alias"]["model"] == "alpha"  # responses carry the first name, as vLLM's
    assert seen["by_alias"]["choices"][0]["finish_reason"] == "length"
    assert seen["chat"]["model"] == "alpha"
    status, body = seen["unknown"]
    assert status == 404 and "gamma" in body["error"]["message"]
    assert "`alpha`" in body["error"]["message"] and "`beta`" in body["error"]["message"]


def test_serve_one_model_name_and_bad_names(ckpt, capsys, monkeypatch):
    pytest.importorskip("uvicorn")
    seen = {}
    monkeypatch.setattr("cpm4.serve._run_server", lambda app, **kw: seen.setdefault("name", app.state.model_name))
    rc, _, err = run(["serve", ckpt, "--device", "cpu", "--served-model-name", "solo", "--log-stats-interval", "0",
                      "--max-batch-size", "2"], capsys)
    assert rc == 0 and seen["name"] == "solo", err
    rc, _, err = run(["serve", ckpt, "--served-model-name", ""], capsys)
    assert_one_line_error(rc, err, "served model names must be non-empty")


# ---------------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit 2, no traceback


def _copy(ckpt: Path, dest: Path, config_changes: dict | None = None) -> Path:
    shutil.copytree(ckpt, dest)
    if config_changes:
        cfg = json.loads((dest / "config.json").read_text())
        for key, value in config_changes.items():
            if "." in key:
                outer, inner = key.split(".")
                cfg[outer] = {**(cfg[outer] or {}), inner: value}
            else:
                cfg[key] = value
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


@pytest.mark.parametrize("changes,needle", [
    ({"eos_token_id": [2, "x"]}, "eos_token_id"),  # was a TypeError deep in the sampler
    ({"eos_token_id": "2"}, "eos_token_id"),  # was accepted, and never matched
    ({"bos_token_id": "x"}, "bos_token_id"),
    ({"sparse_config.lse_kernel_size": "x"}, "sparse_config.lse_kernel_size"),  # was a TypeError
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": "x"}},
     "rope_scaling.original_max_position_embeddings"),  # was "invalid literal for int()", no field named
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "beta_fast": "x"}}, "rope_scaling.beta_fast"),
    ({"rope_scaling": {"rope_type": "longrope", "original_max_position_embeddings": 1024,
                       "short_factor": ["a"] * 8, "long_factor": [1.0] * 8}}, "rope_scaling.short_factor"),
    ({"scale_emb": 1e400}, "scale_emb"),  # inf: every logit NaN
    ({"head_dim": True}, "head_dim: must be a positive integer"),
    ({"num_hidden_layers": "four"}, "num_hidden_layers"),
])
def test_malformed_config_field_is_named(ckpt, tmp_path, capsys, changes, needle):
    bad = _copy(ckpt, tmp_path / "bad", changes)
    rc, _, err = run(["generate", "--model", bad, "--device", "cpu", "--max-tokens", "2", "hi"], capsys)
    assert_one_line_error(rc, err, needle)


@pytest.mark.parametrize("content", [b"garbage\n", None])  # not safetensors; cut short (interrupted download)
def test_corrupt_weights_file_is_named(ckpt, tmp_path, capsys, content):
    bad = _copy(ckpt, tmp_path / "bad")
    f = bad / "model.safetensors"
    if content is None:
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size // 2)
    else:
        f.write_bytes(content)
    for cmd in (["generate", "--model", bad, "--device", "cpu", "hi"], ["convert", bad, tmp_path / "out"]):
        rc, _, err = run(cmd, capsys)
        assert_one_line_error(rc, err, str(f), "not a readable safetensors file")
    assert not (tmp_path / "out").exists()


def test_missing_folder_config_or_weights(ckpt, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    shutil.copytree(ckpt, tmp_path / "noweights", ignore=shutil.ignore_patterns("*.safetensors"))
    for argv in (["generate", "--model", tmp_path / "nope", "hi"], ["chat", "--model", tmp_path / "nope"],
                 ["convert", tmp_path / "nope", tmp_path / "o"]):
        rc, _, err = run(argv, capsys)
        assert_one_line_error(rc, err, "not found", str(tmp_path / "nope"))
    rc, _, err = run(["convert", tmp_path / "empty", tmp_path / "o"], capsys)
    assert_one_line_error(rc, err, "config.json not found")
    rc, _, err = run(["generate", "--model", tmp_path / "noweights", "hi"], capsys)
    assert_one_line_error(rc, err, "no weights", "model.safetensors")


@pytest.mark.parametrize("argv,needles", [
    (["generate", "--dtype", "float8", "hi"], ["unknown dtype 'float8'"]),
    (["generate", "--device", "tpu", "hi"], ["unknown device 'tpu'"]),
    (["generate", "--device", "mps", "hi"], ["unknown device 'mps'"]),  # torch knows these: was a traceback
    (["generate", "--device", "meta", "hi"], ["unknown device 'meta'"]),  # was "not a readable safetensors file"
    (["generate", "--device", "cuda:x", "hi"], ["unknown device 'cuda:x'"]),
    (["serve", "--device", "xpu"], ["unknown device 'xpu'"]),
    (["generate", "--temperature", "-1", "hi"], ["temperature"]),
    (["generate", "--max-tokens", "0", "hi"], ["max_tokens"]),
    (["chat", "--top-p", "0"], ["top_p"]),
    (["serve", "--port", "70000"], ["--port", "[0, 65535]"]),
    (["serve", "--log-stats-interval", "-1"], ["--log-stats-interval", ">= 0"]),  # was refused only after the load
    (["serve", "--log-stats-interval", "nan"], ["--log-stats-interval"]),
    (["serve", "--dtype", "float8"], ["unknown dtype 'float8'"]),
])
def test_bad_option_values(ckpt, capsys, argv, needles):
    rc, out, err = run([argv[0], "--model", ckpt, "--device", "cpu", *argv[1:]], capsys)
    assert_one_line_error(rc, err, *needles)
    assert "[cpm4] loaded" not in err and out == ""


def test_bench_bad_warmups_is_a_usage_error(capsys):
    rc, _, err = run(["bench", "serve", "--model", "m", "--num-warmups", "-1"], capsys)
    assert_one_line_error(rc, err, "--num-warmups", ">= 0")  # was "need n, ... got -1", after the setup


@pytest.mark.parametrize("argv", [["init"], ["convert"], ["generate"], ["chat"], ["serve"], ["bench", "serve"],
                                  ["data", "filter"], ["pretrain"], ["sft"]])
def test_help_of_every_subcommand(capsys, argv):
    rc, out, err = run([*argv, "--help"], capsys)
    assert rc == 0 and out.startswith(f"usage: cpm4 {' '.join(argv)}"), err


# ---------------------------------------------------------------------------------------------------------
# output folders: refused early, never half-written


def test_unwritable_output_is_one_line(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    rc, _, err = run(["init", "--config", "tiny", "--out", blocker / "a" / "model"], capsys)
    assert_one_line_error(rc, err, f"cannot create {blocker / 'a' / 'model'}", f"{blocker} is a file")

    real_mkdir = Path.mkdir

    def denied(self, *a, **kw):
        if self.parent == tmp_path / "ro":
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **kw)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(Path, "mkdir", denied)
    rc, _, err = run(["init", "--config", "tiny", "--out", tmp_path / "ro" / "m"], capsys)  # was a traceback
    assert_one_line_error(rc, err, f"cannot create {tmp_path / 'ro' / 'm'}", "Permission denied")


def _fail_midway(monkeypatch, exc: BaseException) -> None:
    """Make the tensor writer leave half a file behind, then fail (a full disk, a Ctrl-C)."""
    import cpm4.model.checkpoint as checkpoint

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)
        raise exc

    monkeypatch.setattr(checkpoint, "save_file", broken)


@pytest.mark.parametrize("exc,code", [(OSError(28, "No space left on device"), 2), (KeyboardInterrupt(), 130)])
@pytest.mark.parametrize("command", ["init", "convert"])
def test_interrupted_write_leaves_target_untouched(ckpt, tmp_path, capsys, monkeypatch, command, exc, code):
    old = tmp_path / "old"
    create_checkpoint("tiny", old, seed=5)  # an earlier result, to be replaced with --overwrite
    before = snapshot(old)
    cmd = {"init": ["init", "--config", "tiny", "--seed", "1"], "convert": ["convert", ckpt]}[command]
    _fail_midway(monkeypatch, exc)
    for target, extra in ((old, ["--overwrite"]), (tmp_path / "new", [])):
        argv = [*cmd, *(["--out"] if command == "init" else []), target, *extra]
        rc, out, err = run(argv, capsys)
        assert rc == code and "Traceback" not in err, err
        if code == 2:
            assert_one_line_error(rc, err, "No space left on device")
    assert snapshot(old) == before  # the earlier checkpoint, byte for byte
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]  # no new folder, no temporary leftovers


def test_convert_refusals(ckpt, tmp_path, capsys, monkeypatch):
    src = _copy(ckpt, tmp_path / "outer" / "src")
    before = snapshot(src)
    rc, _, err = run(["convert", src, src / "llama"], capsys)  # was written into the source checkpoint
    assert_one_line_error(rc, err, "inside its source")
    rc, _, err = run(["convert", src, tmp_path / "outer", "--overwrite"], capsys)  # was: the source deleted
    assert_one_line_error(rc, err, "holding its source")
    rc, _, err = run(["convert", src, src, "--overwrite"], capsys)
    assert_one_line_error(rc, err, "its own source")
    rc, _, err = run(["convert", src, tmp_path / "x", "--to", "gguf"], capsys)
    assert_one_line_error(rc, err, "--to", "gguf")
    assert snapshot(src) == before and sorted(p.name for p in src.parent.iterdir()) == ["src"]
    # An existing output is refused before the (possibly long) load of the source.
    import cpm4.model.convert as convert

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    monkeypatch.setattr(convert, "load_checkpoint", lambda *a, **kw: pytest.fail("loaded before refusing"))
    rc, _, err = run(["convert", src, tmp_path / "taken"], capsys)
    assert_one_line_error(rc, err, "not empty", "--overwrite")
    assert (tmp_path / "taken" / "keep.txt").read_text() == "mine"


def test_dtype_auto_for_init_and_convert(ckpt, tmp_path, capsys):
    # generate/serve (and vLLM, transformers) spell the default "auto"; init and convert refused it.
    rc, _, err = run(["init", "--config", "tiny", "--out", tmp_path / "m", "--dtype", "auto"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "m" / "config.json").read_text())["torch_dtype"] == "float32"  # the preset's
    rc, _, err = run(["convert", ckpt, tmp_path / "llama", "--dtype", "auto"], capsys)
    assert rc == 0, err
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["torch_dtype"] == "float32"  # as stored


# ---------------------------------------------------------------------------------------------------------
# `cpm4 generate ... | head`: the reader goes away


def test_closed_output_pipe_exits_quietly(ckpt):
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    p = subprocess.Popen([sys.executable, "-m", "cpm4.cli", "generate", "--model", str(ckpt), "--device", "cpu",
                          "--temperature", "0", "--ignore-eos", "--max-tokens", "100000", PROMPT],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert p.stdout.read(1)  # streaming has begun
        p.stdout.close()  # as `head -c 1` does
        _, err_bytes = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    err = err_bytes.decode("utf-8", "replace")
    assert p.returncode == 1, err
    assert "Traceback" not in err and "Exception ignored" not in err and "BrokenPipe" not in err, err


# ---------------------------------------------------------------------------------------------------------
# Errors said before the heavy imports


def test_missing_model_is_said_before_torch_loads(tmp_path):
    """`cpm4 serve` of a missing folder answers in a fraction of a second: exit 2, the path named, torch never
    imported (the command line catches the library's error types as the ValueError they are)."""
    from cpm4.engine.generate import PromptTooLongError
    from cpm4.model.checkpoint import CheckpointError
    from cpm4.model.config import ConfigError

    assert all(issubclass(e, ValueError) for e in (PromptTooLongError, CheckpointError, ConfigError))
    missing = tmp_path / "no-such-model"
    code = ("import sys; from cpm4.cli import main; rc = main(['serve', sys.argv[1]]); "
            "print(rc, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(missing)], capture_output=True, text=True, timeout=120)
    assert p.stdout.split() == ["2", "False"], (p.stdout, p.stderr)
    assert p.stderr.strip() == f"cpm4: error: model directory not found: {missing}"


def _broken_models(tmp_path: Path) -> dict[str, Path]:
    bad_json = tmp_path / "bad-json"
    bad_json.mkdir()
    (bad_json / "config.json").write_text("{", encoding="utf-8")
    no_field = tmp_path / "no-field"
    no_field.mkdir()
    (no_field / "config.json").write_text('{"vocab_size": 100}', encoding="utf-8")
    bad_defaults = tmp_path / "generation_config.json"
    bad_defaults.write_text('{"temperature": -1}', encoding="utf-8")
    return {"bad_json": bad_json, "no_field": no_field, "bad_defaults": bad_defaults}


@pytest.mark.parametrize("argv,said", [
    (["generate", "--temperature", "-1", "hi"], "temperature must be a number"),
    (["chat", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["generate", "--model", "{missing}", "hi"], "model directory not found: {missing}"),
    (["generate", "--model", "{bad_json}", "hi"], "not valid JSON"),
    (["chat", "--model", "{no_field}"], "hidden_size"),
    (["init", "--config", "huge", "--out", "{missing}"], "unknown config preset 'huge'"),
    (["serve", "--generation-config", "{bad_defaults}"], "temperature"),
    (["serve", "--device", "tpu"], "unknown device 'tpu'"),
    (["chat", "--device", "mps"], "unknown device 'mps'"),
    (["generate", "--dtype", "int8", "hi"], "unknown dtype 'int8'"),
    (["init", "--config", "tiny", "--out", "{missing}", "--dtype", "q4"], "unknown dtype 'q4'"),
    (["convert", "{missing}", "{missing}", "--dtype", "fp8"], "unknown dtype 'fp8'"),
])
def test_generate_chat_init_errors_are_said_before_torch_loads(tmp_path, argv, said):
    """Bad sampling values, a missing model, a broken config.json, an unknown preset and a generation config with a
    bad value: exit 2 with the problem named, before torch is imported (≈ 0.2 s instead of ≈ 2.5)."""
    names = {k: str(v) for k, v in _broken_models(tmp_path).items()} | {"missing": str(tmp_path / "no-such-model")}
    argv = [a.format(**names) for a in argv]
    # argparse's usage errors (--device) exit inside main
    code = ("import sys, json\nfrom cpm4.cli import main\ntry:\n    rc = main(json.loads(sys.argv[1]))\n"
            "except SystemExit as e:\n    rc = e.code\nprint(rc, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, json.dumps(argv)], capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert p.stdout.split() == ["2", "False"], (p.stdout, p.stderr)
    assert_one_line_error(2, p.stderr, said.format(**names))


@pytest.mark.parametrize("option,said", [("--chat-template", "chat template: no such file"),
                                         ("--generation-config", "generation config not found")])
def test_missing_serve_files_are_said_before_torch_loads(tmp_path, option, said):
    """`cpm4 serve MODEL` with a chat template or generation config that does not exist: exit 2, the file named,
    before torch is imported (the model folder exists: the bundled demo)."""
    from cpm4.cli import DEFAULT_MODEL

    missing = tmp_path / "no-such-file"
    code = ("import sys; from cpm4.cli import main; rc = main(['serve', sys.argv[1], sys.argv[2], sys.argv[3]]); "
            "print(rc, 'torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code, str(DEFAULT_MODEL), option, str(missing)], capture_output=True,
                       text=True, timeout=120)
    assert p.stdout.split() == ["2", "False"], (p.stdout, p.stderr)
    assert said in p.stderr and str(missing) in p.stderr and "Traceback" not in p.stderr


def test_prompt_bytes_that_are_not_utf8(ckpt, llm):
    """A prompt with bytes that are not UTF-8 (argv or stdin) runs with U+FFFD for them, as other tools show them
    (was a TypeError traceback, exit 1); in the API a lone surrogate is a ValueError that says so."""
    base = [sys.executable, "-m", "cpm4.cli", "generate", "--model", str(ckpt), "--max-tokens", "2",
            "--temperature", "0"]
    for argv, stdin in ((base + [b"caf\xe9 au lait"], None), (base, b"caf\xe9 au lait\n")):
        r = subprocess.run(argv, input=stdin, capture_output=True, timeout=120)
        assert r.returncode == 0, r.stderr.decode()
    want = llm.generate("caf\ufffd au lait", SamplingParams(temperature=0, max_tokens=2))[0].text
    assert want in r.stdout.decode()
    with pytest.raises(ValueError, match="not valid Unicode: a lone surrogate '\\\\udce9' at character 3"):
        llm.tokenizer.encode("caf\udce9")


def test_serve_options_as_vllm_spells_them(monkeypatch):
    """--allowed-origins as a JSON list (vLLM's spelling; it was one origin named '["http://a"]', so every origin
    was refused), $VLLM_API_KEY as the key (the server was open), an empty key refused, vLLM's logging options and
    --trust-remote-code taken."""
    from cpm4.cli import build_parser
    from cpm4.serve.cli import _origins

    assert _origins('["http://a", "http://b"]') == ["http://a", "http://b"] and _origins("*") == ["*"]
    monkeypatch.delenv("CPM4_API_KEY", raising=False)
    monkeypatch.setenv("VLLM_API_KEY", "sekret")
    args = build_parser().parse_args(["serve", "--allowed-origins", '["http://a"]', "http://c",
                                      "--trust-remote-code", "--disable-log-stats", "--uvicorn-log-level", "warning",
                                      "--disable-uvicorn-access-log"])
    assert args.allowed_origins == [["http://a"], ["http://c"]] and args.api_key == "sekret"
    assert args.disable_log_stats and args.uvicorn_log_level == "warning" and args.disable_uvicorn_access_log
    for bad in (["--api-key", ""], ["--allowed-origins", '["x", 3]'], ["--tool-call-parser", "hermes"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(["serve", *bad])
        assert e.value.code == 2
    # vLLM's tool-calling switches (tool calls are always parsed here), on serve and run-batch alike
    for cmd in (["serve"], ["run-batch", "-i", "a", "-o", "b"]):
        args = build_parser().parse_args([*cmd, "--enable-auto-tool-choice", "--tool-call-parser", "minicpm4"])
        assert args.enable_auto_tool_choice and args.tool_call_parser == "minicpm4"


def test_serve_port_in_use_is_said_before_the_model_loads(tmp_path, capsys):
    """The port is taken first (as vLLM's): one in use is a one-line error, exit 2, before any load (the load came
    first, then uvicorn's own message and exit 3)."""
    import socket

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        rc = main(["serve", str(tmp_path / "no-such-model"), "--port", str(port), "--device", "cpu"])
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot listen on 127.0.0.1:{port}" in err and "not found" not in err
