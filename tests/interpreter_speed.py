"""Triton's interpreter, faster for this suite's kernels: it re-patches `triton.language` (`inspect.getmembers`
over the modules a function's globals name) at every call of a `@triton.jit` device function — `tl.zeros` and
the other standard-library functions included — although after the first call of a launch from a given module the
same module objects are patched already. Patching once per module a launch (the first call from each module's
functions, as Triton itself does it) leaves what runs unchanged; the repeats were ≈ 20 % of the interpreter tests'
time (cProfile of `test_prefill_kernels_compile_nothing_after_warm_up_interpreter`: 110K re-patches, 42 of 226 s).
Also `_get_np_dtype` remembered per element type (the same answer), and no integer overflow checks built where the
interpreter would drop them (without debug)."""

from __future__ import annotations

import dataclasses


def install() -> bool:
    """Patch the interpreter (once); False where its internals are not the ones this was written against."""
    try:
        from triton.runtime import interpreter as interp
    except ImportError:
        return False
    grid_cls, fn_cls = getattr(interp, "GridExecutor", None), getattr(interp, "InterpretedFunction", None)
    if grid_cls is None or fn_cls is None or not hasattr(interp, "_patch_lang") or not hasattr(fn_cls, "rewrite") \
            or getattr(fn_cls, "_cpm4_fast", False):
        return False
    launch, device_call = grid_cls.__call__, fn_cls.__call__
    patched: list[set[int] | None] = [None]  # inside a launch: the modules (globals ids) patched in it

    def launch_once(self, *args, **kwargs):
        outer = patched[0]
        patched[0] = set()
        try:
            return launch(self, *args, **kwargs)
        finally:
            patched[0] = outer

    def device_call_once(self, *args, **kwargs):
        seen = patched[0]
        if seen is None or id(self.fn.__globals__) not in seen:
            if seen is not None:
                seen.add(id(self.fn.__globals__))
            return device_call(self, *args, **kwargs)  # (patches, then runs)
        fn = self.rewrite()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interp.InterpreterError(repr(e)) from e

    np_dtype = getattr(interp, "_get_np_dtype", None)
    if np_dtype is not None:  # (it builds a dict of every type at each of its calls: ≈ 10 % of the time)
        block_type, pointer_type = interp.tl.block_type, interp.tl.pointer_type
        memo: dict = {}

        def np_dtype_memo(tt_dtype):
            key = tt_dtype.element_ty if isinstance(tt_dtype, block_type) else tt_dtype
            if isinstance(key, pointer_type):  # (unhashable; always uint64)
                return np_dtype(key)
            got = memo.get(key)
            if got is None:
                got = memo[key] = np_dtype(key)
            return got

        interp._get_np_dtype = np_dtype_memo
    builder = getattr(interp, "interpreter_builder", None)
    options = getattr(builder, "options", None)
    if getattr(options, "sanitize_overflow", False) and not getattr(options, "debug", True):
        # The overflow check of every 32-bit integer +, -, * recomputes it in 64 bits and builds a device_assert
        # that the interpreter then drops (`device_assert` is a no-op without debug): ≈ 40 % of the time of the
        # engine's interpreted prefill test, for nothing.
        builder.options = dataclasses.replace(options, sanitize_overflow=False)
    grid_cls.__call__ = launch_once
    fn_cls.__call__ = device_call_once
    fn_cls._cpm4_fast = True
    return True
