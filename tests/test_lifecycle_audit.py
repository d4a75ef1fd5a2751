"""The server's and run-batch's process lifecycle, in real processes: signals with requests in flight, startup
failures, interrupted batches. Every process a test starts is killed in its `finally`, pass or fail."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

from test_serve_process import wait_up  # noqa: E402

ENV = dict(os.environ, NO_PROXY="127.0.0.1", no_proxy="127.0.0.1")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for t in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{t}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _cpm4(*args: str, group: bool = False) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cpm4.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=group)


def _kill_all(proc: subprocess.Popen, pids: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _gone(pids: list[int], timeout: float = 15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.mark.parametrize("engine_flag,group", [("--no-engine-process", False), ("--engine-process", True)])
def test_sigterm_with_requests_in_flight(tiny_checkpoint, engine_flag, group):
    """SIGTERM (kill, docker stop, Kubernetes; to the whole process group: systemd, `timeout`) with a stream and a
    plain request running: the server exits 0 within its grace period, the plain request gets an OpenAI error body
    (503, not uvicorn's text "Internal Server Error" after cancelling it), the stream an error event and [DONE],
    the log no traceback; the engine process is gone and the port free at once. (uvicorn re-raised SIGTERM after
    its shutdown: exit -15, the engine never shut down, and uvicorn cancelled the requests mid-response when its
    5 s ran out; the group's SIGTERM killed the engine process at once: a 500 "the engine process died".)"""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = _cpm4("serve", str(tiny_checkpoint), "--port", str(port), "--device", "cpu", "--log-stats-interval", "0",
                 engine_flag, group=group)
    kids: list[int] = []
    got: dict = {}
    try:
        wait_up(proc, url)
        kids = _children(proc.pid)
        long = {"prompt": "Hello", "max_tokens": 4000, "ignore_eos": True}

        def plain():
            try:
                r = httpx.post(f"{url}/v1/completions", json=long, timeout=60)
                got["plain"] = (r.status_code, r.text)
            except httpx.HTTPError as e:
                got["plain"] = ("exc", repr(e))

        def stream():
            events = []
            try:
                with httpx.stream("POST", f"{url}/v1/completions", json={**long, "stream": True}, timeout=60) as r:
                    for line in r.iter_lines():
                        if line.startswith("data: "):
                            events.append(line[6:])
                got["stream"] = events
            except httpx.HTTPError as e:
                got["stream"] = ("exc", repr(e), events[-1:])

        threads = [threading.Thread(target=plain), threading.Thread(target=stream)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not re.search(r"^cpm4_num_requests_running\{.*\} 2\.0$", httpx.get(f"{url}/metrics", timeout=5).text,
                            re.M):
            assert time.monotonic() < deadline, "the requests did not start"
            time.sleep(0.1)
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM) if group else proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.monotonic() - t0
        for t in threads:
            t.join(30)
        out = proc.stdout.read()
        assert rc == 0, out[-3000:]
        assert took < 15, took
        assert "Traceback" not in out, out[-3000:]
        status, body = got["plain"]
        assert status == 503 and json.loads(body)["error"]["type"] == "server_error", got["plain"]
        events = got["stream"]
        assert isinstance(events, list) and events[-1] == "[DONE]", events if not isinstance(events, list) else \
            events[-3:]
        assert "error" in json.loads(events[-2]), events[-2]
        assert not _gone(kids), "the engine process outlived the server"
        with socket.socket() as s:  # the port is free again (a restart can bind it)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", port))
    finally:
        _kill_all(proc, kids)


def test_engine_process_load_failure_is_one_line(tiny_checkpoint, tmp_path):
    """A checkpoint the engine process cannot load (no weights): `cpm4 serve --engine-process` says so in one line
    and exits 2, as the thread engine does (it raised RuntimeError: a traceback, exit 1); nothing is left."""
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_checkpoint.iterdir():
        if f.name != "model.safetensors":
            (broken / f.name).write_bytes(f.read_bytes())
    proc = _cpm4("serve", str(broken), "--port", "0", "--device", "cpu", "--engine-process")
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 2, out
        assert "Traceback" not in out and "cpm4: error:" in out and "no weights" in out, out
    finally:
        _kill_all(proc, [])


def test_engine_process_exits_quietly_when_the_server_is_killed_while_loading(tiny_checkpoint):
    """The server SIGKILLed while its engine process loads the model: the engine process exits by itself, without
    a traceback (its "ready" message met a broken pipe)."""
    proc = _cpm4("serve", str(tiny_checkpoint), "--port", "0", "--device", "cpu", "--engine-process")
    kids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while not (kids := [k for k in _children(proc.pid)
                            if "spawn_main" in open(f"/proc/{k}/cmdline").read()]):
            assert proc.poll() is None and time.monotonic() < deadline, "no engine process"
            time.sleep(0.05)
        kids = _children(proc.pid)
        proc.kill()
        proc.wait()
        assert not _gone(kids, 60), "the engine process outlived the server"
        out = proc.stdout.read()  # the children wrote to the same pipe; all have exited
        assert "Traceback" not in out and "terminate called" not in out, out
    finally:
        _kill_all(proc, kids)


def test_process_engine_never_shut_down_lets_python_exit(tiny_checkpoint, tmp_path):
    """A script that makes a `ProcessEngine` and exits without `shutdown`: the engine is stopped at exit and the
    script ends (the child ignores SIGTERM, which multiprocessing's own exit hook sends before waiting for it)."""
    script = tmp_path / "forgot.py"
    script.write_text("from cpm4.serve import ProcessEngine\n"
                      "if __name__ == '__main__':\n"
                      f"    eng = ProcessEngine({str(tiny_checkpoint)!r}, device='cpu', max_batch_size=2)\n"
                      "    print('child', eng._proc.pid, flush=True)\n")
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=ENV)
    kids: list[int] = []
    try:
        line = proc.stdout.readline()
        assert line.startswith("child "), line + proc.stdout.read()
        kids = [int(line.split()[1])]
        assert proc.wait(30) == 0, proc.stdout.read()
        assert not _gone(kids)
    finally:
        _kill_all(proc, kids)


