"""OpenAI-compatible serving: `AsyncEngine` (batched generation behind asyncio), `create_app` (FastAPI)
and `serve` (load a checkpoint and run uvicorn; what `cpm4 serve` calls).

FastAPI and uvicorn are imported only when `create_app` / `serve` are used, so the engine works without them; the
engines (and torch) only when used, so building the `cpm4` command line's parser (which adds `serve` and `bench`
from `cpm4.serve.cli`) imports no torch: `cpm4 --help` and the data commands start in a fraction of a second.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .engine import AsyncEngine
    from .engine_proc import ProcessEngine

__all__ = ["AsyncEngine", "ProcessEngine", "create_app", "default_cpu_threads", "default_engine_process", "load_app",
           "load_engine", "serve"]


def __getattr__(name: str) -> Any:
    if name == "AsyncEngine":
        from .engine import AsyncEngine

        return AsyncEngine
    if name == "ProcessEngine":
        from .engine_proc import ProcessEngine

        return ProcessEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_app(engine_or_llm: Any, model_name: str | Sequence[str], api_key: str | None = None,
               **options: Any) -> FastAPI:
    """See `cpm4.serve.api.create_app` (imported here on first use, with FastAPI)."""
    from .api import create_app as _create_app

    return _create_app(engine_or_llm, model_name, api_key, **options)


def default_cpu_threads(device: Any) -> int | None:
    """The server engine's torch threads: on the CPU all cores but one (None elsewhere: torch's). The engine
    computes on its own thread; with every core in torch's pool it competed with the event loop and the main
    thread's idle pool (demo model, 2 cores: 88 -> 166 tok/s for one stream, 425 -> 559 for eight)."""
    import torch

    if torch.device(device).type != "cpu":
        return None
    return max(1, torch.get_num_threads() - 1)


def default_engine_process(device: Any) -> bool:
    """Whether `serve` puts the engine in a child process by default: on CUDA, where the GPU step is short and the
    host work per step and per streamed chunk is what limits many streams (H200, 0.5B shape, 64 streams over HTTP:
    14.2x batch 1 in a child process against 10.3x in a thread). On the CPU the engine's torch threads already use
    the cores the HTTP side would get."""
    return device.type == "cuda"


def serve(model_dir: str | os.PathLike, host: str = "127.0.0.1", port: int = 8000, *, log_level: str = "info",
          access_log: bool = True, ssl_keyfile: str | None = None, ssl_certfile: str | None = None,
          ssl_ca_certs: str | None = None, root_path: str = "", **options: Any) -> None:
    """Load `model_dir` (`load_app`, with its keyword `options`) and serve it over HTTP on host:port until
    interrupted. The port is taken before the model loads (as vLLM's): one in use is an OSError at once, not after
    the load. log_level / access_log: uvicorn's. ssl_keyfile + ssl_certfile: HTTPS (ssl_ca_certs: the CAs whose
    client certificates are accepted); root_path: the path prefix a reverse proxy serves the API under (vLLM's
    options, uvicorn's meaning)."""
    if (ssl_keyfile is None) != (ssl_certfile is None):
        raise ValueError("HTTPS needs both ssl_keyfile and ssl_certfile (--ssl-keyfile, --ssl-certfile)")
    for name, f in (("ssl_keyfile", ssl_keyfile), ("ssl_certfile", ssl_certfile), ("ssl_ca_certs", ssl_ca_certs)):
        if f is not None and not os.path.isfile(f):
            raise FileNotFoundError(f"{name}: no file {f}")
    if ssl_certfile is not None:
        _check_tls(ssl_certfile, ssl_keyfile, ssl_ca_certs)
    tls = {k: v for k, v in (("ssl_keyfile", ssl_keyfile), ("ssl_certfile", ssl_certfile),
                             ("ssl_ca_certs", ssl_ca_certs)) if v is not None}
    try:
        import uvicorn  # noqa: F401  (checked here, used in _run_server)
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("serving needs fastapi and uvicorn: pip install 'cpm4[serve]'") from e
    # The socket is taken before the load (closed however serving ends); SIGTERM stops as Ctrl-C does.
    with _listen(host, port) as sock, _sigterm_as_interrupt():
        app, engine = load_app(model_dir, **options)
        try:
            # A short graceful period, then the engine stops and ends the requests still running with its error;
            # uvicorn's own timeout (it cancels them mid-response) is a backstop only.
            _run_server(app, sock=sock, host=host, port=port, log_level=log_level, stop_engine=engine.shutdown,
                        grace=5.0, timeout_graceful_shutdown=20, access_log=access_log, root_path=root_path, **tls)
        finally:
            engine.shutdown()


