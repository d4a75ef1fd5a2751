"""Compile the Triton kernels that tests launch in the interpreter for real GPUs as well (PTX and cubin for sm_80,
the oldest GPU the kernels support, and sm_90, the device's Hopper; with the ptxas bundled in Triton's wheel): a
kernel that only the interpreter has run cannot then fail to build on a GPU. `capture()` records each launch
(kernel, argument types, constexprs, compile options); `build()` compiles every distinct one for each arch."""

from __future__ import annotations

import contextlib
import os

import torch

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64",
          torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1",
          torch.int16: "i16"}
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "num_ctas")


def available() -> bool:
    try:
        import triton
    except ImportError:
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -2**31 <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(v).__name__}")


@contextlib.contextmanager
def capture():
    """Record every interpreted kernel launch inside the block: yields the list of (fn, signature, constexprs,
    options), one entry per distinct launch."""
    from triton.runtime.interpreter import InterpretedFunction

    seen: dict = {}
    orig = InterpretedFunction.run

    def run(self, *args, grid, warmup, **kwargs):
        fn = self.fn
        names, const_names = _params(fn)
        bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k not in _OPTIONS}
        options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
        sig, consts = {}, {}
        for n in names:
            v = bound.get(n)
            if n in const_names or v is None:
                sig[n], consts[n] = "constexpr", v
            else:
                sig[n] = _type(v)
        key = (fn, tuple(sig.items()), tuple(sorted((k, repr(v)) for k, v in consts.items())),
               tuple(sorted(options.items())))
        seen.setdefault(key, (fn, sig, consts, options))
        return orig(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = run
    launches: list = []
    try:
        yield launches
    finally:
        InterpretedFunction.run = orig
        launches.extend(seen.values())


def _params(fn) -> tuple[list[str], set[str]]:
    """The Python kernel function's parameter names, and those annotated tl.constexpr."""
    import inspect

    import triton.language as tl

    params = inspect.signature(fn).parameters
    return list(params), {n for n, p in params.items()
                          if p.annotation is tl.constexpr or str(p.annotation).endswith("constexpr")}


def build(launches: list, archs: tuple[int, ...] = (80, 90)) -> list[str]:
    """Build each captured launch for each CUDA arch (in a fresh process: the interpreter's patches of
    triton.language stay in this one); returns the kernels' names (once per launch). Raises with the compiler's
    message when one does not build."""
    import json
    import subprocess
    import sys

    jobs = [{"module": fn.__module__, "name": fn.__name__, "sig": sig, "consts": consts, "options": options,
             "archs": list(archs)} for fn, sig, consts, options in launches]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", _BUILD], input=json.dumps(jobs), capture_output=True, text=True,
                       env=env, timeout=600)
    if r.returncode:
        raise RuntimeError(f"CUDA build failed:\n{r.stderr[-4000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


_BUILD = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

built = []
for job in json.load(sys.stdin):
    k = getattr(importlib.import_module(job["module"]), job["name"])
    while not isinstance(k, JITFunction):  # autotuner / heuristics wrappers
        k = k.fn
    names = k.arg_names
    src = ASTSource(fn=k, signature=job["sig"], constexprs={(names.index(n),): v for n, v in job["consts"].items()})
    for arch in job["archs"]:
        triton.compile(src, target=GPUTarget("cuda", arch, 32), options=job["options"])
    built.append(job["name"])
print(json.dumps(built))
"""
