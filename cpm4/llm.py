"""The Python entry points: `load_model`, `generate` and a small vLLM-style `LLM` class.

    from cpm4 import LLM, SamplingParams
    llm = LLM("path/to/MiniCPM4-0.5B")
    print(llm.generate("The capital of France is", SamplingParams(temperature=0))[0].text)

`generate` and `LLM.generate` run the continuous-batching engine over a paged KV cache
(`cpm4.engine.offline`); `stream` runs the plain generate loop for one prompt.
"""

from __future__ import annotations

import dataclasses
import numbers
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .devices import resolve_device
from .engine.generate import (
    GenerationOutput,
    check_prompt_ids,
    context_length,
    fit_to_context,
    generate_stream,
    name_logprobs,
    output_logprobs,
)
from .engine.generation_config import sampling_defaults, serving_config
from .engine.offline import OfflineEngine, check_batch, check_options
from .engine.params import check_no_lora
from .engine.sampling import SamplingParams

if TYPE_CHECKING:
    from .engine.beam_search import BeamSearchOutput, BeamSearchParams
from .model.checkpoint import load_checkpoint, parse_dtype
from .model.config import is_int
from .model.hub import resolve_model_dir
from .model.modeling import MiniCPM4ForCausalLM
from .model.tokenizer import Tokenizer

# Above this many parameters a CPU load defaults to bfloat16 (float32 would need 4 bytes a parameter).
_CPU_FP32_MAX_PARAMS = 2_000_000_000


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device, config_dtype: str | None,
                  n_params: int) -> torch.dtype:
    if dtype not in (None, "auto"):
        return parse_dtype(dtype)
    if device.type == "cuda":
        stored = parse_dtype(config_dtype) if config_dtype else None
        return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16
    return torch.float32 if n_params <= _CPU_FP32_MAX_PARAMS else torch.bfloat16


def load_model(path: str | os.PathLike, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None, max_model_len: int | None = None,
               tokenizer: Tokenizer | None = None) -> tuple[MiniCPM4ForCausalLM, Tokenizer]:
    """Load a checkpoint folder (HF layout) or Hub model id, and its tokenizer (or `tokenizer`, vLLM's option: the
    folder then needs none). device/dtype default to "auto"; max_model_len, if given, is checked against the
    config's context, and the tokenizer found, before the weights are read."""
    path = resolve_model_dir(path)
    config = serving_config(path)  # generation_config.json's EOS ids too, checked before the weights are read
    if max_model_len is not None:
        context_length(config, max_model_len)
    tok = tokenizer if tokenizer is not None else Tokenizer.from_dir(path)  # a missing one said before the load
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, config.torch_dtype, config.num_parameters())
    model = load_checkpoint(path, device=dev, dtype=dt)
    model.config.eos_token_id = config.eos_token_id
    return model, tok


def _as_ids(tokenizer: Tokenizer, prompt: str | Sequence[int] | Mapping[str, Any]) -> list[int]:
    """Text, token ids (a list, or a 1-D numpy array or tensor), or vLLM's prompt dicts ({"prompt": text} or
    {"prompt_token_ids": ids})."""
    if isinstance(prompt, Mapping):
        if prompt.get("multi_modal_data"):  # vLLM's images, audio...: a text model would answer without them
            raise ValueError("multi_modal_data is not supported: MiniCPM4 is a text model")
        if "prompt_token_ids" in prompt:
            prompt = prompt["prompt_token_ids"]
            if isinstance(prompt, str):  # was encoded as text
                raise ValueError("prompt_token_ids must be token ids, got a str: give text as {'prompt': ...}")
        elif "prompt" in prompt:
            prompt = prompt["prompt"]
        else:
            raise ValueError(f"a prompt dict needs 'prompt' or 'prompt_token_ids', got keys {sorted(prompt)}")
    if isinstance(prompt, str):
        return tokenizer.encode(prompt)
    if isinstance(prompt, (bytes, bytearray)):  # a Sequence of ints: it ran as the ids of its bytes
        raise ValueError("a prompt is text (str) or token ids, got bytes: decode it first")
    if hasattr(prompt, "tolist") and getattr(prompt, "ndim", 1) == 1:
        prompt = prompt.tolist()
    if not isinstance(prompt, Sequence):
        raise ValueError(f"a prompt is text, token ids or a prompt dict, got {type(prompt).__name__}")
    # The shared check (an id given as 1.9 is refused, not cut to 1; numpy integers are taken), without the
    # length limits here: truncate_prompt_tokens applies first, and the engine checks the context and cache.
    return check_prompt_ids(prompt, sys.maxsize)


