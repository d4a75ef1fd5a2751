#!/usr/bin/env bash
# The GPU checks and measurements of a device session, in stages that each fit one 10-minute device call:
#
#   bash benchmarks/device_session.sh prepwheels # here: the server's wheels for the device (.wheels/py312)
#   bash benchmarks/device_session.sh tests     # GPU tests of the InfLLM v2 kernels (but the sparse decode's)
#   bash benchmarks/device_session.sh testsdecode # GPU tests of the InfLLM v2 paged sparse decode
#   bash benchmarks/device_session.sh tests2    # GPU tests of the engine, model, guided decoding, server engines and
#                                               # the element-wise and GEMV kernels (carry .wheels/py312)
#   bash benchmarks/device_session.sh tests3    # the other GPU test files (union path, cascade decode, PDL, packed
#                                               # prefill, prefill graphs, sampling, training)
#   bash benchmarks/device_session.sh servetests # GPU tests of the server's engines (carry .wheels/py312)
#   bash benchmarks/device_session.sh decode    # InfLLM v2 decode: GPU tests, then the decode rows (separate merge,
#                                               # split sweeps)
#   bash benchmarks/device_session.sh select    # SELECT_NARROW, SEPARATE_MERGE: 8B 128K decode, each flipped
#   bash benchmarks/device_session.sh full      # issue 3's table: attention.py at 8K, 32K, 64K and 128K
#   bash benchmarks/device_session.sh kernels   # InfLLM v2 prefill/backward rows at 32K/128K (+ variants), selection
#   bash benchmarks/device_session.sh engine    # 8B batch-1 generation at 128K (InfLLM v2, compiled), 0.5B batch 256
#   bash benchmarks/device_session.sh serving   # nano-vllm workload (+ step trace) and the server row
#   bash benchmarks/device_session.sh servingdynamic # the compiled rows, shared compilation; server row per bucket
#   bash benchmarks/device_session.sh servingab # the offline row: shared compilation vs per bucket, 3 runs each
#   bash benchmarks/device_session.sh stalls    # the offline batch's decode steps: host ms by part, synchronizing calls
#   bash benchmarks/device_session.sh servertext # server row: text at the end vs streamed; launched-ahead sync test
#   bash benchmarks/device_session.sh sampling  # seeded rows' draw together vs one multinomial a row
#   bash benchmarks/device_session.sh cascadeeven # cascade decode's break-even rows count, 8B and 0.5B shapes
#   bash benchmarks/device_session.sh cascadegroups # cascade prefill/decode with several prefix groups a step
#   bash benchmarks/device_session.sh prefixgroups # requests over 2 cached prefixes: cascades for both vs one
#   bash benchmarks/device_session.sh servingsys2 # the offline row over two system prompts: cascades for both vs one
#   bash benchmarks/device_session.sh http      # the HTTP row, engine thread and engine process (carry .wheels/py312)
#   bash benchmarks/device_session.sh httpdiag  # where the HTTP row's time goes: the stand-in engine
#                                               # (http_overhead.py) and the HTTP row with the httpx client,
#                                               # with the asyncio loop + h11, then with uvloop + httptools
#   bash benchmarks/device_session.sh httpgil   # the thread-mode HTTP row with a shorter GIL switch interval
#   bash benchmarks/device_session.sh elementwise # hand-written element-wise kernels: tests, op timings, and
#                                               # batch-1 generation without --compile, eager vs the kernels
#   bash benchmarks/device_session.sh gemv      # the decode GEMV kernel: tests, against cuBLAS, 8B decode with it
#   bash benchmarks/device_session.sh gemvmix   # 8B decode with the GEMV on q/k/v, gate/up and the head only
#   bash benchmarks/device_session.sh backward  # the 128K backward kernel by kernel, the dk/dv split (DKDV_CHUNK)
#   bash benchmarks/device_session.sh prefix    # prefix caching on against off (prefix_cache.py): 0.5B, then 8B
#   bash benchmarks/device_session.sh batcheddecode # the dense paged decode at many rows (batched_decode.py): store
#                                               # apart / in the launch / peeled (STORE_PEEL), tiles; its GPU tests
#   bash benchmarks/device_session.sh peel8b    # 8B 128K decode with and without STORE_PEEL
#   bash benchmarks/device_session.sh splitwave # the dense paged decode at 64-256 rows: one split a row against the
#                                               # default splits, the store apart and in the launch
#   bash benchmarks/device_session.sh batchedab # the offline row: the default, the store in the launch at every
#                                               # size, and that peeled
#   bash benchmarks/device_session.sh rows      # sparse rows in one launch per stage: GPU tests, prefix caching
#                                               # at 16K/4K batched and with a pipeline per row
#   bash benchmarks/device_session.sh unionsample # the union path's sampled decision as one kernel: tests, its cost
#   bash benchmarks/device_session.sh unionkernel # the whole union count as one kernel: tests, its cost
#   bash benchmarks/device_session.sh uniondevice # the union decision on the device: tests, launch configs, its cost
#   bash benchmarks/device_session.sh cascade   # shared-prefix rows in two calls merged by log-sum-exp: GPU tests,
#                                               # then 0.5B prefix caching with and without it (+ profile)
#   bash benchmarks/device_session.sh firststep # where a warm prefix batch's first step goes: 8B (8 x 30K, sparse rows)
#                                               # and 0.5B (32 x 16K, dense) under torch.profiler
#   bash benchmarks/device_session.sh prefill8b # kernel profile of the 8B 128K InfLLM v2 prefill (where ~1 s goes
#                                               # beyond the GEMMs and the attention kernels)
#   bash benchmarks/device_session.sh diag      # first-call costs of the prefill attention shapes; offline row alone
#                                               # with what ran inside the timed run (compiles, GC, cudaMalloc)
#   bash benchmarks/device_session.sh ncushared # Nsight Compute on the shared-blocks forward kernel at 128K, lengths
#                                               # unspecialized against specialized
#   bash benchmarks/device_session.sh sharedargs # that kernel with one length argument specialized again at a time
#   (more stages below, each with its comment: cascade decode, warm-up, JIT variants, A/B against ab_old, ...)
#
# JSON results land in benchmarks/results and, on the device, under $OUT. Each command has its own time limit so
# one slow step cannot eat the whole call.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-python3}
stage=${1:-tests}

wheels() {  # fastapi/uvicorn/openai are not on the device: install them from the carried wheels
    if [ -d .wheels/py312 ]; then
        "$PY" -m pip install -q --no-index --find-links .wheels/py312 fastapi uvicorn openai prometheus_client \
            httpx uvloop httptools 2>&1 | grep -v WARNING
    fi
}

case "$stage" in
prepwheels)  # here, not on the device (no registry there): the server's wheels for the device's Python 3.12,
    # into .wheels/py312 (git-ignored; carry it for tests2, servetests, http*)
    mkdir -p .wheels/py312
    "$PY" -m pip download -q --python-version 3.12 --only-binary=:all: --platform manylinux2014_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d .wheels/py312 \
        fastapi uvicorn openai prometheus_client httpx uvloop httptools 2>&1 | grep -v "is ignored"
    ls .wheels/py312 | wc -l
    ;;
tests)  # the kernels' GPU tests but the sparse decode ones (testsdecode); the rest in tests2. The whole file took
    # > 9.5 min in one call (fifteenth session: the sixteen 3000-token pipeline tests ≈ 26 s each)
    # --durations: which tests to make cheaper
    timeout 560 "$PY" -m pytest -m gpu -p no:warnings -x --durations=16 tests/test_infllm_v2_triton.py \
        -k "not paged_sparse_decode" 2>&1 | tail -20
    ;;
testsdecode)  # the paged sparse decode GPU tests (≈ 4 min)
    timeout 560 "$PY" -m pytest -m gpu -p no:warnings -x --durations=5 tests/test_infllm_v2_triton.py \
        -k "paged_sparse_decode" 2>&1 | tail -10
    ;;
tests2)  # carry .wheels/py312: the engine's, model's and server's GPU tests and the new kernels'
    wheels
    timeout 560 "$PY" -m pytest -m gpu -p no:warnings -x --durations=8 tests/test_engine.py tests/test_model.py \
        tests/test_gpu.py tests/test_guided.py tests/test_serve_process.py tests/test_elementwise_triton.py \
        tests/test_gemv.py tests/test_transfer.py tests/test_llm_engine.py tests/test_run_batch.py \
        tests/test_beam_search.py 2>&1 | tail -20
    ;;