def _check_tls(certfile: str, keyfile: str | None, ca_certs: str | None) -> None:
    """Load the HTTPS files as uvicorn will, before the model: a key that is not the certificate's, or a file that
    is no PEM, failed after the load as "[SSL] PEM lib (_ssl.c:...)", naming no file. An encrypted key is left to
    uvicorn (it asks for the password)."""
    import ssl

    class _Encrypted(Exception):
        pass

    def password() -> bytes:
        raise _Encrypted

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        ctx.load_cert_chain(certfile, keyfile, password=password)
    except _Encrypted:
        pass
    except ssl.SSLError as e:
        raise ValueError(f"cannot use --ssl-certfile {certfile} with --ssl-keyfile {keyfile}: {e} (both PEM files, the "
                         "key the certificate's own)") from None
    if ca_certs is not None:
        try:
            ctx.load_verify_locations(ca_certs)
        except ssl.SSLError as e:
            raise ValueError(f"cannot use --ssl-ca-certs {ca_certs}: {e} (PEM certificates)") from None


def load_app(model_dir: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
             api_key: str | None = None, model_name: str | Sequence[str] | None = None, max_batch_size: int = 16,
             kv_cache_tokens: int | None = None, chunk_tokens: int | None = None,
             gpu_memory_utilization: float | None = None, cuda_graphs: bool | None = None, compile: bool = False,
             async_output: bool | None = None, max_model_len: int | None = None, chat_template: str | None = None,
             log_stats_interval: float | None = 10.0, cpu_threads: int | None = None,
             generation_config: str | None = "auto", reasoning_parser: str | None = None,
             allowed_origins: list[str] | None = None, engine_process: bool | None = None,
             revision: str | None = None, enable_prefix_caching: bool = True,
             cascade_decode: bool | None = None, scheduling_policy: str = "fcfs",
             tokenizer: str | os.PathLike | None = None, log_requests: bool = False,
             max_log_len: int | None = None, seed: int | None = None, max_logprobs: int | None = None,
             return_tokens_as_token_ids: bool = False, fastapi_docs: bool = True) -> tuple[FastAPI, AsyncEngine]:
    """Load `model_dir` (a checkpoint folder, or a Hugging Face Hub model id fetched at `revision`) into a running
    engine and the FastAPI app over it: what `serve` runs under uvicorn and `cpm4 run-batch` calls in-process. The
    caller shuts the engine down. `model_name` defaults to the folder name (a Hub id: the id, as vLLM names it);
    several names (vLLM's `--served-model-name a b`): responses carry the first, requests may name any;
    `chat_template` (a Jinja file or the template text) replaces the checkpoint's; every `log_stats_interval`
    seconds of activity a throughput line goes to stderr (None or 0: never). cpu_threads: torch's threads for
    the engine; on the CPU by default all cores but one, which the HTTP event loop keeps. generation_config:
    where unset request fields take their defaults from ("auto": the checkpoint's generation_config.json,
    "vllm": none, or a folder or file; see `cpm4.engine.generation_config`). reasoning_parser: "minicpm4"
    returns the `<think>` block of chat output as `reasoning_content` (`cpm4.serve.reasoning`).
    allowed_origins: browser origins allowed to call the API (CORS; default none). engine_process: run the model
    in a child process (`ProcessEngine`), so HTTP work and the engine's host work do not share one GIL; None:
    `default_engine_process` (on CUDA). enable_prefix_caching: share cached prompt prefixes between requests
    (vLLM's option; on). cascade_decode: decode steps read the prefix pages many requests share once per tile of
    rows (see `LLMEngine`; None: on). scheduling_policy: "fcfs", or "priority" (requests' `priority` field, lower
    first; see `LLMEngine`), as vLLM's --scheduling-policy. tokenizer: a folder or Hub id whose tokenizer (and chat
    template) is used instead of the checkpoint's (vLLM's --tokenizer; the checkpoint then needs none).
    log_requests, max_log_len: a log line per engine request; seed, max_logprobs, return_tokens_as_token_ids,
    fastapi_docs: vLLM's server options of those names (`create_app`)."""
    from cpm4.engine.params import check_scheduling_policy

    from .reasoning import check_reasoning_parser

    check_reasoning_parser(reasoning_parser)  # before the model loads
    check_scheduling_policy(scheduling_policy)
    names = [model_name] if isinstance(model_name, str) else list(model_name or ())
    if any(not isinstance(n, str) or not n for n in names):
        raise ValueError(f"served model names must be non-empty strings, got {names!r}")
    try:
        import fastapi  # noqa: F401  (used by create_app)
    except ImportError as e:  # an optional dependency: say how to get it
        raise ImportError("serving needs fastapi and uvicorn: pip install 'cpm4[serve]'") from e
    given = str(model_dir)
    model_dir, defaults = checked_model(model_dir, revision, chat_template, generation_config)
    from_hub = model_dir != Path(given).expanduser()
    engine = load_engine(model_dir, device=device, dtype=dtype, tokenizer=tokenizer, chat_template=chat_template,
                         engine_process=engine_process, cpu_threads=cpu_threads, max_batch_size=max_batch_size,
                         kv_cache_tokens=kv_cache_tokens, chunk_tokens=chunk_tokens,
                         gpu_memory_utilization=gpu_memory_utilization, cuda_graphs=cuda_graphs, compile=compile,
                         async_output=async_output, max_model_len=max_model_len,
                         enable_prefix_caching=enable_prefix_caching, cascade_decode=cascade_decode,
                         scheduling_policy=scheduling_policy)
    try:
        names = names or [given if from_hub else model_dir.name or given]
        if log_stats_interval or log_requests:
            stats_log = logging.getLogger("cpm4.serve")
            if not stats_log.handlers:  # uvicorn configures its own loggers only
                handler = logging.StreamHandler()
                handler.setFormatter(logging.Formatter("INFO:     %(message)s"))
                stats_log.addHandler(handler)
                stats_log.setLevel(logging.INFO)
        if defaults:  # as vLLM says it: a user who expected SamplingParams' defaults learns why not
            logging.getLogger("cpm4.serve").warning(
                "default sampling parameters from the model's generation config: %s (--generation-config vllm: "
                "none)", defaults)
        app = create_app(engine, names, api_key=api_key, log_stats_interval=log_stats_interval or None,
                         sampling_defaults=defaults, reasoning_parser=reasoning_parser,
                         allowed_origins=allowed_origins, log_requests=log_requests, max_log_len=max_log_len,
                         seed=seed, max_logprobs=max_logprobs, return_tokens_as_token_ids=return_tokens_as_token_ids,
                         fastapi_docs=fastapi_docs)
    except BaseException:
        engine.shutdown()
        raise
    return app, engine


