"""`cpm4 serve`: the argparse subcommand. `cpm4/cli.py` registers it with `add_serve_command(sub)`."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator

from cpm4.cli import DEFAULT_MODEL, add_max_model_len_arg, bounded, device_arg, dtype_arg
from cpm4.cli import positive_int as _positive


def _model(args: argparse.Namespace) -> str:
    tag = getattr(args, "model_tag", None)
    if tag and args.model and tag != args.model:
        raise ValueError(f"two models given: {tag} and --model {args.model}")
    return tag or args.model or DEFAULT_MODEL


def engine_options(args: argparse.Namespace) -> dict:
    """`load_app`'s keyword options from the arguments `add_engine_args` added (serve and run-batch)."""
    return dict(device=args.device, dtype=args.dtype, model_name=args.served_model_name,
                max_batch_size=args.max_batch_size, kv_cache_tokens=args.kv_cache_tokens,
                chunk_tokens=args.chunk_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
                cuda_graphs=False if args.enforce_eager else None, compile=args.compile,
                async_output=args.async_output, max_model_len=args.max_model_len, chat_template=args.chat_template,
                cpu_threads=args.cpu_threads, generation_config=args.generation_config,
                reasoning_parser=args.reasoning_parser, engine_process=args.engine_process, revision=args.revision,
                enable_prefix_caching=args.enable_prefix_caching, cascade_decode=args.cascade_decode,
                scheduling_policy=args.scheduling_policy, tokenizer=args.tokenizer,
                log_requests=args.enable_log_requests, max_log_len=args.max_log_len, seed=args.seed,
                max_logprobs=args.max_logprobs, return_tokens_as_token_ids=args.return_tokens_as_token_ids)


def cmd_serve(args: argparse.Namespace) -> int:
    from . import serve

    args.model = _model(args)
    if args.api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"[cpm4] warning: serving on {args.host} without an API key", file=sys.stderr)
    serve(args.model, host=args.host, port=args.port, api_key=args.api_key,
          log_stats_interval=0 if args.disable_log_stats else args.log_stats_interval,
          allowed_origins=[o for group in args.allowed_origins for o in group] if args.allowed_origins else None,
          log_level=args.uvicorn_log_level, access_log=not args.disable_uvicorn_access_log,
          ssl_keyfile=args.ssl_keyfile, ssl_certfile=args.ssl_certfile, ssl_ca_certs=args.ssl_ca_certs,
          root_path=args.root_path, fastapi_docs=not args.disable_fastapi_docs, **engine_options(args))
    return 0


def _origins(text: str) -> list[str]:
    """An origin, or vLLM's spelling of the option's value: a JSON list of them ('["http://a"]' was taken as one
    origin named so, which no browser sends: every origin was refused)."""
    import json

    if not text.startswith("["):
        return [text]
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(o, str) and o for o in value):
        raise argparse.ArgumentTypeError(f"not an origin nor a JSON list of origins: {text!r}")
    return value


def _api_key(text: str) -> str:
    if not text:  # an empty key would leave the server open while the command line says otherwise
        raise argparse.ArgumentTypeError("the API key is empty")
    return text


def _only(*taken: str, why: str) -> Callable[[str], str]:
    """An argparse type for a vLLM engine option cpm4 has no counterpart of: the values that would change nothing
    here (vLLM's defaults, one device) are taken so vLLM's command lines run; any other is a usage error that
    says why, naming the option (it was "unrecognized arguments", which does not say whether cpm4 ignores the
    value, lacks the feature, or spells it otherwise)."""
    def parse(text: str) -> str:
        if text.lower() in taken:
            return text
        if not taken:
            raise argparse.ArgumentTypeError(f"not available: {why} (got {text!r})")
        raise argparse.ArgumentTypeError(f"{why}: only {' or '.join(taken)} is taken, got {text!r}")
    return parse


def _max_logprobs(text: str) -> int:
    from .protocol import MAX_LOGPROBS

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 0 <= value <= MAX_LOGPROBS:  # vLLM's -1 (the whole vocabulary) too: the requests' fields stop at 20
        raise argparse.ArgumentTypeError(f"cpm4 returns at most {MAX_LOGPROBS} logprobs per token: expected an "
                                         f"integer in [0, {MAX_LOGPROBS}], got {text!r}")
    return value


