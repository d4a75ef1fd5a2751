"""The server's engine in a process of its own (`cpm4 serve --engine-process`).

`AsyncEngine` runs the model on a worker thread of the HTTP server's process, so the event loop's work for every
streamed chunk (formatting, JSON, the socket) and the engine's host work for every step (scheduling, launches,
sampling, detokenizing) take turns on one GIL. `ProcessEngine` moves the model and that worker into a child
process, as vLLM runs its engine core apart from its API server: the child loads the checkpoint and runs the
same `AsyncEngine` worker loop; this process keeps only the tokenizer and config (prompt checks, chat templates,
grammars) and exchanges small messages with the child over a pipe: requests and aborts one way, each step's
deltas (one message per step) the other.

The public surface is `AsyncEngine`'s, so `create_app` and the metrics take either. If the child dies, every
request in flight fails with `EngineError`, later ones with `EngineClosedError` saying why, and `is_running` turns
False (the health check then says so); the same when the child's worker dies (then the child is stopped).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import inspect
import itertools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cpm4.engine.generate import DetachedText, PromptTooLongError, StreamDelta, TokenLogprob, context_length
from cpm4.engine.generation_config import serving_config
from cpm4.engine.params import check_scheduling_policy
from cpm4.engine.scheduler import cache_capacity
from cpm4.model.hub import resolve_model_dir
from cpm4.model.tokenizer import Tokenizer

from .engine import _END, AsyncEngine, EngineClosedError, EngineError, _Request, check_engine_options

log = logging.getLogger(__name__)

__all__ = ["ProcessEngine"]

# AsyncEngine's options and their defaults, from its signature: the child builds one with them.
_ENGINE_DEFAULTS = {name: p.default for name, p in inspect.signature(AsyncEngine.__init__).parameters.items()
                    if name not in ("self", "model", "tokenizer")}

# Stats the child sends with every message: (running, waiting, preempted, KV cache usage or None).
_NO_STATS = (0, 0, 0, None)


@dataclass(frozen=True)
class _Failed:
    """An error item on the wire (exceptions of any class need not pickle)."""

    kind: str  # "too_long": PromptTooLongError; "value": another bad request; "closed": shut down; "engine": failed
    message: str


# Error classes the parent raises again as they are, so that the server answers as it does for the thread engine
# (PromptTooLongError: 400 context_length_exceeded); anything else becomes an EngineError.
_ERROR_KINDS: dict[str, type[Exception]] = {"too_long": PromptTooLongError, "value": ValueError,
                                            "closed": EngineClosedError, "engine": EngineError}


def _encode(item: object) -> object:
    """A queue item as a plain picklable value: a delta's fields, None for the end, or a `_Failed`."""
    if item is _END:
        return None
    if isinstance(item, StreamDelta):
        return (item.text, item.token_ids, item.finish_reason, item.logprobs, item.cached_tokens, item.stop_reason)
    if isinstance(item, BaseException):
        kind = next((k for k, cls in _ERROR_KINDS.items() if isinstance(item, cls)), "engine")
        return _Failed(kind, str(item))
    raise TypeError(f"cannot send {type(item).__name__}")


def _decode(payload: object) -> object:
    if payload is None:
        return _END
    if isinstance(payload, _Failed):
        return _ERROR_KINDS.get(payload.kind, EngineError)(payload.message)
    return StreamDelta(0, *payload)