def _prompt_text(prompt: Any) -> str | None:
    if isinstance(prompt, Mapping) and "prompt_token_ids" not in prompt:
        prompt = prompt.get("prompt")
    return prompt if isinstance(prompt, str) else None


def _normalise(prompts, params) -> tuple[list, list[SamplingParams]]:
    if hasattr(prompts, "tolist") and getattr(prompts, "ndim", None) in (1, 2):  # numpy / torch: ids, a batch
        prompts = prompts.tolist()
    if isinstance(prompts, (str, Mapping, bytes, bytearray)) or \
            (isinstance(prompts, Sequence) and prompts and isinstance(prompts[0], numbers.Number)):
        prompts = [prompts]
    prompts = list(prompts)
    if params is None:
        params = SamplingParams()
    if isinstance(params, SamplingParams):
        params = [params] * len(prompts)
    return prompts, list(params)


def _sampling_params(sampling_params: Any, params: Any) -> Any:
    """vLLM's keyword (sampling_params) or ours (params), not both."""
    if sampling_params is not None and params is not None:
        raise TypeError("give sampling_params or params (the same thing), not both")
    return sampling_params if sampling_params is not None else params


def _generate(engine: OfflineEngine, tokenizer: Tokenizer, prompts, params, use_tqdm: bool = False,
              priority: Sequence[int] | None = None) -> list[GenerationOutput]:
    prompts, params = _normalise(prompts, params)
    if priority is not None:  # vLLM's: one per prompt, beside the params
        if isinstance(priority, (str, bytes)) or not isinstance(priority, Sequence) or len(priority) != len(prompts):
            raise ValueError(f"priority must be a list of one int per prompt ({len(prompts)}), got {priority!r:.80}")
        params = [dataclasses.replace(sp, priority=p) if isinstance(sp, SamplingParams) else sp
                  for sp, p in zip(params, priority)]
    outs = engine.generate([_as_ids(tokenizer, p) for p in prompts], params, use_tqdm=use_tqdm)
    name_logprobs(output_logprobs(outs), tokenizer.token_text)
    for o, p in zip(outs, prompts):
        rid = str(next(engine.request_ids))
        for c in {id(x): x for x in (o, *o.outputs)}.values():
            c.prompt, c.request_id = _prompt_text(p), rid
    return outs


def generate(model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, prompts: str | Sequence[int] | Sequence,
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[GenerationOutput]:
    """Generate for one prompt or a batch (text or token ids); one output per prompt, in order. sampling_params
    (or params): one for all, or one per prompt.

    Runs the continuous-batching engine over a paged KV cache sized for this batch and freed on return, without
    CUDA graphs (capturing them would not pay off for one call); an `LLM` keeps one engine across calls."""
    engine = OfflineEngine(model, tokenizer, device_budget=False, cuda_graphs=False)
    return _generate(engine, tokenizer, prompts, _sampling_params(sampling_params, params))


def stream(model: MiniCPM4ForCausalLM, tokenizer: Tokenizer, prompt: str | Sequence[int],
           sampling_params: SamplingParams | None = None, *, params: SamplingParams | None = None,
           context: int | None = None) -> Iterator[str]:
    """Text of one prompt's completion, piece by piece as it is generated, on the plain generate loop: the
    prompt checked and truncated (truncate_prompt_tokens) as `generate` does, max_tokens cut to what `context`
    (default: the model's) leaves."""
    params = _sampling_params(sampling_params, params) or SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"stream takes one SamplingParams, got {type(params).__name__}")
    if params.n != 1:
        raise ValueError(f"stream gives one completion: n must be 1, got {params.n}")
    context = context_length(model) if context is None else context
    ids = params.truncate(_as_ids(tokenizer, prompt), context)
    check_batch([ids], [params], context, model.config.vocab_size)
    for step in generate_stream(model, tokenizer, [ids], [fit_to_context(len(ids), params, context)]):
        for d in step:
            if d.text:
                yield d.text


def chat_prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                    chat_template_kwargs: Mapping[str, Any] | None = None, **template_kwargs: Any) -> list[int]:
    """The ids of a conversation rendered with the chat template (vLLM's `chat` options; template_kwargs, e.g.
    enable_thinking, go to the template as chat_template_kwargs do): what `LLM.chat` and `AsyncLLM.chat` generate
    from."""
    kwargs = {**(chat_template_kwargs or {}), **template_kwargs}
    if continue_final_message:
        kwargs["continue_final_message"] = True
    return tokenizer.encode_chat(messages, add_generation_prompt=add_generation_prompt, tools=tools, **kwargs)