tests3)  # the GPU test files no stage above runs whole: the union path, cascade decode, PDL, packed prefill and its
    # graphs, sampling, training, graph capture (tests + testsdecode + tests2 + tests3 = every GPU test)
    timeout 560 "$PY" -m pytest -m gpu -p no:warnings -x --durations=8 tests/test_infllm_v2_union.py \
        tests/test_cascade_decode.py tests/test_pdl.py tests/test_packed_prefill.py tests/test_prefill_graphs.py \
        tests/test_sampling.py tests/test_train_gpu.py tests/test_capture.py tests/test_lifetimes.py \
        tests/test_memory_checks.py 2>&1 | tail -20
    ;;
servetests)  # carry .wheels/py312
    wheels
    timeout 400 "$PY" -m pytest -m gpu -p no:warnings -x --durations=5 tests/test_serve_process.py \
        tests/test_engine.py tests/test_sampling.py 2>&1 | tail -15
    ;;
decode)  # the InfLLM v2 decode step: its GPU tests, then its rows
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_infllm_v2_triton.py \
        -k "paged_decode or paged_sparse_decode" 2>&1 | tail -3
    timeout 280 "$PY" benchmarks/attention.py --decode-only --lengths 32768 131072 2>&1 | grep -E "^decode|device|failed"
    ;;
select)  # the decode step's flags inside the 8B engine at 128K: the defaults, then the narrowed selection search
    # (SELECT_NARROW) and the separate merge (SEPARATE_MERGE) each flipped (≈ 60 s a run). Their GPU tests run in
    # the decode stage (paged decode) and the tests stage (selection).
    for v in ":base" "SELECT_NARROW=0:full_range" "SEPARATE_MERGE=0:last_split_merge"; do
        PY="$PY" timeout 110 bash benchmarks/decode_variant.sh "${v%%:*}" "${v##*:}"
    done
    ;;
full)  # issue 3's whole table: prefill, backward and decode rows at 8K, 32K, 64K and 128K (JSON under $OUT)
    timeout 560 "$PY" benchmarks/attention.py --lengths 8192 32768 65536 131072 --out "${OUT:-benchmarks/results}" \
        2>&1 | grep -E "^\{\"phase\": \"(prefill|backward|forward\+backward|decode|decode\.cuda_graph)\"|device|failed" \
        | cut -c1-160
    ;;
kernels)  # the prefill and backward rows with their variants (the decode rows: the decode stage)
    timeout 420 "$PY" benchmarks/attention.py --lengths 32768 131072 2>&1 \
        | grep -E "^\{\"phase\": \"(prefill|backward|forward)|device|failed"
    timeout 100 "$PY" benchmarks/select_search.py 2>&1 | grep -E "^prefill|wrote|Error"
    ;;
engine)
    timeout 300 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 131072 --sparse --compile \
        --decode-tokens 32 --no-peer 2>&1 | tail -6
    timeout 240 "$PY" benchmarks/profile_engine.py --config minicpm4-0.5b --context 1024 --batch 256 --compile \
        --steps 8 --top 20 2>&1 | head -40
    ;;
serving)
    timeout 560 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --trace 2>&1 | tail -22
    ;;
cascadegroups)  # cascade decode with several groups a step: GPU tests, then one layer with 1, 2, 4 groups (4 slots)
    # and a single group in 1 slot (the cost of the slots when one prefix is shared)
    timeout 290 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_cascade_decode.py tests/test_engine.py -k cascade \
        2>&1 | tail -3
    timeout 150 "$PY" benchmarks/cascade_decode.py --batches 32 128 --prefixes 4096 --groups 1 2 4 --empty 2>&1 \
        | tail -12
    timeout 100 "$PY" benchmarks/cascade_decode.py --batches 32 128 --prefixes 4096 --slots 1 --empty 2>&1 | tail -6
    ;;
cascadeorder)  # the shared kernel's tiles taking the rows by group (SharedPrefix.order; --unsorted: arrival order, as
    # before), and the prefill cascade over several groups gathering keys from after the pages they share: the
    # GPU tests, one layer, the prefix-cache rows over 2 prefixes (twice each), the serving row over 2 system prompts
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_cascade_decode.py tests/test_engine.py -k cascade \
        2>&1 | tail -3
    timeout 150 "$PY" benchmarks/cascade_decode.py --batches 32 128 --prefixes 4096 --groups 1 2 4 --unsorted \
        --tag=-order --out "${OUT:-benchmarks/results}" 2>&1 | tail -17
    for run in 1 2; do for g in 4 1; do
        timeout 100 "$PY" benchmarks/prefix_cache.py --prefixes 4096 --groups 2 --cascade-groups $g \
            --tag="-groups2-cascade$g-skip-run$run" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^prefix"
    done; done
    for g in 4 1; do
        timeout 150 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server --system-prompt 2048 \
            --system-prompts 2 --cascade-groups $g --tag=-sys2048x2-groups$g-order --out "${OUT:-benchmarks/results}" \
            2>&1 | grep -E "^offline"
    done
    ;;
prefixmerged)  # one cascade call pair a layer for all the prefill's groups (was a pair per group): GPU tests, then
    # the prefix-cache rows over 2 prefixes, both groups against the larger alone, twice each
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_engine.py -k cascade 2>&1 | tail -3
    for run in 1 2; do for g in 4 1; do
        timeout 100 "$PY" benchmarks/prefix_cache.py --prefixes 4096 --groups 2 --cascade-groups $g \
            --tag="-groups2-cascade$g-merged-run$run" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^prefix"
    done; done
    ;;
prefixrepeat)  # the two-prefix row with 7 timed batches each, the median (prefix_cache.py --repeats): the prefill
    # cascade over both groups against the larger alone, where single batches spread 40-58 ms TTFT
    for g in 4 1; do
        timeout 200 "$PY" benchmarks/prefix_cache.py --prefixes 4096 --groups 2 --cascade-groups $g --repeats 7 \
            --tag="-groups2-cascade$g-repeats" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^prefix"
    done
    ;;
cascaderange)  # the shared kernel looping over the tile's groups only (its least member's group to its greatest),
    # not every slot: GPU tests, then one layer with 1, 2, 4 groups in 4 slots against one group in 1 slot (7-13 %
    # apart before: 0.0290 vs 0.0270 ms at 0.5B 128 rows, 0.0183 vs 0.0161 at 32)
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_cascade_decode.py tests/test_engine.py -k cascade \
        2>&1 | tail -3
    timeout 150 "$PY" benchmarks/cascade_decode.py --batches 32 128 --prefixes 4096 --groups 1 2 4 \
        --tag=-range --out "${OUT:-benchmarks/results}" 2>&1 | tail -14
    timeout 100 "$PY" benchmarks/cascade_decode.py --batches 32 128 --prefixes 4096 --slots 1 \
        --tag=-range --out "${OUT:-benchmarks/results}" 2>&1 | tail -6
    ;;
servingab)  # the offline row (no server row), shared compilation then one per bucket, 3 timed runs each in one
    # process (--repeat): whether the shared compilation costs the offline row (30.9K vs 34.8K tok/s across passes)
    timeout 240 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server --repeat 3 --trace \
        --tag=-ab-shared --out "${OUT:-benchmarks/results}" 2>&1 | tail -4
    timeout 330 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --compile-per-bucket --skip server \
        --repeat 3 --trace --tag=-ab-per-bucket --out "${OUT:-benchmarks/results}" 2>&1 | tail -4
    ;;
servingslow)  # the offline row's decode steps by rows / after a prefill / rows changed (p90 7.7-8.7 ms against p50
    # 1.9 in servingab), then its workload once more under cProfile step by step: where the steps over 5 ms go
    timeout 300 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server --profile-slow 5 \
        --tag=-slow --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^decode.batch1\|^wrote\|^{" | tail -75
    ;;
stalls)  # the offline batch's decode steps where rows changed (7.8 ms each against 1.9, 57 % of the decode time in
    # servingslow): host ms by part, then the synchronizing calls of the steps (sync debug mode)
    timeout 300 "$PY" benchmarks/decode_stalls.py --config minicpm4-0.5b --compile --tag="${TAG:-}" \
        --out "${OUT:-benchmarks/results}" 2>&1 | tail -30
    ;;
prefillprof)  # the offline batch's prefill steps (17 x 35 ms host-seen, 30 of them in the forward, no sync found):
    # each of the first 20 steps profiled and synced: host ms, ms to the sync, kernel ms, cudaMallocs and retries
    timeout 400 "$PY" benchmarks/decode_stalls.py --config minicpm4-0.5b --compile --profile-prefill 20 \
        --tag=-prefillprof --out "${OUT:-benchmarks/results}" 2>&1 | tail -45 | cut -c1-160
    ;;