class _ChildEngine(AsyncEngine):
    """The `AsyncEngine` worker inside the child: requests come from the pipe, deltas go back through it."""

    def __init__(self, conn: Any, *args: Any, **kwargs: Any) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def stats(self) -> tuple:
        return (self.num_running, self.num_waiting, self.num_preempted, self.kv_cache_usage())

    def _post_all(self, items: list[tuple[_Request, object]]) -> None:
        try:
            self.send(("out", [(req.request_id, _encode(item)) for req, item in items], self.stats()))
        except (OSError, EOFError):  # the parent is gone; the main thread shuts down on its own
            pass

    def add(self, request_id: str, prompt_ids: list[int], params: Any, stream_text: bool = True,
            detokenize: bool = True) -> None:
        self._submit(_Request(request_id, prompt_ids, params, None, None, stream_text=stream_text,
                              detokenize=detokenize))

    def _die(self, reason: str) -> None:
        super()._die(reason)  # the requests' errors go first
        try:
            self.send(("dead", reason))  # the parent stops taking requests and stops this process
        except (OSError, EOFError):
            pass


def _shutdown_at_exit(ref: weakref.ref) -> None:
    engine = ref()
    if engine is not None:
        engine.shutdown()


def _fatal_kind(err: BaseException) -> str:
    return "value" if isinstance(err, ValueError) else "os" if isinstance(err, OSError) else "other"


def _child_main(conn: Any, model_dir: str, device: str | None, dtype: str | None, engine_kwargs: dict,
                tokenizer_dir: str | None = None) -> None:
    """The engine process: load, serve the pipe's messages until "stop" or the parent goes away."""
    # Ctrl-C reaches the whole group, and so does SIGTERM from systemd (its default KillMode), `timeout` or
    # `kill -- -PGID`: the parent stops us after its graceful shutdown (we died at once, failing its requests),
    # and a parent gone for good closes the pipe, which ends us too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from cpm4.llm import load_model

        tok = Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir is not None else None
        model, tokenizer = load_model(model_dir, device, dtype, tokenizer=tok)
        eng = _ChildEngine(conn, model, tokenizer, **engine_kwargs)
    except BaseException as err:  # noqa: BLE001 - whatever it is, the parent must hear of it
        # Its kind too: a bad checkpoint (ValueError) or a missing file (OSError) is said as the thread engine's
        try:
            conn.send(("fatal", f"{type(err).__name__}: {err}", _fatal_kind(err)))
        except (OSError, EOFError):  # the parent is gone
            pass
        return
    try:
        eng.send(("ready", {"kv_cache_tokens": eng.kv_cache_tokens, "chunk_tokens": eng.chunk_tokens,
                            "device": str(model.device)}))
    except (OSError, EOFError):  # the parent died while this loaded: stop quietly (it was a traceback)
        eng.shutdown()
        return

    def logprobs(call: int, ids: list[int], k: int) -> None:
        from cpm4.engine.generate import prompt_logprobs

        try:
            with eng._model_lock:
                res, err = prompt_logprobs(model, ids, k), None
        except Exception as e:  # noqa: BLE001
            res, err = None, _encode(e)
        try:
            eng.send(("logprobs", call, res, err))
        except (OSError, EOFError):
            pass

    try:
        while True:
            try:
                msg = conn.recv()
            except (EOFError, OSError):
                break  # the parent died
            op = msg[0]
            if op == "add":
                try:
                    eng.add(*msg[1:])
                except (ValueError, EngineClosedError) as err:
                    eng._post_all([(_Request(msg[1], [], None, None, None), err)])
            elif op == "abort":
                eng.abort(msg[1])
            elif op == "logprobs":
                threading.Thread(target=logprobs, args=msg[1:], daemon=True).start()
            elif op == "stop":
                break
    finally:
        eng.shutdown()
        try:
            eng.send(("bye", eng.stats()))
        except (OSError, EOFError):
            pass


