"""Triton's specialization of each kernel launch, seen on the CPU (TRITON_INTERPRET=1).

On a GPU, Triton compiles a kernel once per *signature*: every int argument is specialized as 1 (a constant),
a multiple of 16 or other, every pointer as 16-byte aligned or not, unless the kernel lists it in
`do_not_specialize` (or, for the multiple of 16 and the alignment, `do_not_specialize_on_alignment`). An
argument that follows the step's token count therefore compiles new variants in the middle of serving. The
interpreter compiles nothing, but its launches carry the same arguments: this records the signature each
launch would have, with Triton's own rule (`native_specialize_impl`)."""

from __future__ import annotations

import inspect
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


def interpreted() -> bool:
    from triton.runtime.interpreter import InterpretedFunction

    from cpm4.kernels.elementwise import kernels

    return isinstance(kernels._rotary_kernel, InterpretedFunction)


@contextmanager
def launch_signatures() -> Iterator[dict[str, set[tuple]]]:
    """{kernel name: the signatures its launches had inside the block}; a signature is ((arg, key), ...):
    key = Triton's specialization key of a runtime argument, or the value of a constexpr; the first pair is the
    kernel's module."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import native_specialize_impl

    seen: dict[str, set[tuple]] = defaultdict(set)
    run = InterpretedFunction.run

    def recording(self, *args, grid, warmup, **kwargs):
        fixed = set(self.kwargs.get("do_not_specialize") or ())
        unaligned = fixed | set(self.kwargs.get("do_not_specialize_on_alignment") or ())
        consts = {n for n, a in inspect.get_annotations(self.fn).items() if "constexpr" in str(a)}
        sig = [("__module__", self.fn.__module__)]  # triton_decode and triton_select share kernel names
        for name, a in [*zip(self.arg_names, args), *sorted(kwargs.items())]:
            if name in consts:
                sig.append((name, a))
            elif (hasattr(a, "__index__") and not isinstance(a, bool)) or hasattr(a, "data_ptr"):  # ints, tensors
                sig.append((name, native_specialize_impl(BaseBackend, a, False, name not in fixed,
                                                         name not in unaligned)[1]))
        seen[self.fn.__name__].add(tuple(sig))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording
    try:
        yield seen
    finally:
        InterpretedFunction.run = run


def new_signatures(before: dict[str, set[tuple]], after: dict[str, set[tuple]]) -> dict[str, list[str]]:
    """Per kernel, each signature of `after` not in `before`, said as the arguments it differs in from the
    nearest one before."""
    out = {}
    for name, sigs in after.items():
        old = before.get(name, set())
        for sig in sigs - old:
            diffs = [[f"{a[0]}: {b[1]!r} -> {a[1]!r}" for a, b in zip(sig, o) if a != b] for o in old] or [["new"]]
            out.setdefault(name, []).append(", ".join(min(diffs, key=len)))
    return out
