"""The `cpm4` command line: init, convert, generate, chat, serve, bench, data, pretrain, sft.

Exit codes: 0 success, 2 bad input (missing model folder, bad config, bad argument), 1 the output's reader went
away (a closed pipe), 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def default_model() -> str:
    """$CPM4_MODEL, else the demo model bundled in the repository (models/cpm4-demo), else ./demo-model."""
    env = os.environ.get("CPM4_MODEL")
    if env:
        return env
    bundled = Path(__file__).resolve().parents[1] / "models" / "cpm4-demo"
    return str(bundled) if (bundled / "config.json").is_file() else "demo-model"


DEFAULT_MODEL = default_model()


def device_arg(text: str) -> str:
    """An argparse type for --device: the name checked before torch is imported (`check_device_name`)."""
    from .devices import check_device_name

    try:
        return check_device_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def dtype_arg(text: str) -> str:
    """An argparse type for --dtype: "auto" or a dtype name, checked before torch is imported."""
    from .model.config import check_dtype_name

    try:
        return text if text == "auto" else check_dtype_name(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help="checkpoint folder in Hugging Face layout, or a Hugging Face Hub model id (fetched once into "
                   "the HF cache; HF_HUB_OFFLINE=1: the cache only)")
    p.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model id (default: main)")
    p.add_argument("--device", type=device_arg, default="auto",
                   help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--dtype", type=dtype_arg, default="auto", help="float32, bfloat16, float16 (default: by device)")


def _add_url_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", default=None,
                   help="a running OpenAI-compatible server (e.g. http://127.0.0.1:8000/v1) to ask instead of loading "
                   "--model here (as vLLM's chat/complete commands)")
    p.add_argument("--model-name", default=None, help="with --url: the served model (default: the server's first)")
    p.add_argument("--api-key", default=None, help="with --url: the bearer key (default: $OPENAI_API_KEY)")


def bounded(cast: Callable[[str], Any], what: str, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Callable[[str], Any]:
    """An argparse type: `cast` of the text within [low, high] ((low, high] with low_open), so that a bad value
    is a usage error naming the expectation (`what`) before any model load. NaN fails any bound."""
    def parse(text: str) -> Any:
        try:
            v = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = (low is None or (v > low if low_open else v >= low)) and (high is None or v <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


positive_int = bounded(int, "a positive integer", 1)
# the engine's own rule (`context_length`): one prompt token and one generated
_plain_max_model_len = bounded(int, "an integer >= 2 (prompt + output)", 2)
_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _max_model_len(text: str) -> int | None:
    """--max-model-len as vLLM spells it, so a command line copied from vLLM means the same here: an integer, or
    with vLLM's suffixes k/m/g/t (powers of 1000: 25.6k = 25600) or K/M/G/T (powers of 1024, whole numbers
    only: 32K = 32768), or auto / -1 (vLLM: the most that fits; here the default, the model's context). "32k"
    was refused as not an integer."""
    text = text.strip()
    if text.lower() == "auto" or text == "-1":
        return None
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", text)
    if match is None:
        return _plain_max_model_len(text)
    number, suffix = match.groups()
    if suffix in _BINARY:
        if "." in number:  # as vLLM: 1.5K is no whole number of tokens
            raise argparse.ArgumentTypeError(f"decimals are not allowed with the binary suffix {suffix}, got "
                                             f"{text!r} (did you mean {number}{suffix.lower()}?)")
        value = int(number) * _BINARY[suffix]
    else:
        value = int(float(number) * _DECIMAL[suffix])
    return _plain_max_model_len(str(value))


def add_max_model_len_arg(p: argparse.ArgumentParser) -> None:
    """vLLM's --max-model-len, shared by generate, chat and serve. Its upper bound (the model's context) is
    checked by the engine once the config is read."""
    p.add_argument("--max-model-len", type=_max_model_len, default=None,
                   help="longest sequence, prompt + output (default: the model's context; at most that); on the "
                   "CPU the default KV cache is sized by it; vLLM's spellings: 32k = 32000, 32K = 32768, auto or "
                   "-1 = the default")


def _add_sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=0.8)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, over the generated tokens")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, over the generated tokens")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--min-tokens", type=int, default=0, help="no end of sequence before this many tokens")


def _sampling(args: argparse.Namespace):
    from .engine.params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos, min_tokens=args.min_tokens)


def _load(args: argparse.Namespace, max_num_seqs: int):
    """The LLM for `max_num_seqs` sequences at once: on CUDA it captures a decode graph per batch-size bucket
    up to that number at start-up, so a one-prompt run captures one."""
    from .model.config import MiniCPM4Config
    from .model.hub import resolve_model_dir

    # A missing model or a bad config.json is said before torch is imported (≈ 2 s); the folder found (a Hub
    # id's snapshot) is what the LLM loads, so the Hub is asked once.
    folder = resolve_model_dir(args.model, args.revision)
    MiniCPM4Config.from_json(folder / "config.json")
    from .llm import LLM

    t0 = time.perf_counter()
    llm = LLM(folder, device=args.device, dtype=args.dtype, max_model_len=args.max_model_len,
              max_num_seqs=max_num_seqs)
    m = llm.model
    print(f"[cpm4] loaded {args.model} ({m.config.num_parameters() / 1e6:.1f}M params, {m.device}, "
          f"{str(m.dtype).removeprefix('torch.')}) in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return llm


def _stored_dtype(name: str | None) -> str | None:
    # "auto" is how generate/serve (and vLLM, transformers) spell the default; here that is the stored dtype.
    return None if name == "auto" else name


def cmd_init(args: argparse.Namespace) -> int:
    from .model.config import preset

    cfg = preset(args.config)  # an unknown preset said before torch is imported
    from .model.init import create_checkpoint

    out = create_checkpoint(cfg, args.out, seed=args.seed, dtype=_stored_dtype(args.dtype), overwrite=args.overwrite)
    print(f"[cpm4] wrote {args.config} checkpoint ({cfg.num_parameters() / 1e6:.1f}M params) to {out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .model.convert import convert_to_llama

    out = convert_to_llama(args.model, args.out, dtype=_stored_dtype(args.dtype), overwrite=args.overwrite,
                           revision=args.revision)
    print(f"[cpm4] wrote the {args.to} form of {args.model} to {out}")
    return 0


def _text(s: str) -> str:
    """Command-line or terminal text with bytes that are not UTF-8 (Python keeps them as lone surrogates, which
    the tokenizer refuses) as U+FFFD, as other command-line tools show them."""
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def cmd_generate(args: argparse.Namespace) -> int:
    params = _sampling(args)  # validate the arguments before a (possibly long) model load
    # A prompt piped in usually ends with the shell's newline, which is not part of the prompt.
    prompts = [_text(p) for p in args.prompt or [sys.stdin.read().removesuffix("\n")]]
    remote = _remote(args, params)
    if remote is not None:  # each prompt streamed from the server in turn
        for i, p in enumerate(prompts):
            if len(prompts) > 1:
                print(f"--- [{i}]")
            pieces = remote.chat([{"role": "user", "content": p}]) if args.chat else remote.complete(p)
            for piece in pieces:
                print(piece, end="", flush=not args.no_stream)
            print()
        return 0
    llm = _load(args, max_num_seqs=min(len(prompts), 256))  # (256: LLM's default)
    if args.chat:  # each prompt is one user turn, rendered with the checkpoint's chat template
        prompts = [llm.tokenizer.render_chat([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in prompts]
    if len(prompts) == 1 and not args.no_stream:
        t0 = time.perf_counter()
        first = None
        n = 0
        for piece in llm.stream(prompts[0], params):
            if first is None:
                first = time.perf_counter() - t0
            n += 1
            print(piece, end="", flush=True)
        print()
        dt = time.perf_counter() - t0
        print(f"[cpm4] first text after {first or dt:.2f}s, {dt:.2f}s total", file=sys.stderr)
        return 0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t0
    for i, o in enumerate(outs):
        if len(outs) > 1:
            print(f"--- [{i}] ({o.finish_reason})")
        print(o.text)
    n_tok = sum(len(o.token_ids) for o in outs)
    print(f"[cpm4] {n_tok} tokens in {dt:.2f}s ({n_tok / max(dt, 1e-9):.1f} tok/s)", file=sys.stderr)
    return 0


def _remote(args: argparse.Namespace, params):
    """The server `--url` names (`cpm4.serve.client`), or None to load the model here."""
    if not args.url:
        return None
    from .serve.client import RemoteModel

    return RemoteModel(args.url, params, args.api_key, args.model_name)


def cmd_chat(args: argparse.Namespace) -> int:
    params = _sampling(args)
    remote = _remote(args, params)
    if remote is not None:
        from .serve.client import PromptRefused as refused

        def reply(history: list[dict]):
            return remote.chat(history)
    else:
        llm = _load(args, max_num_seqs=1)  # one conversation
        from .engine.generate import PromptTooLongError as refused  # (torch: after the checks above)

        def reply(history: list[dict]):
            return llm.stream(llm.chat_ids(history), params)

    system = [{"role": "system", "content": _text(args.system)}] if args.system else []
    history: list[dict] = list(system)
    if args.quick is None:
        print("[cpm4] chat: /reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply.",
              file=sys.stderr)
    while True:
        if args.quick is not None:  # one message, its reply, done (vLLM's chat -q)
            line = _text(args.quick)
        else:
            try:
                line = _text(input("> "))
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
        cmd = line.strip()
        if not cmd:
            if args.quick is not None:
                raise ValueError("--quick needs a message")
            continue
        if cmd in ("/exit", "/quit"):
            return 0
        if cmd == "/reset":
            history = list(system)
            print("[cpm4] conversation cleared", file=sys.stderr)
            continue
        history.append({"role": "user", "content": line})
        said = ""
        try:
            for piece in reply(history):
                said += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:
            # Keep what was said so far; the conversation continues from it.
            print(" [interrupted]", end="")
        except refused as e:
            history.pop()
            if args.quick is not None:
                raise ValueError(str(e)) from None
            print(f"cpm4: {e}; /reset to start a new conversation", file=sys.stderr)
            continue
        print()
        if args.quick is not None:
            return 0
        history.append({"role": "assistant", "content": said})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cpm4", description="MiniCPM4 models: create, run, chat.")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("init", help="write a randomly initialised checkpoint (µP init) with a tokenizer")
    q.add_argument("--config", required=True, help="tiny, minicpm4-0.5b or minicpm4-8b")
    q.add_argument("--out", required=True, type=Path)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dtype", type=dtype_arg, default=None,
                   help="storage dtype: float32, bfloat16, float16 (default, or auto: the preset's)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_init)

    q = sub.add_parser("convert", help="export a checkpoint to another architecture (µP scales folded)")
    q.add_argument("model", help="MiniCPM4 checkpoint folder or Hugging Face model id")
    q.add_argument("out", type=Path, help="output folder")
    q.add_argument("--revision", default=None, help="branch, tag or commit of a Hub model id (default: main)")
    q.add_argument("--to", choices=("llama",), default="llama")
    q.add_argument("--dtype", type=dtype_arg, default=None,
                   help="output dtype (default, or auto: as stored; in bf16/fp16 the folded weights are rounded again, "
                   "float32 gives an exact export)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_convert)

    q = sub.add_parser("generate", help="complete one or more prompts")
    _add_model_args(q)
    _add_sampling_args(q, max_tokens=128)
    add_max_model_len_arg(q)
    q.add_argument("prompt", nargs="*", help="prompt text (several = a batch; none = read stdin)")
    q.add_argument("--no-stream", action="store_true", help="print the result at the end")
    q.add_argument("--chat", action="store_true", help="send each prompt as a user message (chat template)")
    _add_url_args(q)
    q.set_defaults(func=cmd_generate)

    q = sub.add_parser("chat", help="interactive multi-turn chat with streaming")
    _add_model_args(q)
    _add_sampling_args(q, max_tokens=512)
    add_max_model_len_arg(q)
    q.add_argument("--system", "--system-prompt", default=None, help="system prompt")
    q.add_argument("--quick", "-q", default=None, metavar="MESSAGE",
                   help="send this one message, print the reply and exit (vLLM's chat -q)")
    _add_url_args(q)
    q.set_defaults(func=cmd_chat)

    from .data.cli import add_data_commands
    from .serve.cli import add_bench_command, add_run_batch_command, add_serve_command
    from .train.cli import add_train_commands

    add_serve_command(sub)
    add_run_batch_command(sub)
    add_bench_command(sub)
    add_data_commands(sub)
    add_train_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:
        # The reader went away (`cpm4 generate ... | head`): stop quietly, as Unix tools do. stdout is pointed
        # at /dev/null so that the interpreter's final flush does not fail again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file descriptor (captured in-process)
            pass
        return 1
    except (OSError, ValueError, ImportError) as e:
        # OSError: a missing, existing, unreadable or unwritable path (not only FileNotFoundError/FileExistsError).
        # ValueError: bad input, ConfigError, CheckpointError and PromptTooLongError among them (named here, their
        # modules would import torch before every command, the data commands' too).
        print(f"cpm4: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ncpm4: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