class ProcessEngine(AsyncEngine):
    """`AsyncEngine`'s interface, with the model and its worker in a child process (see the module doc).

    Takes a checkpoint folder instead of a model: the child loads it (`device`, `dtype` as `cpm4.LLM`).
    engine_kwargs: `AsyncEngine`'s options (max_batch_size, kv_cache_tokens, chunk_tokens, cuda_graphs, compile,
    gpu_memory_utilization, async_output, max_model_len, cpu_threads, continuous). Blocks until the model is
    loaded (a failed load raises the child's error: ValueError for a bad checkpoint, OSError for a file, else
    RuntimeError); the decode graphs are captured after,
    while requests queue. The child is spawned (CUDA cannot be forked), so a script that makes one needs the
    usual `if __name__ == "__main__":` guard around its entry point.

    api_detokenize: this process turns the token ids of requests without stop strings into their text
    (`DetachedText`, in the thread that reads the child's messages), as vLLM's API server does for its engine core:
    the child's step loop no longer decodes every running request's new id every step. The text is the same;
    requests with stop strings (and the plain-loop mode, continuous=False) are decoded in the child."""

    def __init__(self, model_dir: str | os.PathLike, device: str | None = None, dtype: str | None = None,
                 tokenizer: Tokenizer | None = None, start_timeout: float | None = None, api_detokenize: bool = True,
                 tokenizer_dir: str | os.PathLike | None = None, **engine_kwargs: Any) -> None:
        path = os.fspath(resolve_model_dir(model_dir))  # a Hub id is fetched here, not in the child
        self.config = serving_config(path)  # the child's model's (generation_config.json's EOS ids too)
        # tokenizer_dir: a folder (or Hub id) whose tokenizer both processes use instead of the checkpoint's
        tok_path = os.fspath(resolve_model_dir(tokenizer_dir)) if tokenizer_dir is not None else None
        self.tokenizer = tokenizer if tokenizer is not None else Tokenizer.from_dir(tok_path or path)
        unknown = set(engine_kwargs) - set(_ENGINE_DEFAULTS)
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(sorted(unknown))}")
        options = {**_ENGINE_DEFAULTS, **engine_kwargs}
        check_engine_options(options["max_batch_size"], options["cpu_threads"])
        max_model_len = options["max_model_len"]
        self.context_length = context_length(self.config, max_model_len)  # bad values fail before the spawn
        self.max_model_len = max_model_len
        self.vocab_size = self.config.vocab_size
        self.max_batch_size = options["max_batch_size"]
        self.continuous = options["continuous"]
        check_scheduling_policy(options["scheduling_policy"])
        self.scheduling_policy = options["scheduling_policy"]  # the parent checks requests' priorities
        self.api_detokenize = api_detokenize and self.continuous
        self.model = None  # in the child
        self._init_front()
        self._stats = _NO_STATS
        self._calls: dict[int, concurrent.futures.Future] = {}
        self._call_ids = itertools.count()
        self._send_lock = threading.Lock()
        self._reap_lock = threading.Lock()
        self.exitcode: int | None = None
        ctx = multiprocessing.get_context("spawn")  # CUDA cannot be used in a forked child
        self._conn, child_conn = ctx.Pipe()
        self._proc = ctx.Process(target=_child_main, args=(child_conn, path, device, dtype, engine_kwargs, tok_path),
                                 name="cpm4-engine", daemon=True)
        self._proc.start()
        child_conn.close()
        try:
            info = self._wait_ready(start_timeout)
        except BaseException:
            self._kill()
            raise
        self.kv_cache_tokens = info["kv_cache_tokens"]
        self.cache_tokens = cache_capacity(self.config, self.kv_cache_tokens) if self.continuous else None
        self.chunk_tokens = info["chunk_tokens"]
        self.device = info["device"]
        self._reader = threading.Thread(target=self._read, name="cpm4-engine-io", daemon=True)
        self._reader.start()
        # Stopped at exit if `shutdown` was not called: before multiprocessing's exit hook (registered before,
        # so run after), which SIGTERMs the child, which ignores it (`_child_main`), then waits for it.
        atexit.register(_shutdown_at_exit, weakref.ref(self))

    def _wait_ready(self, timeout: float | None) -> dict:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if self._wait_exit(0) is not None:
                raise RuntimeError(f"the engine process exited (code {self.exitcode}) while loading")
            if timeout is not None and waited >= timeout:
                raise RuntimeError(f"the engine process did not load the model within {timeout} s")
        msg = self._conn.recv()
        if msg[0] == "fatal":  # a bad checkpoint or missing file: a one-line error of `cpm4 serve`, as in a thread
            error = {"value": ValueError, "os": OSError}.get(msg[2] if len(msg) > 2 else "", RuntimeError)
            raise error(f"the engine process could not start: {msg[1]}")
        return msg[1]

    def _wait_exit(self, timeout: float | None) -> int | None:
        """Wait up to `timeout` seconds for the child to exit and reap it: its exit code, None while it runs.
        Every wait goes through here, one at a time: the reader, `shutdown` and the health check waiting on the
        pid together raced in waitpid, and the loser took the reaped child for a live one (a spurious "did not
        stop: killed", an exit code of None)."""
        if self.exitcode is None and multiprocessing.connection.wait([self._proc.sentinel], timeout):
            with self._reap_lock:
                self._proc.join()  # it has exited: this reaps it at once
                self.exitcode = self._proc.exitcode
        return self.exitcode

    def _kill(self) -> None:
        with self._reap_lock:  # not between another thread's reaping and its exit code (the pid may be reused)
            if self._proc.exitcode is None:
                self._proc.kill()
        self._wait_exit(10)

    def check_params(self, params: Any) -> None:
        """`AsyncEngine.check_params`, and no logits processors: they are Python callables run in the engine's
        step, which is in the child here (a pickled copy would run there, its state never seen here, and most
        callables, closures and lambdas, do not pickle at all)."""
        super().check_params(params)
        if params.logits_processors:
            raise ValueError("logits_processors cannot be sent to an engine in another process (--engine-process): "
                             "run them on an in-process engine (AsyncEngine, cpm4.LLM)")

    # ----- this process's side of the pipe -----

    def _send(self, msg: tuple) -> None:
        with self._send_lock:
            self._conn.send(msg)

    def _submit(self, req: _Request) -> None:
        with self._cond:
            self._register(req)
        # Sent without the lock: a send blocks while the pipe is full, and the reader, which empties the child's
        # pipe (so that the child reads ours again), needs the lock to deliver.
        stream_text = req.stream_text
        if self.api_detokenize and not req.params.stop:
            # The child sends ids only (no text, not even at the end): this process decodes them (`_deliver`).
            req.detached = DetachedText(self.tokenizer, req.prompt_ids, req.params, self.config.eos_token_ids,
                                        req.stream_text)
            req.detokenize = stream_text = False
        try:
            self._send(("add", req.request_id, req.prompt_ids, req.params, stream_text, req.detokenize))
        except BaseException as err:
            with self._cond:
                self._requests.pop(req.request_id, None)
            if isinstance(err, (OSError, EOFError, ValueError)):
                raise EngineError("the engine process is gone") from None
            raise
        if req.aborted:
            # Aborted between its registration and its add: that abort may have reached the child first (and
            # found nothing to end), so it goes again, now after the add.
            with contextlib.suppress(OSError, EOFError, ValueError):
                self._send(("abort", req.request_id))

    def abort(self, request_id: str) -> bool:
        with self._cond:
            req = self._requests.get(request_id)
            if req is None:
                return False
            req.aborted = True
        try:
            self._send(("abort", request_id))
        except (OSError, EOFError, ValueError):
            pass  # the child is gone: its reader has failed the request already, or will
        return True

    async def prompt_logprobs(self, prompt_ids: Sequence[int], k: int) -> list[TokenLogprob]:
        ids = self.check_prompt(prompt_ids, scoring=True)
        self._check_open()
        fut: concurrent.futures.Future = concurrent.futures.Future()
        # Running: a caller cancelled meanwhile leaves it to be set, unread. A cancelled one made the reader's
        # set_result raise, and the reader then stopped the engine process.
        fut.set_running_or_notify_cancel()
        call = next(self._call_ids)
        self._calls[call] = fut
        try:
            self._send(("logprobs", call, ids, k))
        except (OSError, EOFError, ValueError):
            self._calls.pop(call, None)
            raise EngineError("the engine process is gone") from None
        return await asyncio.wrap_future(fut)

    def _read(self) -> None:
        """Deliver the child's messages until the pipe closes; then fail whatever is still in flight."""
        try:
            while True:
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    break
                if msg[0] == "out":
                    self._stats = msg[2]
                    self._deliver(msg[1])
                elif msg[0] == "logprobs":
                    fut = self._calls.pop(msg[1], None)
                    if fut is not None:
                        fut.set_result(msg[2]) if msg[3] is None else fut.set_exception(_decode(msg[3]))
                elif msg[0] == "bye":
                    self._stats = msg[1]
                elif msg[0] == "dead":  # the child's worker died (its requests failed just before): stop it
                    log.error("the engine process's worker failed: %s", msg[1])
                    with self._cond:
                        self._failure = f"the engine process failed: {msg[1]}"
                        self._closed = True
                    try:
                        self._send(("stop",))
                    except (OSError, EOFError, ValueError):
                        pass
        except Exception:  # a bug here must not leave every request waiting forever: end the engine instead
            log.exception("reading the engine process's messages failed; stopping it")
            self._kill()
        with self._cond:
            died = not self._closed  # not stopped by `shutdown` (nor after its worker's failure): it died
            self._closed = True  # later requests are refused from now on
            if died:
                self._failure = "the engine process died"
        self._wait_exit(30)
        with self._cond:
            if died:
                self._failure = f"the engine process died (exit code {self.exitcode})"
            left = list(self._requests.values())
            for req in left:
                self._finish(req, "error")
        if left or self._failure is not None:
            log.error("the engine process ended (exit code %s) with %d requests in flight", self.exitcode,
                      len(left))

        def error() -> Exception:  # one per request: each is raised in its own task
            return EngineClosedError("the engine was shut down") if self._failure is None else \
                EngineError(self._failure)

        self._post_all([(req, error()) for req in left])
        for fut in list(self._calls.values()):
            fut.set_exception(error())
        self._calls.clear()

    def _deliver(self, msgs: list[tuple[str, object]]) -> None:
        out: list[tuple[_Request, object]] = []
        for rid, payload in msgs:
            req = self._requests.get(rid)
            if req is None:
                continue
            item = _decode(payload)
            if req.detached is not None and isinstance(item, StreamDelta):
                item.text = req.detached.take(item.token_ids, item.finish_reason)
            out.append((req, item))
            if item is _END:
                with self._cond:
                    self._finish(req, req.finish_reason or "abort")
            elif isinstance(item, BaseException):  # the request's stream ends with it (no end marker follows)
                with self._cond:
                    self._finish(req, "error")
            elif item.finish_reason is not None:
                req.finish_reason = item.finish_reason
        AsyncEngine._post_all(out)

    # ----- state the child reports -----

    @property
    def is_running(self) -> bool:
        return not self._closed and self._wait_exit(0) is None

    @property
    def num_running(self) -> int:
        return self._stats[0]

    @property
    def num_waiting(self) -> int:
        return self._stats[1]

    @property
    def num_preempted(self) -> int:
        return self._stats[2]

    def kv_cache_usage(self) -> float | None:
        return self._stats[3]

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the child (its requests end with EngineClosedError) and wait for it, killing it after
        `timeout` seconds."""
        with self._cond:
            if self._closed and self._wait_exit(0) is not None:
                return
            self._closed = True
        try:
            self._send(("stop",))
        except (OSError, EOFError, ValueError):
            pass
        if self._wait_exit(timeout) is None:
            log.warning("the engine process did not stop within %s s: killed", timeout)
            self._kill()
        if threading.current_thread() is not self._reader:
            self._reader.join(timeout)