_ONE_DEVICE = "cpm4 runs a model on one device (no tensor, pipeline or data parallelism)"
_non_negative = bounded(float, "a number >= 0", 0)
_count = bounded(int, "an integer >= 0", 0)
# uvicorn would take 70000 modulo 65536 and print 70000
_port = bounded(int, "a TCP port in [0, 65535]", 0, 65535)
_fraction = bounded(float, "a number in (0, 1]", 0, 1, low_open=True)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """The model and engine options `serve` and `run-batch` share (read back by `engine_options`)."""
    p.add_argument("--model", "-m", default=None,
                   help="checkpoint folder in Hugging Face layout, or a Hugging Face Hub model id (fetched once into "
                   "the HF cache; HF_HUB_OFFLINE=1: the cache only; default: the bundled demo model)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model id (default: main)")
    p.add_argument("--tokenizer", default=None,
                   help="a folder or Hub id whose tokenizer and chat template are used instead of the model's "
                   "(vLLM's option; the model folder then needs no tokenizer files)")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", type=dtype_arg, default="auto", help="float32, bfloat16, float16 (default: by device)")
    p.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                   help="model ids clients use, as vLLM's: the first is the one responses carry, requests may name "
                   "any, /v1/models lists all (default: the folder name, or the Hub id)")
    p.add_argument("--max-batch-size", "--max-num-seqs", type=_positive, default=16,
                   help="requests generated together at most")
    p.add_argument("--kv-cache-tokens", type=_positive, default=None,
                   help="paged KV cache size in tokens (default on CUDA: from --gpu-memory-utilization; "
                   "elsewhere max batch size x min(context, 8192))")
    p.add_argument("--gpu-memory-utilization", type=_fraction, default=None,
                   help="share of the GPU's memory cpm4 may use, weights + activations + KV cache (default 0.9)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="no CUDA graphs (decode steps, and the prefill steps' pieces between attention calls)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decode step inside its CUDA graphs (faster decode, slower start)")
    p.add_argument("--async-output", action=argparse.BooleanOptionalAction, default=None,
                   help="launch each decode step before reading back the previous one's tokens, so host work "
                   "overlaps the GPU (default: on with CUDA graphs)")
    p.add_argument("--chunk-tokens", "--max-num-batched-tokens", type=_positive, default=None,
                   help="prompt tokens prefilled per scheduler step (default: 8192 on a GPU of 70 GiB or more, "
                   "2048 on a smaller one, 512 on the CPU)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="requests reuse the KV pages of a cached prompt prefix (default: on; "
                   "--no-enable-prefix-caching computes every prompt whole, as vLLM's flag)")
    p.add_argument("--cascade-decode", action=argparse.BooleanOptionalAction, default=None,
                   help="decode steps read the prefix pages many requests share (a system prompt) once per tile of "
                   "rows, where that saves enough reads (default: on; off with --compile)")
    p.add_argument("--scheduling-policy", choices=["fcfs", "priority"], default="fcfs",
                   help="fcfs: requests start in arrival order; priority: by their `priority` field (lower first, "
                   "then arrival), and under KV pressure the lowest priority is preempted first (vLLM's option)")
    add_max_model_len_arg(p)
    p.add_argument("--chat-template", default=None,
                   help="a Jinja chat template (file, or the template text) instead of the checkpoint's")
    p.add_argument("--cpu-threads", type=_positive, default=None,
                   help="torch threads for the engine on the CPU (default: all cores but one, for the HTTP loop)")
    p.add_argument("--generation-config", default="auto",
                   help="defaults for the sampling fields a request leaves unset: auto (the checkpoint's "
                   "generation_config.json: temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), "
                   "vllm (none), or a folder or file with a generation_config.json")
    p.add_argument("--reasoning-parser", choices=["minicpm4"], default=None,
                   help="return the <think> block of chat output (MiniCPM4.1's thinking mode) as "
                   "reasoning_content, streamed as delta.reasoning_content (default: left in the content)")
    p.add_argument("--engine-process", action=argparse.BooleanOptionalAction, default=None,
                   help="run the model in a child process, as vLLM's engine core: the HTTP side's work per "
                   "streamed chunk and the engine's host work per step then run in parallel instead of sharing "
                   "one GIL (default: on with CUDA, off on the CPU; --no-engine-process: a thread)")
    p.add_argument("--enable-auto-tool-choice", action="store_true",
                   help="accepted for vLLM's command lines: cpm4 always turns MiniCPM4's <|tool_call|> lines into "
                   "tool_calls when a request gives tools")
    p.add_argument("--tool-call-parser", choices=["minicpm4", "minicpm"], default=None,
                   help="accepted for vLLM's command lines: MiniCPM4's tool-call format is the one parsed")
    p.add_argument("--enable-log-requests", action="store_true",
                   help="log each request: its id, prompt (text and ids) and sampling params (vLLM's option)")
    p.add_argument("--disable-log-requests", action="store_true",
                   help="accepted for older vLLM command lines (requests are not logged unless enabled)")
    p.add_argument("--max-log-len", type=_positive, default=None,
                   help="with --enable-log-requests: at most this many prompt characters and ids per line")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="accepted for vLLM's command lines; cpm4 runs MiniCPM4 with its own code, no checkpoint code")
    p.add_argument("--seed", type=int, default=None,
                   help="vLLM's engine seed: requests without a `seed` field draw theirs from a generator seeded "
                   "with this, so a run's requests, sent in the same order, sample the same (default: unseeded)")
    p.add_argument("--response-role", type=_only("assistant", why="chat replies carry the role assistant"),
                   default="assistant", help="vLLM's option, taken at its default only")
    p.add_argument("--max-logprobs", type=_max_logprobs, default=None,
                   help="most logprobs / top_logprobs a request may ask for, at most 20 (vLLM's option; default 20)")
    p.add_argument("--return-tokens-as-token-ids", action="store_true",
                   help="logprobs name tokens as 'token_id:ID' unless a request says otherwise (vLLM's option; the "
                   "request field of that name does it per request)")
    add_vllm_engine_args(p)


def add_vllm_engine_args(p: argparse.ArgumentParser) -> None:
    """vLLM engine options with no counterpart in cpm4, taken so that a vLLM command line runs unchanged where its
    value changes nothing here, and refused naming the option and why where it would (`_only`)."""
    g = p.add_argument_group("vLLM options with nothing to do in cpm4 (values that change nothing are taken)")
    g.add_argument("--tensor-parallel-size", "-tp", type=_only("1", why=_ONE_DEVICE), default="1")
    g.add_argument("--pipeline-parallel-size", "-pp", type=_only("1", why=_ONE_DEVICE), default="1")
    g.add_argument("--data-parallel-size", "-dp", type=_only("1", why=_ONE_DEVICE), default="1")
    g.add_argument("--distributed-executor-backend", default=None, help="ignored (one process, one device)")
    g.add_argument("--quantization", "-q", type=_only(why="cpm4 runs the checkpoint's unquantized weights "
                                                      "(--dtype float32, bfloat16 or float16)"), default=None)
    g.add_argument("--kv-cache-dtype", type=_only("auto", why="the KV cache is kept in the model's dtype"),
                   default="auto")
    g.add_argument("--load-format", type=_only("auto", "safetensors", why="cpm4 reads safetensors checkpoints"),
                   default="auto")
    g.add_argument("--tokenizer-mode", type=_only("auto", "hf", why="cpm4 loads the checkpoint's Hugging Face "
                                                  "tokenizer"), default="auto")
    g.add_argument("--cpu-offload-gb", type=_only("0", why="cpm4 keeps all weights on the device"), default="0")
    g.add_argument("--enable-chunked-prefill", action=argparse.BooleanOptionalAction, default=None,
                   help="ignored: prompts are always prefilled in chunks of --max-num-batched-tokens")
    g.add_argument("--block-size", type=_positive, default=None,
                   help="ignored: KV pages are 64 tokens, InfLLM v2's block")
    g.add_argument("--swap-space", type=_non_negative, default=None,
                   help="ignored: a preempted request is recomputed, not swapped to host memory")
    g.add_argument("--max-seq-len-to-capture", type=_positive, default=None,
                   help="ignored: decode CUDA graphs cover every sequence length")
    g.add_argument("--disable-custom-all-reduce", action="store_true", help="ignored (one device)")


def add_serve_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `serve` subcommand (OpenAI-compatible HTTP server) to a `cpm4` subparsers object."""
    p = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/chat/completions, ...)")
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as vLLM's `vllm serve MODEL` (the same as --model)")
    add_engine_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback only)")
    p.add_argument("--port", type=_port, default=8000)
    # From the environment by default so the key need not appear in the process list.
    p.add_argument("--api-key", type=_api_key,
                   default=os.environ.get("CPM4_API_KEY") or os.environ.get("VLLM_API_KEY") or None,
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $CPM4_API_KEY, else vLLM's "
                   "$VLLM_API_KEY)")
    p.add_argument("--allowed-origins", nargs="+", type=_origins, default=None, metavar="ORIGIN",
                   help="browser origins allowed to call the API (CORS), e.g. http://localhost:3000, or '*' for any "
                   "(default: none, so web pages cannot reach the server)")
    p.add_argument("--log-stats-interval", type=_non_negative, default=10.0,
                   help="seconds between throughput lines while requests run (0: none)")
    p.add_argument("--disable-log-stats", action="store_true", help="no throughput lines (vLLM's option)")
    p.add_argument("--uvicorn-log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    p.add_argument("--disable-uvicorn-access-log", action="store_true", help="no line per HTTP request")
    p.add_argument("--ssl-keyfile", default=None, help="HTTPS: the server's private key (PEM; with --ssl-certfile)")
    p.add_argument("--ssl-certfile", default=None, help="HTTPS: the server's certificate chain (PEM)")
    p.add_argument("--ssl-ca-certs", default=None, help="HTTPS: CA certificates for client certificates")
    p.add_argument("--root-path", default="", help="the path prefix a reverse proxy serves the API under")
    p.add_argument("--disable-fastapi-docs", action="store_true",
                   help="no /docs, /redoc nor /openapi.json (vLLM's option)")
    p.set_defaults(func=cmd_serve)
    return p


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (`kill`, `timeout`, a scheduler, CI cancellation) as SystemExit(143) in the main thread, so the
    block's clean-ups run: its default action ended the process alone (temporary files, child processes left)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_run_batch(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from . import load_app
    from .batch import read_batch, run_batch

    for flag, name in (("-i", args.input_file), ("-o", args.output_file)):
        if "://" in str(name):  # vLLM's run-batch fetches and uploads URLs; a path would be made of one here
            raise ValueError(f"{flag} {name}: URLs are not supported: give a local file (download it first, or "
                             "upload the output after)")
    requests = read_batch(args.input_file)  # a malformed file said before the model loads
    out = Path(args.output_file)
    if out.is_dir():
        raise IsADirectoryError(f"the output file {out} is a directory")
    model = _model(args)
    options = engine_options(args)
    # Bodies name the model as given (vLLM's run-batch serves --model's text) or by its folder's name.
    options["model_name"] = options["model_name"] or list(dict.fromkeys([model, Path(model).name or model]))
    with _sigterm_exits():  # the clean-ups run: the temporary output removed, the engine and its process stopped
        app, engine = load_app(model, log_stats_interval=0, **options)
        try:
            limit = args.max_concurrency or 2 * args.max_batch_size  # vLLM's: twice the batch, so it stays full
            counts = asyncio.run(run_batch(app, requests, out, max_concurrency=limit,
                                           progress=not args.no_progress))
        finally:
            engine.shutdown()
    print(f"[cpm4] {counts['total']} requests: {counts['completed']} answered, {counts['failed']} failed; wrote "
          f"{out}", file=sys.stderr)
    return 0


def add_run_batch_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `run-batch` (an OpenAI Batch API JSONL file run offline, as vLLM's) to a `cpm4` subparsers object."""
    p = subparsers.add_parser("run-batch", help="answer a JSONL file of OpenAI batch requests offline (as vLLM's "
                              "run-batch)")
    p.add_argument("-i", "--input-file", required=True,
                   help="JSONL, a request a line: {\"custom_id\", \"method\": \"POST\", \"url\": "
                   "\"/v1/chat/completions\" (or /v1/completions, /v1/responses), \"body\": {...}}")
    p.add_argument("-o", "--output-file", required=True,
                   help="JSONL, an answer a line in the input's order: {\"id\", \"custom_id\", \"response\": "
                   "{\"status_code\", \"request_id\", \"body\"}, \"error\"} (written whole at the end)")
    add_engine_args(p)
    p.add_argument("--max-concurrency", type=_positive, default=None,
                   help="requests in flight at most (default: twice --max-batch-size)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run_batch)
    return p


def cmd_bench_serve(args: argparse.Namespace) -> int:
    import json
    import math
    import urllib.error
    import urllib.request

    from .bench import default_client_processes, format_summary, random_requests, run_clients, summarize

    # vLLM's bench names the server by --host/--port unless --base-url is given
    base = (args.base_url or f"http://{_url_host(args.host)}:{args.port}").rstrip("/")
    if base.endswith("/v1"):
        base = base[:-3]
    key = args.api_key
    model = args.model
    cards: list = []
    req = urllib.request.Request(f"{base}/v1/models", headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            cards = json.load(r)["data"]
        if model is None:  # the server's first model, as vLLM's bench does
            model = cards[0]["id"]
    except (urllib.error.URLError, OSError, KeyError, IndexError, ValueError, TypeError) as e:
        if model is None:
            raise ValueError(f"cannot list the models of {base} (is a server running there?): {e}") from None
    if args.random_vocab is None:  # the served model's vocabulary (cpm4's cards say it), else 10000
        card = next((c for c in cards if isinstance(c, dict) and c.get("id") == model), {})
        vocab = card.get("vocab_size")
        args.random_vocab = min(vocab, 10000) if isinstance(vocab, int) and vocab > 0 else 10000
    rate = math.inf if args.request_rate in ("inf", None) else float(args.request_rate)
    reqs = random_requests(args.num_prompts, args.random_input_len, args.random_output_len, args.random_range_ratio,
                           args.random_vocab, rate, args.seed, args.random_prefix_len)
    warm = random_requests(args.num_warmups, 16, 4, vocab=args.random_vocab, seed=args.seed + 1) \
        if args.num_warmups else []
    processes = args.client_processes or default_client_processes()
    print(f"[cpm4] {len(reqs)} requests to {base} ({model}): input ~{args.random_input_len} (after a shared "
          f"prefix of {args.random_prefix_len}), output "
          f"~{args.random_output_len} tokens, rate {rate} req/s, {processes} client processes", file=sys.stderr)
    with _sigterm_exits():  # run_clients' clean-up stops the client processes
        rep = run_clients(base, model, reqs, warm, temperature=args.temperature, client=args.client,
                          processes=processes, max_concurrency=args.max_concurrency, api_key=key)
    s = summarize(rep, reqs)
    print(format_summary(s))
    if args.save_result or args.result_filename:
        from pathlib import Path

        from cpm4.model.config import write_text_atomic

        out = Path(args.result_dir or ".") / _result_name(args, model)
        out.parent.mkdir(parents=True, exist_ok=True)
        doc = {"base_url": base, "model": model, "num_prompts": args.num_prompts,
               "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
               "random_range_ratio": args.random_range_ratio, "random_prefix_len": args.random_prefix_len,
               "request_rate": args.request_rate,
               "max_concurrency": args.max_concurrency, "temperature": args.temperature, "seed": args.seed, **s}
        write_text_atomic(out, json.dumps(doc, indent=1))  # never a half-written result, nor a left temp file
        print(f"[cpm4] wrote {out}", file=sys.stderr)
    return 0 if s["failed"] == 0 else 1


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host  # an IPv6 address in a URL


def _result_name(args: argparse.Namespace, model: str) -> str:
    """--save-result FILE (cpm4's), else vLLM's --result-filename, else vLLM's default name for its bare
    --save-result: backend, rate, model and time."""
    if isinstance(args.save_result, str):
        return args.save_result
    if args.result_filename:
        return args.result_filename
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return f"{args.backend}-{args.request_rate}qps-{model.rsplit('/', 1)[-1]}-{stamp}.json"


def _rate(text: str) -> str:
    if text == "inf":
        return text
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected requests per second or 'inf', got {text!r}") from None
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a rate > 0, got {v}")
    return text


def add_bench_command(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench serve` (load-test a running OpenAI-compatible server) to a `cpm4` subparsers object."""
    p = subparsers.add_parser("bench", help="benchmarks (serve: load-test a running server)")
    sub = p.add_subparsers(dest="bench_command", required=True)
    q = sub.add_parser("serve", help="stream random token-id prompts to a running OpenAI-compatible server and "
                       "report throughput, TTFT, TPOT, inter-token latency (as vLLM's bench serve)")
    q.add_argument("--base-url", default=None,
                   help="the server (with or without /v1; default: http://HOST:PORT)")
    q.add_argument("--host", default="127.0.0.1", help="the server's host, without --base-url (vLLM's option)")
    q.add_argument("--port", type=_port, default=8000, help="the server's port, without --base-url (vLLM's option)")
    q.add_argument("--model", default=None, help="model id (default: the server's first in /v1/models)")
    q.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY") or os.environ.get("CPM4_API_KEY"),
                   help="bearer key (default: $OPENAI_API_KEY or $CPM4_API_KEY)")
    q.add_argument("--num-prompts", type=_positive, default=64)
    q.add_argument("--random-input-len", type=_positive, default=512, help="prompt tokens (random ids)")
    q.add_argument("--random-prefix-len", type=_count, default=0,
                   help="random ids shared by every prompt, before its own --random-input-len (a system prompt)")
    q.add_argument("--random-output-len", type=_positive, default=128, help="tokens generated (ignore_eos)")
    q.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="lengths drawn uniformly within this fraction of the above (0: exact)")
    q.add_argument("--random-vocab", type=_positive, default=None,
                   help="prompt ids are drawn from [0, this) (default: the served model's vocabulary, at most 10000)")
    q.add_argument("--request-rate", type=_rate, default="inf",
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    q.add_argument("--max-concurrency", type=_positive, default=None, help="requests in flight at most")
    q.add_argument("--num-warmups", type=_count, default=0, help="short untimed requests first")
    q.add_argument("--temperature", type=float, default=0.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--client", choices=["openai", "httpx"], default="openai",
                   help="the official openai client, or httpx reading the events itself (less CPU per chunk)")
    q.add_argument("--client-processes", type=_positive, default=None,
                   help="processes the clients are spread over (default: half the cores, at most 8; one Python "
                   "process cannot parse the chunks of many fast streams in time)")
    q.add_argument("--save-result", nargs="?", const=True, default=None, metavar="FILE",
                   help="also write the figures as JSON, to FILE (bare, as vLLM's: --result-dir/--result-filename, "
                   "else a name from the backend, rate, model and time)")
    q.add_argument("--result-dir", default=None, help="the folder of the saved result (vLLM's option)")
    q.add_argument("--result-filename", default=None, help="the saved result's file name (vLLM's; implies saving)")
    # vLLM's workload options, at the values that are what this benchmark does
    q.add_argument("--backend", type=_only("vllm", "openai", why="the benchmark streams /v1/completions"),
                   default="vllm")
    q.add_argument("--endpoint", type=_only("/v1/completions", why="the benchmark streams /v1/completions"),
                   default="/v1/completions")
    q.add_argument("--dataset-name", type=_only("random", why="the prompts are random token ids "
                                                "(--random-input-len, --random-prefix-len)"), default="random")
    q.add_argument("--ignore-eos", action="store_true", help="taken: requests always ignore EOS")
    q.set_defaults(func=cmd_bench_serve)
    return p
