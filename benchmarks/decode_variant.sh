#!/usr/bin/env bash
# CUDA only. The 8B batch-1 InfLLM v2 generation at one context (compiled, sparse rows only) with flags of
# cpm4.kernels.infllm_v2.triton_decode set for the run: how a decode-kernel variant fares inside the engine, on a
# model's data, rather than on attention.py's random inputs.
#
#   bash benchmarks/decode_variant.sh "SELECT_NARROW=0 SEPARATE_MERGE=0" narrow0-merge0 [CONTEXT]
#
# Flags (of triton_decode or triton_select) take 0/1. Table and JSON as generation.py's, the file named with TAG (under /tmp/gen-TAG and, on the device,
# $OUT).
set -eu
cd "$(dirname "$0")/.."
flags="$1" tag="$2" ctx="${3:-131072}"
"${PY:-python}" - "$flags" "$tag" "$ctx" <<'PY' 2>&1 | grep -E "infllm_v2|flags|Error|bad flag" | tail -4
import runpy
import sys

from cpm4.kernels.infllm_v2 import triton_decode, triton_select

flags, tag, ctx = sys.argv[1:4]
for f in flags.split():
    name, _, value = f.partition("=")
    mod = next((m for m in (triton_decode, triton_select) if name.isupper() and hasattr(m, name)), None)
    if mod is None or value not in ("0", "1"):
        raise SystemExit(f"bad flag {f!r}: expected NAME=0|1, NAME a flag of triton_decode or triton_select")
    setattr(mod, name, value == "1")
print("flags", flags, flush=True)
sys.path.insert(0, "benchmarks")
sys.argv = ["generation.py", "--config", "minicpm4-8b", "--contexts", ctx, "--sparse-only", "--compile",
            "--decode-tokens", "32", "--no-peer", "--out", f"/tmp/gen-{tag}", "--tag", tag]
runpy.run_path("benchmarks/generation.py", run_name="__main__")
PY