prefillhost)  # prefillprof found the prefill steps host-bound (kernels 22 ms, host 44-55 ms profiled): the host's
    # functions in the first 16 steps (cProfile; all prefill), full listing in $OUT/prefillhost.txt
    timeout 400 "$PY" benchmarks/decode_stalls.py --config minicpm4-0.5b --compile --cprofile-prefill 16 \
        --tag=-prefillhost --out "${OUT:-benchmarks/results}" > "${OUT:-/tmp}/prefillhost.txt" 2>&1
    grep -A75 "cProfile of" "${OUT:-/tmp}/prefillhost.txt" | cut -c1-150 | grep -v "^$"
    ;;
prefillfix)  # carry ab_old (prepare 448413a): after O(1) free-page counts, the admission's running sum kept and the
    # Triton element-wise kernels in compiled engines' prefill steps: the offline row old/new (3 timed runs each),
    # then the prefill steps profiled again
    timeout 420 bash benchmarks/ab_serving.sh run 1 --compile --repeat 3
    timeout 170 "$PY" benchmarks/decode_stalls.py --config minicpm4-0.5b --compile --profile-prefill 18 \
        --tag=-prefillfix --out "${OUT:-benchmarks/results}" 2>&1 | grep -A22 "^prefill steps of" | cut -c1-120
    ;;
packedprefill)  # carry ab_old (prepare 281de67): a packed multi-row step whose rows are all dense in one varlen flash
    # call on the packed tokens (no pad/gather/scatter, no padded attention), the reclaim heap and rows launched ahead
    # keeping their places (fill_holes): GPU tests, packed vs padded attention alone, the offline row old/new, then
    # the host ms by part (rows-changed steps' table update: 0.43 ms before) and the prefill steps profiled (kernels
    # 20.1 ms a step before, host-bound; in the JSON's prefill_profile)
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_packed_prefill.py tests/test_engine.py \
        -k "packed or launched_ahead or scheduler_matches" 2>&1 | tail -3
    timeout 120 "$PY" benchmarks/packed_prefill.py --config minicpm4-0.5b --device cuda --rows 16 32 --peer attention \
        --out "${OUT:-benchmarks/results}" 2>&1 | tail -4
    timeout 330 bash benchmarks/ab_serving.sh run 1 --compile --repeat 3
    timeout 170 "$PY" benchmarks/decode_stalls.py --config minicpm4-0.5b --compile --profile-prefill 18 \
        --tag=-packed --out "${OUT:-benchmarks/results}" > "${OUT:-/tmp}/packed.txt" 2>&1
    grep -E -A4 "^kind" "${OUT:-/tmp}/packed.txt" | cut -c1-200
    grep -A22 "^prefill steps of" "${OUT:-/tmp}/packed.txt" | cut -c1-120
    ;;
hostcuts)  # carry ab_old (prepare 791ddde): the offline row's ended texts decoded after the run in one batch (were
    # 0.66 ms of each rows-changed step), q and k rotated in one launch, numpy-built prefill ids and block-table
    # rows: GPU tests, the offline row old/new (3 runs each), then host ms by part and the prefill steps profiled
    timeout 60 "$PY" -m pytest -p no:warnings -q -x tests/test_elementwise_triton.py 2>&1 | tail -2
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_packed_prefill.py tests/test_llm_engine.py \
        tests/test_engine.py -k "not warm_up" 2>&1 | tail -3
    timeout 330 bash benchmarks/ab_serving.sh run 1 --compile --repeat 3
    timeout 170 "$PY" benchmarks/decode_stalls.py --config minicpm4-0.5b --compile --profile-prefill 18 \
        --tag=-hostcuts --out "${OUT:-benchmarks/results}" > "${OUT:-/tmp}/hostcuts.txt" 2>&1
    grep -E -A4 "^kind" "${OUT:-/tmp}/hostcuts.txt" | cut -c1-200
    grep -A20 "^prefill steps of" "${OUT:-/tmp}/hostcuts.txt" | cut -c1-120
    ;;
prefillgraphs)  # packed prefill steps through CUDA graphs between their attention calls: GPU tests, the packed
    # step with/without them, then the offline workload's prefill steps profiled (host vs kernel ms) with and without
    timeout 150 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_prefill_graphs.py 2>&1 | tail -3
    timeout 120 "$PY" benchmarks/packed_prefill.py --config minicpm4-0.5b --device cuda --rows 16 32 --peer graphs \
        --out "${OUT:-benchmarks/results}" 2>&1 | tail -4
    for side in "" --no-prefill-graphs; do
        timeout 150 "$PY" benchmarks/decode_stalls.py --config minicpm4-0.5b --compile --profile-prefill 18 $side \
            --tag="-prefillgraphs$side" --out "${OUT:-benchmarks/results}" > "${OUT:-/tmp}/pg$side.txt" 2>&1
        echo "== decode_stalls $side"; grep -E -A4 "^kind" "${OUT:-/tmp}/pg$side.txt" | cut -c1-200
        grep -A26 "^prefill steps of" "${OUT:-/tmp}/pg$side.txt" | cut -c1-110
    done
    ;;
prefillgraphsab)  # carry ab_old (prepare 6eeb316, the commit before them): the offline row old/new (3 runs each)
    timeout 330 bash benchmarks/ab_serving.sh run 1 --compile --repeat 3
    ;;
prefillgraphs2)  # carry .wheels/py312: the engine's GPU tests with prefill graphs on by default
    wheels
    timeout 330 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_llm_engine.py tests/test_engine.py \
        tests/test_serve_process.py tests/test_packed_prefill.py -k "not warm_up" 2>&1 | tail -3
    timeout 150 "$PY" benchmarks/packed_prefill.py --config minicpm4-0.5b --device cuda --rows 2 4 8 --peer graphs \
        --repeats 5 --out "${OUT:-benchmarks/results}" 2>&1 | tail -8
    ;;
wider)  # prefill_graphs.WIDER (off until this runs): GPU tests, then a lone prompt's step with/without the pieces
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_prefill_graphs.py tests/test_packed_prefill.py \
        2>&1 | tail -3
    timeout 150 "$PY" benchmarks/packed_prefill.py --config minicpm4-0.5b --device cuda --rows 1 2 4 --peer graphs \
        --repeats 5 --tag=-wider --out "${OUT:-benchmarks/results}" 2>&1 | tail -8
    for side in "" --prefill-graphs-wider; do  # batch-1 prefill (time to first token) of a lone 1K / 4K prompt
        timeout 150 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 4096 --no-peer --compile \
            $side --tag="-wider$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "prefill|decode" | head -6
    done
    ;;
wider2)  # carry .wheels/py312: with WIDER on by default, the engine's GPU tests, then a lone prompt's prefill
    # narrow first (last pass ran the default first), 1K / 4K / 16K (16K: two 8K chunks, the second InfLLM v2 sparse)
    wheels
    timeout 330 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_prefill_graphs.py tests/test_llm_engine.py \
        tests/test_engine.py tests/test_serve_process.py tests/test_packed_prefill.py tests/test_model.py \
        tests/test_gpu.py tests/test_guided.py 2>&1 | tail -3
    for side in --prefill-graphs-narrow ""; do
        timeout 120 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 4096 16384 --no-peer \
            --compile $side --tag="-wider2$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^(prefill|decode)"
    done
    ;;
wider3)  # carry .wheels/py312: wider2's GPU tests again (the CUDA test counts the cached prefixes' steps), then
    # the server row (64 streaming clients) narrow / default / default / narrow
    wheels
    timeout 330 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_prefill_graphs.py tests/test_llm_engine.py \
        tests/test_engine.py tests/test_serve_process.py tests/test_packed_prefill.py tests/test_model.py \
        tests/test_gpu.py tests/test_guided.py 2>&1 | tail -3
    for side in --prefill-graphs-narrow "" "" --prefill-graphs-narrow; do
        timeout 60 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip offline $side \
            --tag="-wider3$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^server"
    done
    ;;
small)  # where the 0.5B's batch-1 decode step goes (≈ 1.1 ms for ≈ 0.2 ms of weight bytes): its kernels, then the
    # step with the Triton GEMV (one kernel, no split-K reduce) against cuBLAS
    timeout 150 "$PY" benchmarks/profile_engine.py --config minicpm4-0.5b --context 1024 --compile --steps 16 \
        --top 30 --out "${OUT:-benchmarks/results}" 2>&1 | tail -45
    for side in "" --gemv; do
        timeout 120 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 --no-peer --compile $side \
            --tag="-small$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^decode"
    done
    ;;