def checked_model(model: str | os.PathLike, revision: str | None, chat_template: str | None,
                  generation_config: str | os.PathLike | None) -> tuple[Path, dict[str, Any]]:
    """The model's folder (a Hub id fetched at `revision`) and the sampling defaults its generation config gives,
    with the missing or bad files said before torch loads: the model, the chat template (read again where it is
    set: a small file, once), then the generation config and its values. What `load_app` and `AsyncLLM` check
    first."""
    from cpm4.engine.generation_config import sampling_defaults
    from cpm4.model.hub import resolve_model_dir
    from cpm4.model.tokenizer import chat_template_text

    folder = resolve_model_dir(model, revision)
    if chat_template is not None:
        chat_template_text(chat_template)
    return folder, sampling_defaults(generation_config, folder)


def load_engine(model_dir: str | os.PathLike, *, device: str | None = None, dtype: str | None = None,
                tokenizer: str | os.PathLike | None = None, chat_template: str | None = None,
                engine_process: bool | None = None, cpu_threads: int | None = None,
                **options: Any) -> AsyncEngine:
    """Load the checkpoint folder `model_dir` into a running engine for asyncio code: an `AsyncEngine` (the model
    on a worker thread) or, with engine_process (None: `default_engine_process`, i.e. on CUDA), a `ProcessEngine`
    (the model in a child process). What `load_app` serves and `cpm4.AsyncLLM` wraps. tokenizer: a folder or Hub
    id whose tokenizer is used instead of the checkpoint's (found before the weights load); chat_template: replaces
    the checkpoint's; cpu_threads: the engine's torch threads (on the CPU by default all cores but one);
    options: `AsyncEngine`'s (max_batch_size, kv_cache_tokens, chunk_tokens, gpu_memory_utilization, ...)."""
    from cpm4.devices import resolve_device
    from cpm4.llm import load_model
    from cpm4.model.hub import resolve_model_dir
    from cpm4.model.tokenizer import Tokenizer

    from .engine import AsyncEngine

    model_dir = Path(model_dir)
    tokenizer_dir = resolve_model_dir(tokenizer) if tokenizer is not None else None
    own_tokenizer = Tokenizer.from_dir(tokenizer_dir) if tokenizer_dir is not None else None  # said before the load
    if engine_process is None:
        engine_process = default_engine_process(resolve_device(device))
    if engine_process:
        from .engine_proc import ProcessEngine

        if cpu_threads is None:
            cpu_threads = default_cpu_threads(resolve_device(device))
        tok = own_tokenizer
        if chat_template is not None:
            tok = tok or Tokenizer.from_dir(model_dir)
            tok.set_chat_template(chat_template)
        return ProcessEngine(model_dir, device=device, dtype=dtype, tokenizer=tok, tokenizer_dir=tokenizer_dir,
                             cpu_threads=cpu_threads, **options)
    # The model alone (an `LLM` would build an engine of its own on CUDA); max_model_len checked before the weights
    # are read.
    model, tok = load_model(model_dir, device, dtype, options.get("max_model_len"), own_tokenizer)
    if cpu_threads is None:
        cpu_threads = default_cpu_threads(model.device)
    if chat_template is not None:
        tok.set_chat_template(chat_template)
    return AsyncEngine(model, tok, cpu_threads=cpu_threads, **options)