_ANY = object()
# vLLM engine arguments `LLM` takes for code written for vLLM, with the values it takes: those that cannot change
# what is generated (_ANY: every value). Other values would, or name what cpm4 does not have: they are refused.
_VLLM_ARGS: dict[str, tuple[Any, ...]] = {
    "trust_remote_code": (True, False),  # cpm4 runs no code from the checkpoint either way
    "tensor_parallel_size": (1,), "pipeline_parallel_size": (1,), "data_parallel_size": (1,),  # one device
    "quantization": (None,), "kv_cache_dtype": ("auto",), "cpu_offload_gb": (0,), "hf_overrides": (None, {}),
    "tokenizer_mode": ("auto",), "skip_tokenizer_init": (False,), "tokenizer_revision": (None,),
    "download_dir": (None,), "load_format": ("auto", "safetensors"), "task": ("auto", "generate"),
    "runner": ("auto", "generate"),
    # Memory, speed and logging only.
    "swap_space": (_ANY,), "disable_log_stats": (_ANY,), "disable_custom_all_reduce": (_ANY,),
    "max_num_batched_tokens": (_ANY,), "enable_chunked_prefill": (_ANY,), "compilation_config": (_ANY,),
    "block_size": (_ANY,), "distributed_executor_backend": (_ANY,), "max_seq_len_to_capture": (_ANY,),
    "disable_async_output_proc": (_ANY,), "max_logprobs": (_ANY,),
}


def _check_vllm_args(args: Mapping[str, Any]) -> None:
    for name, value in args.items():
        if name not in _VLLM_ARGS:
            raise TypeError(f"LLM() got an unexpected keyword argument {name!r}")
        ok = _VLLM_ARGS[name]
        if _ANY not in ok and not any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in ok):
            raise ValueError(f"{name}={value!r:.80} is not available: cpm4 takes vLLM's {name} only as "
                             + " or ".join(map(repr, ok)))