gemvsmall)  # the GEMV autotuned from CUDA-graph timings, smaller tiles and 8 slices: GPU tests, the 0.5B's
    # matrices against cuBLAS (and a sweep of fixed tiles), then its batch-1 decode with and without
    timeout 90 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_gemv.py 2>&1 | tail -2
    timeout 200 "$PY" benchmarks/gemv.py --config minicpm4-0.5b --rows 1 4 --sweep --tag=-0.5b \
        --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote"
    for side in --gemv ""; do
        timeout 90 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 --no-peer --compile $side \
            --tag="-gemvsmall$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^decode"
    done
    ;;
smallgemv)  # cpm4.kernels.gemv.DECODE_GEMV and FUSE_LAYERS (off until this runs): the GEMV's GPU tests (autotuned
    # from CUDA-graph timings now: slower to tune, hence the longer limit) incl. the engine's plan with and without
    # the fused layers, then the 0.5B's batch-1 decode at 1K and 4K: fused layers, plan, neither
    timeout 240 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_gemv.py 2>&1 | tail -2
    for side in fused plan off; do  # (run 2026-12-01 as --fused-layers, --decode-gemv, neither)
        timeout 110 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 4096 --no-peer --compile \
            --decode-gemv=$side --tag="-smallgemv-$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^decode"
    done
    ;;
fusedlayer)  # a decode layer's work around attention at one row, per layer: cuBLAS + inductor (the engine's), the
    # GEMV plan, the fused GEMVs; 0.5B and 8B shapes
    timeout 400 "$PY" benchmarks/fused_layer.py --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote"
    ;;
fused8b)  # the 8B's batch-1 decode at 32K (InfLLM v2, compiled) with its layers fused (FUSE_LAYERS) and without
    for side in all off; do  # (run 2026-12-01 as --fused-layers and without)
        timeout 280 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse-only --compile \
            --decode-tokens 32 --no-peer --decode-gemv=$side --tag="-fused8b-$side" --out "${OUT:-benchmarks/results}" 2>&1 \
            | grep -E "^(prefill|decode)"
    done
    ;;
gemvdefault)  # carry .wheels/py312: DECODE_GEMV and FUSE_LAYERS on by default (a small model's one-row layers
    # fused): the engine's GPU tests with them (the tiny test models take the plan), then the 8B's shapes at one row,
    # every tile against cuBLAS (why its fused layers lost 3 %)
    wheels
    timeout 400 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_engine.py tests/test_llm_engine.py \
        tests/test_cascade_decode.py tests/test_engine_async.py tests/test_serve_process.py tests/test_guided.py \
        tests/test_prefill_graphs.py tests/test_packed_prefill.py 2>&1 | tail -3
    timeout 150 "$PY" benchmarks/gemv.py --config minicpm4-8b --rows 1 --sweep --tag=-8b-sweep \
        --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote" | tail -40
    ;;
fused8b2)  # the large-matrix tiles re-pruned (4 x 512 in one slice, the 8B sweep's best, now tuned over): the 8B's
    # layer table, then its 32K decode with every layer fused (FUSE_LARGE) and with none
    timeout 200 "$PY" benchmarks/fused_layer.py --config minicpm4-8b --tag=-8b-pruned --out "${OUT:-benchmarks/results}" \
        2>&1 | grep -v "^wrote"
    for side in all off; do
        timeout 150 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse-only --compile \
            --decode-tokens 32 --no-peer --decode-gemv=$side --tag="-fused8b2-$side" --out "${OUT:-benchmarks/results}" \
            2>&1 | grep -E "^(prefill|decode)"
    done
    ;;
planany8b)  # the 8B's 32K decode with q/k/v, o and down through the re-pruned GEMV, unfused (its layer 133.7 -> 128.8
    # µs in fused8b2's table, the fused layer 133.8); run 2026-12-01 as plan-any (plan then held to small models)
    timeout 200 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse-only --compile \
        --decode-tokens 32 --no-peer --decode-gemv=plan --tag="-planany8b" --out "${OUT:-benchmarks/results}" \
        2>&1 | grep -E "^(prefill|decode)"
    ;;
pdl)  # every decode kernel of ours as a programmatic dependent launch (Hopper): GPU tests, then the 0.5B's batch-1
    # decode at 1K/4K (fused layers: all of a layer's kernels ours) off / on / the library's (PDL in fused one-row
    # steps) / off. Ran 2026-12-01 (then "off" was the default, "on" with the GEMV's weight prefetch, since
    # dropped): off 0.82/0.87 ms, on 0.77/0.84, without the prefetch the same
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_pdl.py \
        tests/test_infllm_v2_triton.py -k "pdl or stores" 2>&1 | tail -2
    timeout 120 "$PY" -m pytest -m gpu -p no:warnings -q -x \
        "tests/test_infllm_v2_triton.py::test_gpu_paged_sparse_decode" 2>&1 | tail -2  # (LSE and merge now PDL too)
    i=0
    for side in off on auto off; do
        i=$((i + 1))
        pre=""; [ "$side" != auto ] && pre="--pdl=$side"
        timeout 60 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 4096 --no-peer --compile \
            $pre --tag="-pdl$i-$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^decode"
    done
    ;;
pdl8b)  # the 8B's batch-1 decode at 32K (InfLLM v2): PDL off / on with the default plan (q/k/v, o, down through the
    # GEMV), then with every layer fused (all ours: the whole chain programmatic) on / off. Ran 2026-12-01 with
    # the GEMV's weight prefetch (since dropped): 5.58 / 6.63 / 7.57 / 5.76 ms; without it (plan) 5.59-5.62
    # against 5.52-5.55 off
    limit=120
    for side in "off plan" "on plan" "on all" "off all"; do
        set -- $side
        timeout $limit "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse-only --compile \
            --decode-tokens 32 --no-peer --pdl=$1 --decode-gemv=$2 --tag="-pdl-$1-$2" \
            --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^decode"
        limit=90
    done
    ;;
pdlauto)  # carry .wheels/py312: PDL by default in the fused one-row decode steps (pdl.ours, cuda_graph.FUSED_PDL):
    # the PDL and plan GPU tests and the engine's, then the 0.5B's batch-1 decode with the defaults and with
    # --pdl=off, and the 8B's 32K (unchanged: not fused)
    wheels
    timeout 120 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_pdl.py tests/test_gemv.py -k "pdl or plan" \
        2>&1 | tail -2
    timeout 240 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_engine.py tests/test_cascade_decode.py 2>&1 \
        | tail -2
    for side in auto off auto; do
        pre=""; [ "$side" != auto ] && pre="--pdl=$side"
        timeout 60 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 4096 --no-peer --compile \
            $pre --tag="-pdlauto-$side" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^decode"
    done
    ;;
plan8b)  # which of the 8B's projections to run through the GEMV at one row (the sweep: q/k/v 1.16x, o 1.09x,
    # gate/up 1.04x, down 0.98x, the head 1.13x): the plan (q/k/v, o, down) against q/k/v, o, gate/up, head and
    # against all five, 32K decode, one call
    limit=120
    for side in "" qkv,o,gate_up,lm_head qkv,o,gate_up,down,lm_head; do
        pre=""; [ -n "$side" ] && pre="--decode-gemv=off --gemv $side"
        timeout $limit "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse-only --compile \
            --decode-tokens 32 --no-peer $pre --tag="-plan8b" --out "${OUT:-benchmarks/results}" \
            2>&1 | grep -E "^decode"
        limit=90
    done
    ;;
union)  # stage 2's own blocks over the union of T neighbouring tokens' (triton_union.UNION_TOKENS, off): GPU tests,
    # then stage2_union.py at 32K and 128K (drawn selections from "vertical" (noise 0) to independent (100); T 2/4/8)
    timeout 200 "$PY" -m pytest -p no:warnings -q -x tests/test_infllm_v2_union.py 2>&1 | tail -2  # (all: CUDA tensors)
    timeout 360 "$PY" benchmarks/stage2_union.py --lengths 32768 131072 --out "${OUT:-benchmarks/results}" 2>&1 \
        | grep -v "^wrote"
    ;;