def _listen(host: str, port: int):
    """A socket bound to host:port (uvicorn's options: reusable address, inheritable); OSError naming both."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.set_inheritable(True)
    return sock


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (kill, docker stop, Kubernetes) handled as Ctrl-C (in the main thread): a load stops and its engine
    process with it; serving ends with uvicorn's graceful shutdown, the engine's shutdown and exit 0. (uvicorn
    re-raises the signal once shut down: SIGTERM's default action then ended the process, exit -15, and the
    engine was never shut down.)"""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_server(app: Any, *, sock: Any, stop_engine: Callable[[], None] | None = None, grace: float = 5.0,
                **config: Any) -> None:
    """uvicorn on the socket `serve` took before loading (`config`: uvicorn.Config's options), until stopped.
    stop_engine: called when requests still run `grace` seconds into the shutdown (at once on a second Ctrl-C):
    they then end with the engine's error (a 503; in a stream an error event, then [DONE]), where uvicorn's
    timeout cancelled them mid-response (a text "Internal Server Error", a cut stream, a traceback each)."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: Any = None) -> None:
            stopper = asyncio.create_task(self._stop_engine()) if stop_engine is not None else None
            try:
                await super().shutdown(sockets)
                if stopper is not None and self.force_exit:  # uvicorn waits no more: the requests end now
                    await stopper
            finally:
                if stopper is not None:
                    stopper.cancel()

        async def _stop_engine(self) -> None:
            loop = asyncio.get_running_loop()
            end = loop.time() + grace
            while self.server_state.tasks and loop.time() < end and not self.force_exit:
                await asyncio.sleep(0.1)
            if not self.server_state.tasks:
                return
            try:
                await asyncio.to_thread(stop_engine)
            except Exception:  # noqa: BLE001 - uvicorn's timeout still ends the requests
                logging.getLogger("cpm4.serve").exception("stopping the engine failed")
            end = loop.time() + 5
            while self.server_state.tasks and loop.time() < end:  # their error responses go out
                await asyncio.sleep(0.05)

    cfg = uvicorn.Config(app, **config)  # (configures uvicorn's loggers)
    host, port = sock.getsockname()[:2]
    # uvicorn says where it listens only when it binds the socket itself; the real port (for --port 0)
    logging.getLogger("uvicorn.error").info("Uvicorn running on %s://%s:%d (Press CTRL+C to quit)",
                                            "https" if config.get("ssl_certfile") else "http",
                                            f"[{host}]" if ":" in host else host, port)
    try:
        Server(cfg).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C after a clean shutdown (uvicorn re-raises it): exit 0, as uvicorn.run does
        pass