class LLM:
    """A loaded model with its tokenizer: offline batch generation, streaming and chat.

    `generate` (and `chat`) run one continuous-batching engine, kept across calls: on CUDA built and warmed
    up here (its cache allocated, every decode-graph bucket captured and with compile compiled, as vLLM's `LLM`
    does at start-up), elsewhere built at the first call, its cache sized to the batch.
    Engine options, as vLLM's: max_num_seqs (sequences decoded together), gpu_memory_utilization (share of
    the GPU for weights, activations and KV cache; default 0.9 on CUDA, where the cache takes what it leaves),
    enforce_eager (no CUDA graphs), plus kv_cache_tokens (a fixed cache size instead; off CUDA the cache
    is otherwise sized to each batch), chunk_tokens (prompt tokens prefilled per engine step; default
    `default_chunk_tokens`: 8192 on a large GPU, 512 on the CPU) and compile
    (torch.compile the captured decode step and prefill's element-wise ops: faster steps, a slower start;
    CUDA graphs only) and max_model_len (the longest prompt + output served, at most the model's context: a
    smaller one narrows the decode graphs' block tables and, off CUDA, the cache).

    generation_config, as vLLM's: "auto" (default) takes the checkpoint folder's generation_config.json
    sampling values (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens) as the defaults of
    calls without params (`get_default_sampling_params`); "vllm" keeps SamplingParams' own; a path reads that
    folder's or file's."""

    def __init__(self, model: str | os.PathLike | MiniCPM4ForCausalLM, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, *,
                 tokenizer: Tokenizer | str | os.PathLike | None = None,
                 max_num_seqs: int = 256, gpu_memory_utilization: float | None = None, enforce_eager: bool = False,
                 kv_cache_tokens: int | None = None, chunk_tokens: int | None = None, compile: bool = False,
                 max_model_len: int | None = None, generation_config: str | os.PathLike | None = "auto",
                 revision: str | None = None, enable_prefix_caching: bool = True,
                 cascade_decode: bool | None = None, scheduling_policy: str = "fcfs", seed: int | None = None,
                 **vllm_args: Any):
        """model: a checkpoint folder, a Hugging Face Hub model id (fetched into the HF cache at `revision`;
        `cpm4.model.hub`), or a model already in memory with its `tokenizer` (device and dtype are then the
        model's own). tokenizer: a `Tokenizer`, or a folder / Hub id to load one from, used instead of the
        checkpoint's (vLLM's option). enable_prefix_caching: prompts reuse the cached pages of an earlier
        prompt's prefix (vLLM's option; False computes every prompt whole). cascade_decode: decode steps read the
        prefix pages many prompts share once per tile of rows (see `LLMEngine`; None: on). scheduling_policy:
        "priority" lets `generate(priority=...)` order prompts beyond max_num_seqs (vLLM's; default "fcfs").
        seed: seeds torch's generators here, so unseeded sampling repeats from run to run (vLLM's). vllm_args:
        vLLM engine arguments that cannot change the outputs (trust_remote_code, tensor_parallel_size=1,
        swap_space...; `_VLLM_ARGS`), taken and ignored; other values are refused."""
        _check_vllm_args(vllm_args)
        if seed is not None and not is_int(seed):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        check_options(max_num_seqs, chunk_tokens, kv_cache_tokens, gpu_memory_utilization)  # before the load
        folder = None if isinstance(model, MiniCPM4ForCausalLM) else resolve_model_dir(model, revision)
        self.sampling_defaults = sampling_defaults(generation_config, folder)  # before the load, too
        if compile and enforce_eager:
            raise ValueError("compile applies to the CUDA-graph decode step: it cannot go with enforce_eager")
        if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
            if not isinstance(tokenizer, (str, os.PathLike)):
                raise TypeError(f"tokenizer must be a Tokenizer or a folder / Hub id, got {type(tokenizer).__name__}")
            tokenizer = Tokenizer.from_dir(resolve_model_dir(tokenizer))  # vLLM's: the one named, not the model's
        if isinstance(model, MiniCPM4ForCausalLM):
            if tokenizer is None:
                raise ValueError("a model given in memory needs its tokenizer")
            self.path: Path | None = None
            self.model, self.tokenizer = model, tokenizer
        else:
            self.path = folder
            self.model, self.tokenizer = load_model(folder, device, dtype, max_model_len, tokenizer)
        if compile and self.model.device.type != "cuda":
            raise ValueError(f"compile needs CUDA graphs, and the model is on {self.model.device.type}")
        self.engine = OfflineEngine(self.model, self.tokenizer, max_num_seqs, chunk_tokens, kv_cache_tokens,
                                    gpu_memory_utilization, cuda_graphs=False if enforce_eager else None,
                                    compile=compile, max_model_len=max_model_len,
                                    enable_prefix_caching=enable_prefix_caching, cascade_decode=cascade_decode,
                                    warm_up=True, scheduling_policy=scheduling_policy)
        if self.model.device.type == "cuda":  # as vLLM: the cache allocated and the graphs captured up front
            self.engine.prepare()
        if seed is not None:
            torch.manual_seed(seed)

    def generate(self, prompts: str | Sequence[int] | Sequence,
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False,
                 lora_request: Any = None, *, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[GenerationOutput]:
        """One output per prompt (text or token ids), in order; sampling_params (vLLM's name; or params): one
        for all, or one per prompt (default: `get_default_sampling_params`). use_tqdm: vLLM's progress bar of
        processed prompts (stderr; a callable, as vLLM's, makes the bar from tqdm's arguments). lora_request:
        vLLM's, None only (`check_no_lora`). priority: one int per prompt, lower first (needs scheduling_policy
        "priority", as vLLM's). A request's logits processor that raises fails the call with its exception."""
        check_no_lora(lora_request)
        params = _sampling_params(sampling_params, params)
        return _generate(self.engine, self.tokenizer, prompts,
                         params if params is not None else self.get_default_sampling_params(), use_tqdm, priority)

    def beam_search(self, prompts: str | Sequence[int] | Sequence, params: BeamSearchParams,
                    use_tqdm: bool = False, *, lora_request: Any = None,
                    concurrency_limit: int | None = None) -> list[BeamSearchOutput]:
        """vLLM's beam search (`cpm4.engine.beam_search`): for each prompt (text, token ids or vLLM's prompt
        dicts) its best `params.beam_width` beams, best first, on this LLM's engine. use_tqdm: accepted (vLLM's);
        beam search runs step by step without a bar. vLLM's lora_request (None only) and concurrency_limit (None or
        a positive int: every prompt's beams run together here, which gives the same beams) are taken by name."""
        from .engine.beam_search import BeamSearchParams as _Params
        from .engine.beam_search import beam_search

        check_no_lora(lora_request)
        if concurrency_limit is not None and (not is_int(concurrency_limit) or concurrency_limit < 1):
            raise ValueError(f"concurrency_limit must be a positive int or None, got {concurrency_limit!r}")
        if not isinstance(params, _Params):
            raise TypeError(f"beam_search takes BeamSearchParams, got {type(params).__name__}")
        prompts, _ = _normalise(prompts, None)
        ids = [_as_ids(self.tokenizer, p) for p in prompts]
        context = self.engine.context
        if self.engine.fixed_size:  # beams end ("length") where a fixed cache is full, as any output does there
            context = min(context, self.engine.prepare().cache_tokens)
        outs = beam_search(lambda ps, sps: self.engine.generate(ps, sps), self.tokenizer.decode, ids, params,
                           self.model.config.eos_token_ids, context)
        name_logprobs((lp for o in outs for b in o.sequences for lp in b.logprobs), self.tokenizer.token_text)
        return outs

    def get_tokenizer(self) -> Any:
        """The checkpoint's Hugging Face tokenizer (vLLM's `get_tokenizer`): encode, decode, apply_chat_template.
        cpm4's own wrapper is `llm.tokenizer`."""
        return self.tokenizer.hf

    def get_default_sampling_params(self) -> SamplingParams:
        """What calls without params use: SamplingParams with the checkpoint's generation_config values."""
        return SamplingParams(**self.sampling_defaults)

    def stream(self, prompt: str | Sequence[int], sampling_params: SamplingParams | None = None, *,
               params: SamplingParams | None = None) -> Iterator[str]:
        """Text of one prompt's completion, piece by piece. On CUDA it runs on the engine (`generate`'s:
        CUDA graphs, paged sparse decode); elsewhere on the plain loop, whose first token comes soonest on a
        CPU (no cache to size)."""
        params = _sampling_params(sampling_params, params)
        params = params if params is not None else self.get_default_sampling_params()
        if self.model.device.type != "cuda":
            yield from stream(self.model, self.tokenizer, prompt, params, context=self.engine.context)
            return
        if params.n != 1:
            raise ValueError(f"stream gives one completion: n must be 1, got {params.n}")
        for d in self.engine.stream(_as_ids(self.tokenizer, prompt), params):
            if d.text:
                yield d.text

    def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                 continue_final_message: bool = False, tools: list[dict[str, Any]] | None = None,
                 chat_template_kwargs: Mapping[str, Any] | None = None, **template_kwargs: Any) -> list[int]:
        """The ids of a conversation rendered with the chat template (`chat_prompt_ids`)."""
        return chat_prompt_ids(self.tokenizer, messages, add_generation_prompt, continue_final_message, tools,
                               chat_template_kwargs, **template_kwargs)

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None, use_tqdm: bool = False,
             lora_request: Any = None, *, add_generation_prompt: bool = True, continue_final_message: bool = False,
             tools: list[dict[str, Any]] | None = None, chat_template_kwargs: Mapping[str, Any] | None = None,
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             **template_kwargs: Any) -> list[GenerationOutput]:
        """Assistant replies, rendered with the checkpoint's chat template: a list of one for a conversation, of one
        per conversation (generated together, in order) for a list of them — always a list, as vLLM's `chat`
        returns (`llm.chat(messages)[0].text`; code written for vLLM indexes it). As vLLM's:
        add_generation_prompt false with continue_final_message writes on from the last (assistant) message;
        tools (OpenAI function specs) and chat_template_kwargs go to the template; lora_request: None only. Messages
        may give their content as OpenAI's text parts (joined with newlines) and tool calls' arguments as JSON text,
        as vLLM's `chat` takes them (`cpm4.model.tokenizer.openai_message`)."""
        check_no_lora(lora_request)  # (not a template keyword, as it would have been taken for one)
        if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
            raise ValueError("messages must be a list of {'role': ..., 'content': ...} dicts (one conversation) "
                             f"or a list of such lists, got {type(messages).__name__}")
        options = dict(add_generation_prompt=add_generation_prompt, continue_final_message=continue_final_message,
                       tools=tools, chat_template_kwargs=chat_template_kwargs, **template_kwargs)
        params = _sampling_params(sampling_params, params)
        if messages and isinstance(messages[0], (list, tuple)):
            ids = [self.chat_ids(list(m), **options) for m in messages]
            return self.generate(ids, params, use_tqdm)
        return self.generate([self.chat_ids(messages, **options)], params, use_tqdm)