unionauto)  # the union path deciding for itself (triton_union.likely's sample of 1/16 of the tiles, then the whole
    # count; UNION_TOKENS = 4): GPU tests, stage2_union.py's T = 4 and auto rows at 32K and 128K (what a declined call
    # costs on random inputs), then the 8B's 128K prefill and decode with --union-tokens 4 against off (random weights:
    # expect the path declined and the same speed; if so, on by default is safe for trained checkpoints)
    timeout 150 "$PY" -m pytest -p no:warnings -q -x tests/test_infllm_v2_union.py 2>&1 | tail -2
    timeout 200 "$PY" benchmarks/stage2_union.py --lengths 32768 131072 --tokens 4 --tag=-auto \
        --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote"
    ;;
unionsample)  # the sample as one kernel (triton_union.sample_counts; was torch sorts: 0.41 / 0.83 ms at 32K / 128K):
    # the union GPU tests, then stage2_union.py's T = 4, auto and sample rows (no backward rows)
    timeout 150 "$PY" -m pytest -p no:warnings -q -x tests/test_infllm_v2_union.py 2>&1 | tail -2
    timeout 200 "$PY" benchmarks/stage2_union.py --lengths 32768 131072 --tokens 4 --backward 0 --tag=-sample \
        --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote"
    ;;
unionkernel)  # the whole union count as one kernel (triton_union._union_kernel; was torch sorts: 1.2 / 4.1 ms at
    # 32K / 128K, 8B shape): the union GPU tests, then stage2_union.py's T = 4 (forced: the count included), auto,
    # sample and count rows, noise 0 and 100 (against 2026-12-01's forced T4 9.79-9.90 / 39.9-40.0 ms at noise 0)
    timeout 150 "$PY" -m pytest -p no:warnings -q -x tests/test_infllm_v2_union.py 2>&1 | tail -2
    timeout 200 "$PY" benchmarks/stage2_union.py --lengths 32768 131072 --tokens 4 --noise 0 100 --backward 0 \
        --tag=-unionkernel --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote"
    ;;
uniondevice)  # the union path decided on the device (triton_union.choose: no host read; both kernels launched, one
    # returning at once; the union kernels' launch fixed, not autotuned): the union GPU tests, then stage2_union.py's
    # T = 4 rows at noise 0 and 100 with each launch candidate (--configs), the auto / decide / count rows and the
    # backward (against the fortieth session's forced T4 9.25 / 37.97 ms, auto declining at 0.96x / 0.98x)
    timeout 150 "$PY" -m pytest -p no:warnings -q -x tests/test_infllm_v2_union.py 2>&1 | tail -2
    timeout 300 "$PY" benchmarks/stage2_union.py --lengths 32768 131072 --tokens 4 --noise 0 100 --backward 4 \
        --configs 4,2 8,2 4,3 8,3 --tag=-uniondevice --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote"
    ;;
uniondecline)  # where a declined union call's time goes (union_decline.py: kernel by kernel, plan against none),
    # and the union kernels' launch at T = 8 (4 or 8 warps), noise 0, 32K
    timeout 150 "$PY" benchmarks/union_decline.py --lengths 32768 131072 --out "${OUT:-benchmarks/results}" 2>&1 \
        | grep -v "^wrote"
    timeout 150 "$PY" benchmarks/stage2_union.py --lengths 32768 --tokens 8 --noise 0 --backward 0 --auto 0 \
        --configs 4,2 8,2 --tag=-uniont8 --out "${OUT:-benchmarks/results}" 2>&1 | grep -v "^wrote"
    ;;
unionauto8b)  # unionauto's second call (each 8B 128K run takes 2-3 minutes): the 8B's 128K with --union-tokens 4
    # against 0 (the first run compiles: 150 s was too short for it twice on 2026-12-01)
    limit=220
    for side in 0 4 0; do
        timeout $limit "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 131072 --sparse-only --compile \
            --decode-tokens 32 --no-peer --union-tokens $side --tag="-union$side" --out "${OUT:-benchmarks/results}" \
            2>&1 | grep -E "^(prefill|decode)"
        limit=150
    done
    ;;
densestore)  # the dense paged decode storing the new token inside its attention launch (FUSE_DENSE_STORE_ROWS):
    # its GPU tests, then the 0.5B's batch-1 decode (dense) off / on / on without PDL / off
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_infllm_v2_triton.py -k stores_the_new_token \
        2>&1 | tail -2
    i=0
    for side in --fuse-dense-store=off --fuse-dense-store=on "--fuse-dense-store=on --pdl=off" \
        --fuse-dense-store=off; do
        i=$((i + 1))
        timeout 60 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 1024 4096 --no-peer --compile \
            $side --tag="-densestore$i$(echo $side | tr -d ' =-')" --out "${OUT:-benchmarks/results}" 2>&1 \
            | grep -E "^decode"
    done
    ;;
densesteps)  # an InfLLM v2 model's decode steps below dense_len through the dense decode (paged.DENSE_STEPS, off):
    # the GPU tests, then the 8B's batch-1 decode at 1K and 4K (sparse config, below its 8,192), off / on. Ran
    # 2026-12-01 (4K only; the 0.5B has no sparse config): test passes, 4.99 -> 4.94 ms
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_engine.py -k dense_step 2>&1 | tail -2
    for side in "" --dense-steps; do
        timeout 120 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 1024 4096 --sparse-only \
            --compile --decode-tokens 64 --no-peer $side --tag="-densesteps$side" --out "${OUT:-benchmarks/results}" \
            2>&1 | grep -E "^decode"
    done
    ;;
apidetok)  # carry .wheels/py312: GPU tests after the packed step's batch_continuing_rows fix and the host cuts,
    # then the http row (engine process) with the API process decoding the texts (api_detokenize) and without,
    # alternated
    wheels
    timeout 60 "$PY" -m pytest -p no:warnings -q -x tests/test_elementwise_triton.py 2>&1 | tail -2
    timeout 240 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_packed_prefill.py tests/test_llm_engine.py \
        tests/test_engine.py tests/test_serve_process.py 2>&1 | tail -3
    for side in --api-detokenize --no-api-detokenize; do
        timeout 200 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --http --skip offline --skip server \
            --engine-process $side --tag="-${side#--}" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^http|^decode"
    done
    ;;
apidetok2)  # carry .wheels/py312: the model's GPU tests (q and k rotated in one launch), then apidetok's http pair
    # again in the other order
    wheels
    timeout 150 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_model.py tests/test_gpu.py 2>&1 | tail -2
    for side in --no-api-detokenize --api-detokenize; do
        timeout 200 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --http --skip offline --skip server \
            --engine-process $side --tag="-r2-${side#--}" --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^http|^decode"
    done
    ;;
detok)  # a finished output's detokenizing on the device's host (5.3 ms a rows-changed step in stalls), rayon on / off
    "$PY" benchmarks/detok_speed.py --tag="${TAG:-}" --out "${OUT:-benchmarks/results}" 2>&1 | tail -8
    TOKENIZERS_PARALLELISM=false "$PY" benchmarks/detok_speed.py --tag="${TAG:-}-serial" \
        --out "${OUT:-benchmarks/results}" 2>&1 | tail -8
    ;;
stallsfix)  # after the one-window deferred text and the pinned row index: stalls again, then the offline row x3
    TAG=-fix bash "$0" stalls
    timeout 240 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server --repeat 3 \
        --tag=-detok --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^offline|^timed run" | cut -c1-60
    ;;
servertext)  # the server row with clients reading their text at the end (responses not streamed: the engine
    # decodes it once), 3 rounds alternating with streamed clients (one round measured 17.8K against 20.4K/19.2K:
    # order or the kind?); then the launched-ahead GPU test (sync debug mode, mixed sampling)
    timeout 300 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip offline --text-at-end 3 \
        --tag=-text-at-end-x3 --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "^server|^decode"
    timeout 150 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_engine.py -k "launched_ahead or never_wait" \
        2>&1 | tail -3
    ;;
sampling)  # a step's draw: seeded rows together (exponential race, a noise launch a row) against one multinomial a
    # row as before; greedy and unseeded for scale
    timeout 200 "$PY" benchmarks/sampling.py --tag="${TAG:-}" --out "${OUT:-benchmarks/results}" 2>&1 | tail -15
    ;;
cascadeeven)  # where cascade decode breaks even on the 8B shape (32 rows x 4K: 0.8-1.0x; 128 rows: 1.4x)
    timeout 200 "$PY" benchmarks/cascade_decode.py --shapes 8b 0.5b --batches 16 32 48 64 96 --prefixes 2048 4096 8192 \
        --tag=-even --out "${OUT:-benchmarks/results}" 2>&1 | grep cascade_decode
    ;;