def test_run_batch_sigterm_leaves_no_temp_file(tiny_checkpoint, tmp_path):
    """`cpm4 run-batch` stopped by SIGTERM mid-run: exit 143, no output file and no temporary file left (the
    temporary file stayed: SIGTERM ended the process before any clean-up), the engine shut down."""
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                                       "body": {"prompt": "Hello", "max_tokens": 2000, "ignore_eos": True}}) + "\n"
                           for i in range(8)))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = _cpm4("run-batch", "-i", str(src), "-o", str(out_dir / "o.jsonl"), "--model", str(tiny_checkpoint),
                 "--device", "cpu", "--no-progress")
    try:
        deadline = time.monotonic() + 120
        while not list(out_dir.iterdir()):  # the temporary output file: the batch runs
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.05)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 143, out
        assert "Traceback" not in out, out
        assert list(out_dir.iterdir()) == []
    finally:
        _kill_all(proc, [])


@pytest.mark.gpu
def test_shutdown_during_warm_up_stops_between_captures(tiny_checkpoint):
    """An engine shut down while it captures its decode graphs stops between captures: on a cold Triton cache each
    takes seconds, and shutdown waited for all of them (a SIGTERM to `cpm4 serve --device cuda` right after start
    took 36 s on the H200, the child killed at its parent's 30 s limit, 2026-12-02)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA")
    from cpm4.llm import load_model
    from cpm4.serve.engine import AsyncEngine

    model, tok = load_model(tiny_checkpoint, "cuda", "bfloat16")
    eng = AsyncEngine(model, tok, max_batch_size=16, kv_cache_tokens=4096)
    eng.shutdown()  # at once: the worker is building its scheduler, or capturing
    graphs = eng._sched.graphs if eng._sched is not None else None
    assert graphs is not None and len(graphs.sizes) > 1
    assert len(graphs.graphs) < len(graphs.sizes), "every bucket was captured after the shutdown began"
    del eng, model
    torch.cuda.empty_cache()