prefixgroups)  # 32 requests over 2 cached 4K prefixes (0.5B): the cascades for both groups against the largest alone
    for g in 4 1; do
        timeout 280 "$PY" benchmarks/prefix_cache.py --prefixes 4096 --groups 2 --cascade-groups $g \
            --tag="-groups2-cascade$g" 2>&1 | tail -7
    done
    ;;
servingdynamic)  # the compiled rows with the shared compilation (tuned at the largest bucket), then the server row
    # with a compilation per bucket (server.64 16.8x in the one run with the shared one, 16.1-22.4x before)
    timeout 250 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --tag=-dynamic-largest \
        --out "${OUT:-benchmarks/results}" 2>&1 | tail -5
    timeout 300 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --compile-per-bucket --skip offline \
        --tag=-per-bucket --out "${OUT:-benchmarks/results}" 2>&1 | tail -4
    ;;
http)  # carry .wheels/py312
    wheels
    # (the stand-in rows, benchmarks/http_overhead.py, were measured in the ninth session; run them in httpdiag)
    timeout 250 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --http --skip offline --skip server \
        --no-engine-process 2>&1 | tail -3
    for f in benchmarks/results/serving-minicpm4-0.5b-$(date +%F).json; do cp "$f" "${f%.json}-thread.json"; done
    # the engine in a child process (cpm4 serve --engine-process)
    timeout 320 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --http --skip offline --skip server \
        --engine-process 2>&1 | tail -3
    if [ -n "${OUT:-}" ]; then
        cp benchmarks/results/serving-minicpm4-0.5b-$(date +%F)*.json "$OUT"/
    fi
    ;;
httpdiag)  # carry .wheels/py312
    wheels
    "$PY" -m pip uninstall -q -y uvloop httptools 2>/dev/null
    timeout 90 "$PY" benchmarks/http_overhead.py --tag asyncio-h11 2>&1 | tail -5
    timeout 240 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --http --skip offline --skip server \
        --http-client httpx --no-engine-process 2>&1 | tail -3
    for f in benchmarks/results/serving-minicpm4-0.5b-$(date +%F)*.json; do cp "$f" "${f%.json}-httpx.json"; done
    for f in benchmarks/results/http_overhead-$(date +%F)*.json; do cp "$f" "${f%.json}-asyncio.json"; done
    "$PY" -m pip install -q --no-index --find-links .wheels/py312 uvloop httptools 2>&1 | grep -v WARNING
    timeout 90 "$PY" benchmarks/http_overhead.py --tag uvloop-httptools 2>&1 | tail -5
    timeout 240 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --http --skip offline --skip server \
        --no-engine-process 2>&1 | tail -3
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/serving-minicpm4-0.5b-$(date +%F)*.json benchmarks/results/http_overhead-$(date +%F)*.json "$OUT"/; fi
    ;;
httpgil)  # carry .wheels/py312: the thread-mode HTTP row with a 0.5 ms GIL switch interval (default 5 ms)
    wheels
    timeout 500 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --http --skip offline --skip server \
        --switch-interval-ms 0.5 --no-engine-process 2>&1 | tail -3
    if [ -n "${OUT:-}" ]; then cp benchmarks/results/serving-minicpm4-0.5b-$(date +%F).json "$OUT"/; fi
    ;;
elementwise)  # the hand-written element-wise kernels (cpm4.kernels.elementwise): GPU tests, op timings against
    # eager and inductor, then batch-1 generation without --compile, op by op against the kernels
    timeout 150 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_elementwise_triton.py 2>&1 | tail -3
    timeout 120 "$PY" benchmarks/fused_ops.py --tokens 8192 131072 2>&1 | grep -v Warn | tail -10
    for ew in eager triton; do
        timeout 100 "$PY" benchmarks/generation.py --config minicpm4-0.5b --contexts 4096 --decode-tokens 128 \
            --no-peer --elementwise $ew 2>&1 | tail -3
        timeout 150 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse \
            --decode-tokens 32 --no-peer --elementwise $ew 2>&1 | tail -5
    done  # (the benchmarks write their JSON under $OUT themselves)
    ;;
gemv)  # the decode GEMV kernel (cpm4.kernels.gemv, second version): GPU tests, then against cuBLAS
    timeout 150 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_gemv.py 2>&1 | tail -3
    timeout 120 "$PY" benchmarks/gemv.py --rows 1 4 2>&1 | grep -v Warn | tail -14
    for g in "" --gemv; do  # the 8B decode step, compiled, with cuBLAS and with the GEMV
        timeout 150 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse --compile \
            --decode-tokens 32 --no-peer $g 2>&1 | tail -5
    done
    ;;
gemvmix)  # the GEMV only where it beat cuBLAS per matrix (q/k/v, gate/up, head), the 8B decode at 32K, compiled
    for g in "" "--gemv qkv,gate_up,lm_head"; do
        timeout 200 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 32768 --sparse --compile \
            --decode-tokens 32 --no-peer $g 2>&1 | tail -5
    done
    ;;
backward)  # the 128K backward kernel by kernel with the dk/dv variants (tile, chunk); the prefill/backward rows at
    # 32K and 128K; the backward's GPU tests (pipelines with gradients, the split)
    timeout 150 "$PY" benchmarks/backward_profile.py --length 131072 --steps 2 --top 5 --dkdv-variants 2>&1 \
        | grep -E "^dkdv|at 131072|_kernel"
    timeout 250 "$PY" benchmarks/attention.py --lengths 32768 131072 2>&1 | grep -E "^(prefill|backward|forward)|device"
    timeout 140 "$PY" -m pytest -m gpu -p no:warnings -x --durations=4 tests/test_infllm_v2_triton.py \
        -k "split_dkdv or 8b_blocks or lengths_and_chunks or model_sparse" 2>&1 | tail -8
    ;;
prefix)  # prefix caching on against off: 0.5B, 32 requests sharing 1K/4K/16K-token prefixes; then 8B at 30K (its context is 32K)
    timeout 330 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b 2>&1 | tail -12
    timeout 220 "$PY" benchmarks/prefix_cache.py --config minicpm4-8b --prefixes 30000 --requests 8 2>&1 | tail -6
    ;;
rows)  # sparse rows of a step in one launch per InfLLM v2 stage: GPU tests, then prefix caching at 16K/4K with the
    # batched kernels and with a pipeline per row (--sparse-row-by-row), same code otherwise
    timeout 260 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_infllm_v2_triton.py tests/test_engine.py \
        -k "rows_in_one or continuing_rows or scheduler_matches_generate or model_sparse_prefill or (pipeline_lengths and not 4100)" \
        2>&1 | tail -4
    timeout 140 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 16384 4096 --tag=-rows 2>&1 | tail -8
    # where the warm 16K batch's first step goes (top ops by device and host time)
    timeout 100 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 16384 --profile --tag=-profile \
        2>&1 | tail -48
    timeout 140 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 16384 4096 --sparse-row-by-row \
        --tag=-sparse-rowbyrow 2>&1 | tail -8
    ;;
cascade)  # the cascade over shared prefix pages (twenty-first session, CPU-tested only)
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -x tests/test_engine.py \
        -k "cascade or continuing_rows or never_wait" 2>&1 | tail -3
    timeout 130 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 16384 4096 --tag=-cascade \
        2>&1 | tail -7
    timeout 130 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 16384 4096 --no-cascade \
        --tag=-nocascade 2>&1 | tail -7
    timeout 100 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 16384 --profile \
        --tag=-cascade-profile 2>&1 | grep -E "Self|flash|gather|index_select|cudaMemcpy|under cProfile" | head -20
    ;;
cascadedecode)  # cascade decode (twenty-second session, interpreter-tested only): GPU tests, kernel rows, 0.5B engine
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings tests/test_cascade_decode.py -rA 2>&1 \
        | grep -E "^(PASSED|FAILED|ERROR)|passed|failed" | cut -c1-150
    timeout 300 "$PY" benchmarks/cascade_decode.py --tile-queries 64 128 --own-splits 0 2 2>&1 | tail -100 | cut -c1-90
    timeout 150 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 4096 --output 128 \
        --cascade-decode --tag=-cascadedecode 2>&1 | tail -5
    timeout 150 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 4096 --output 128 \
        --no-cascade-decode --tag=-nocascadedecode 2>&1 | tail -5
    ;;
cascadedecode8b)  # the 8B shape's dense rows (below dense_len) after a 4K prefix, cascade decode on and off
    timeout 250 "$PY" benchmarks/prefix_cache.py --config minicpm4-8b --prefixes 4096 --output 64 --cascade-decode \
        --tag=-cascadedecode 2>&1 | tail -5
    timeout 250 "$PY" benchmarks/prefix_cache.py --config minicpm4-8b --prefixes 4096 --output 64 \
        --no-cascade-decode --tag=-nocascadedecode 2>&1 | tail -5
    ;;
cascadedecode2)  # after the sparse-member fix: GPU tests, then decode after a shared prefix, on and off (0.5B, 8B)
    timeout 150 "$PY" -m pytest -m gpu -p no:warnings tests/test_cascade_decode.py -rA 2>&1 \
        | grep -E "^(PASSED|FAILED|ERROR)|passed|failed" | cut -c1-150
    echo "pytest rc=${PIPESTATUS[0]} (124: timed out)"
    for t in cascadedecode nocascadedecode; do
        flag=$([ $t = cascadedecode ] && echo --cascade-decode || echo --no-cascade-decode)
        timeout 150 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 2048 8192 --requests 64 \
            --output 256 $flag --tag=-$t-decode 2>&1 | grep -E "^prefix\.(all|ttft) "
    done
    for t in cascadedecode nocascadedecode; do
        flag=$([ $t = cascadedecode ] && echo --cascade-decode || echo --no-cascade-decode)
        timeout 200 "$PY" benchmarks/prefix_cache.py --config minicpm4-8b --prefixes 4096 --requests 32 \
            --output 64 $flag --tag=-$t-decode 2>&1 | grep -E "^prefix\.(all|ttft) "
    done
    [ -n "$OUT" ] && cp benchmarks/results/prefix_cache-*-decode-"$(date +%F)".json "$OUT"/
    ;;
cascadetests)  # the GPU tests of cascade decode (compiled graphs included)
    timeout 400 "$PY" -m pytest -m gpu -p no:warnings tests/test_cascade_decode.py -rA 2>&1 \
        | grep -E "^(FAILED|ERROR)|passed|failed" | cut -c1-150
    echo "pytest rc=${PIPESTATUS[0]} (124: timed out)"
    ;;
warmup)  # LLMEngine.warm_up's seconds with cascade decode on (its graphs captured too) and off, eager and compiled
    timeout 560 "$PY" benchmarks/warmup_time.py --out "${OUT:-benchmarks/results}" 2>&1 | grep -E "warm_up|^phase"
    ;;
warmupdynamic)  # the compiled warm-up with the batch dimension symbolic (cuda_graph.DYNAMIC_BATCH) against a
    # compilation per bucket, and each bucket's captured step replayed under both; then the compiled GPU tests
    timeout 420 "$PY" benchmarks/warmup_time.py --modes dynamic --out "${OUT:-benchmarks/results}" \
        2>&1 | grep -E "warm_up|^phase|^replay"
    timeout 150 "$PY" -m pytest -m gpu -p no:warnings -q tests/test_engine.py tests/test_cascade_decode.py \
        -k "compile" 2>&1 | tail -4
    ;;
dynamiccode)  # why the shared compilation from bucket 4 replayed 8% slower than the one from 2 (RESULTS, "One
    # compilation for the decode buckets"): both, the kernels of buckets 4 and 192, inductor's code (gzipped) in $OUT
    log="${OUT:-/tmp}/dynamic-code.log"
    TORCH_LOGS=output_code timeout 420 "$PY" benchmarks/warmup_time.py --modes dynamic --dynamic-from 2 \
        --peer-dynamic-from 4 --profile-sizes 4 192 --out "${OUT:-benchmarks/results}" > "$log" 2>&1
    grep -E "^warm_up|^phase|^replay|^bucket|^ +[0-9]+\.[0-9] +[0-9]+\.[0-9]  " "$log" | tail -50
    gzip -f "$log"
    ;;
warmupeager)  # warm_up with CUDA graphs off (an eager decode step per batch size) against the graphs' own, at the
    # server's default 16 and at LLM's 256
    for mb in 16 256; do
        timeout 280 "$PY" benchmarks/warmup_time.py --modes nographs --max-batch $mb --out "${OUT:-benchmarks/results}" \
            2>&1 | grep -E "warm_up|^phase"
    done
    ;;
servingsys)  # the offline row after a shared 2,048-token system prompt, cascade decode on (one call; servingsysoff: off)
    timeout 560 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server --system-prompt 2048 \
        --cascade-decode --tag=-sys2048-cascadedecode 2>&1 | tail -6
    ;;
servingsys2)  # the offline row after two 2,048-token system prompts (requests alternating), compiled: cascades for
    # both prefix groups (default), then for the larger alone (--cascade-groups 1)
    for g in 4 1; do
        timeout 280 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server --system-prompt 2048 \
            --system-prompts 2 --cascade-groups $g --tag=-sys2048x2-groups$g 2>&1 | tail -3
    done
    ;;
servingsysoff)
    timeout 560 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server --system-prompt 2048 \
        --no-cascade-decode --tag=-sys2048 2>&1 | tail -6
    ;;
servingsyseager)  # eager graphs, cascade decode off/on alternating, 2 processes each with 3 timed runs (≈ 4 min):
    # the spread inside one process against the spread between processes; warm_up's gc.freeze; each run's decode
    # steps' p10/p50/p90 host ms tell a run slower throughout from one with stalls
    for i in 1 2; do for c in no-cascade-decode cascade-decode; do
        timeout 140 "$PY" benchmarks/serving.py --config minicpm4-0.5b --skip server --system-prompt 2048 --$c \
            --repeat 3 --tag=-sys2048-eager-$c-p$i 2>&1 | grep -E "^timed run|^offline" \
            | sed -E "s/triton_by_name[^}]*\}, //; s/^/$c p$i /" | cut -c1-400
    done; done
    ;;
jitvariants)  # Triton compilations met round by round after warm_up (benchmarks/jit_variants.py): 0.5B dense rows,
    # InfLLM v2 rows past 2K, rows continuing a cached 4K prefix (few queries after many keys)
    timeout 150 "$PY" benchmarks/jit_variants.py --config minicpm4-0.5b 2>&1 | tail -9 | cut -c1-220
    timeout 200 "$PY" benchmarks/jit_variants.py --config minicpm4-0.5b --dense-len 2048 --max-len 8192 --requests 8 \
        2>&1 | tail -9 | cut -c1-220
    timeout 200 "$PY" benchmarks/jit_variants.py --config minicpm4-0.5b --dense-len 2048 --shared-prefix 4096 \
        --max-len 512 2>&1 | tail -9 | cut -c1-220
    ;;
jiteager)  # as jitvariants with CUDA graphs off (--enforce-eager): the eager decode steps' kernels as well (a
    # block table of decode_width columns and _warm_decode since the twenty-seventh session)
    timeout 200 "$PY" benchmarks/jit_variants.py --config minicpm4-0.5b --eager --tag=-eager 2>&1 | tail -9 | cut -c1-220
    timeout 250 "$PY" benchmarks/jit_variants.py --config minicpm4-0.5b --dense-len 2048 --max-len 8192 --requests 8 \
        --eager --tag=-eager 2>&1 | tail -9 | cut -c1-220
    ;;
alignlens)  # the kernels' rows at a multiple of 16 and one token less: the benchmarks' lengths (powers of 2) get
    # Triton's divisible-by-16 variants, most real lengths the other one (does the table overstate real prompts?)
    timeout 300 "$PY" benchmarks/attention.py --lengths 32768 32767 131072 131071 --skip-backward --out "${OUT:-/tmp}" \
        2>&1 | grep -E "^(phase|prefill|decode)" | cut -c1-120
    ;;
abattention)  # carry ab_old (bash benchmarks/ab_serving.sh prepare <commit before the specialization change>): the
    # kernels' prefill and decode rows, old and new alternated, at lengths of both kinds
    for side in old new new old; do
        s=benchmarks/attention.py; [ "$side" = old ] && s=ab_old/benchmarks/attention.py
        timeout 140 "$PY" "$s" --lengths 32767 131072 --skip-backward --out "${OUT:-/tmp}/ab-$side" 2>&1 \
            | grep -E "^(prefill|decode)" | sed "s/^/$side /" | cut -c1-110
    done
    ;;
abbackward)  # carry ab_old: as abattention with the backward rows, at 131,072 only (unspecialized backward lengths)
    for side in old new new old; do
        s=benchmarks/attention.py; [ "$side" = old ] && s=ab_old/benchmarks/attention.py
        timeout 140 "$PY" "$s" --lengths 131072 --out "${OUT:-/tmp}/abb-$side" 2>&1 \
            | grep -E "^(prefill|backward|forward)" | sed "s/^/$side /" | cut -c1-110
    done
    ;;
stage2ab)  # carry ab_old: stage 2 at 128K kernel by kernel (benchmarks/stage2_ab.py), old, new and new with the
    # forward kernels' lengths specialized again (a copy with their do_not_specialize removed), alternated
    rm -rf /tmp/spec && mkdir -p /tmp/spec && cp -r cpm4 /tmp/spec/
    sed -i -E 's/^@triton.jit\(do_not_specialize=\["(tq", "q_start", "tk", "n_rows", "n_programs|q_start", "tk", "n_rows", "nsel)"\]\).*/@triton.jit/' \
        /tmp/spec/cpm4/kernels/infllm_v2/triton_attention.py
    grep -c "^@triton.jit$" /tmp/spec/cpm4/kernels/infllm_v2/triton_attention.py
    for side in old new spec new old spec; do
        root=.; [ "$side" = old ] && root=ab_old; [ "$side" = spec ] && root=/tmp/spec
        timeout 90 "$PY" benchmarks/stage2_ab.py --root "$root" --tag $side --out "${OUT:-/tmp}/stage2-$side" 2>&1 \
            | grep -E "^$side " | cut -c1-160
    done
    ;;
ncushared)  # Nsight Compute on _fwd_shared_kernel at 128K after autotuning: the checkout against a copy with the
    # forward kernels' lengths specialized (as stage2ab's spec side; 8 % faster there): details pages under $OUT
    rm -rf /tmp/spec && mkdir -p /tmp/spec && cp -r cpm4 /tmp/spec/
    sed -i -E 's/^@triton.jit\(do_not_specialize=\["(tq", "q_start", "tk", "n_rows", "n_programs|q_start", "tk", "n_rows", "nsel)"\]\).*/@triton.jit/' \
        /tmp/spec/cpm4/kernels/infllm_v2/triton_attention.py
    for side in new spec; do
        root=.; [ "$side" = spec ] && root=/tmp/spec
        timeout 250 ncu --profile-from-start off --kernel-name regex:_fwd_shared_kernel --set full --import-source no \
            --page details "$PY" benchmarks/stage2_ab.py --root "$root" --ncu > "${OUT:-/tmp}/ncu-shared-$side.txt" 2>&1
        echo "$side rc=$? $(wc -l < "${OUT:-/tmp}/ncu-shared-$side.txt") lines"
        grep -E "Duration|Registers Per|Achieved Occupancy|Memory Throughput|Compute \(SM\) Throughput|L2 Hit|Issued Ipc" \
            "${OUT:-/tmp}/ncu-shared-$side.txt" | head -12
    done
    ;;
sharedargs)  # which unspecialized length argument costs _fwd_shared_kernel its 8 %: copies of the checkout with one
    # of them specialized again (tq, q_start, tk) or all (spec), stage 2 kernel by kernel, alternated
    line=$(grep -n '^def _fwd_shared_kernel' cpm4/kernels/infllm_v2/triton_attention.py | cut -d: -f1)
    for a in tq q_start tk all; do
        rm -rf /tmp/sp-$a && mkdir -p /tmp/sp-$a && cp -r cpm4 /tmp/sp-$a/
        f=/tmp/sp-$a/cpm4/kernels/infllm_v2/triton_attention.py
        if [ $a = all ]; then sed -i "$((line - 1))s/.*/@triton.jit/" $f; else sed -i "$((line - 1))s/\"$a\", //" $f; fi
        sed -n "$((line - 1))p" $f
    done
    for side in new tq q_start tk all new tk all; do
        root=.; [ "$side" != new ] && root=/tmp/sp-$side
        timeout 90 "$PY" benchmarks/stage2_ab.py --root "$root" --tag $side --reps 20 2>&1 | grep -E "^$side +_fwd_shared" \
            | cut -c1-120
    done
    ;;
firststep)  # host-seen 93 ms for ~20 ms of GPU work (8B) in the nineteenth pass: the profile's host rows say where
    timeout 250 "$PY" benchmarks/prefix_cache.py --config minicpm4-8b --prefixes 30000 --requests 8 --profile \
        --tag=-firststep 2>&1 | tail -45 | cut -c1-170
    timeout 130 "$PY" benchmarks/prefix_cache.py --config minicpm4-0.5b --prefixes 16384 --profile \
        --tag=-firststep 2>&1 | tail -26 | cut -c1-170
    ;;
batcheddecode)  # where FUSE_DENSE_STORE_ROWS and STORE_PEEL should stand (forty-seventh pass: the fused store lost
    # 10-15 % a step at 128-256 rows)
    timeout 200 "$PY" -m pytest -m gpu -p no:warnings -q -x tests/test_infllm_v2_triton.py \
        -k "stores_the_new_token or stores_and_pools" 2>&1 | tail -2
    timeout 200 "$PY" benchmarks/batched_decode.py --config minicpm4-0.5b --out "${OUT:-benchmarks/results}"
    timeout 150 "$PY" benchmarks/batched_decode.py --config minicpm4-8b --batches 1 16 64 --lengths 1024 4096 \
        --out "${OUT:-benchmarks/results}"
    ;;
splitwave)  # one split a row once a step's (row, KV head) programs fill the SMs (forty-eighth pass: the store
    # apart with one split beat the default two at 128 rows x 512-2048 of the 0.5B; the store in the launch lost at
    # 256 rows, where one split is the default): each store path at the default splits and at one, and at two
    timeout 250 "$PY" benchmarks/batched_decode.py --config minicpm4-0.5b --batches 64 96 128 192 256 \
        --variants apart fused.peel apart.sp1 fused.peel.sp1 apart.sp2 fused.peel.sp2 --out "${OUT:-benchmarks/results}"
    timeout 150 "$PY" benchmarks/batched_decode.py --config minicpm4-8b --batches 32 64 128 --lengths 1024 4096 \
        --variants apart fused.peel apart.sp1 fused.peel.sp1 --out "${OUT:-benchmarks/results}"
    ;;
peel8b)  # STORE_PEEL in the 8B's sparse decode (the LSE launch's completed key scored after its loop): 128K decode
    # with it off and on (the default) alternated (its GPU tests passed in the forty-eighth pass)
    i=0
    # 190 s a run: the call's first run compiles cold (the forty-eighth pass's took over 150 s)
    for side in "--store-peel off" "" "--store-peel off"; do
        i=$((i + 1))
        timeout 190 "$PY" benchmarks/generation.py --config minicpm4-8b --contexts 131072 --sparse-only --compile \
            --decode-tokens 64 --no-peer $side --tag="-peel$i" --out "${OUT:-benchmarks/results}" 2>&1 \
            | grep -E "^decode" | sed "s/^/$i [${side:-default}] /"
    done
    ;;
batchedab)  # the offline row (0.5B, 256 requests, compiled, one run each with the step trace): the store swapped
    # into its tile up to 32 rows (the forty-seventh pass's rule), then the default (peeled, up to 128 rows), 64
    i=0
    for side in "--fuse-dense-store 32 --store-peel off" "" "--fuse-dense-store 64" \
        "--fuse-dense-store 32 --store-peel off" ""; do
        i=$((i + 1))
        timeout 150 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --trace --skip server $side \
            --out "${OUT:-/tmp}/ab$i" 2>&1 | grep -E "^  decode <=|^offline" | sed "s/^/$i [${side:-default}] /"
    done
    ;;
prefill8b)
    timeout 560 "$PY" benchmarks/profile_engine.py --config minicpm4-8b --context 131072 --sparse --compile \
        --steps 4 --top 30 2>&1 | head -60
    ;;
diag)
    timeout 120 "$PY" benchmarks/sdpa_shapes.py --config minicpm4-0.5b 2>&1 | tail -10
    timeout 120 "$PY" benchmarks/packed_prefill.py --config minicpm4-0.5b --device cuda --rows 8 16 2>&1 | tail -4
    timeout 420 "$PY" benchmarks/serving.py --config minicpm4-0.5b --compile --skip server 2>&1 | tail -8
    ;;
*)
    echo "unknown stage $stage (tests, tests2, servetests, elementwise, gemv, gemvmix, decode, kernels, engine, serving, http, httpdiag, httpgil, backward, prefill8b, diag)" >&2
    exit 2
    ;;
esac
