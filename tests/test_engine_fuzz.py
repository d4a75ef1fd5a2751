"""Seeded random workloads through the scheduler: requests arriving at random steps with shared prefixes (dense
and sparse prompts, some crossing dense_len while decoding), a KV cache small enough to preempt, random prefill
budgets, batch sizes and launched-ahead steps, aborts and forced preemptions at random steps. Every request that
is not aborted must equal the plain generate loop's run of it alone (float64: tokens, text, finish reason and
logprobs);
page reference counts are checked after every step and every page comes back at the end."""

import asyncio
import dataclasses
import os
import random
import time

import pytest
import torch
from conftest import random_model
from test_engine import sparse, tok
from test_engine_audit import assert_all_free, assert_pages_consistent, plain

from cpm4.engine.generate import GenerationOutput
from cpm4.engine.paged import PagedKVCache
from cpm4.engine.sampling import SamplingParams
from cpm4.engine.scheduler import LLMEngine

PAGE = 16
MODELS: dict = {}
REFS: dict = {}


def model_for(dense_len: int | None):
    # One model per attention set-up (the test's main cost after the references).
    if dense_len not in MODELS:
        sc = None if dense_len is None else sparse(dense_len)
        MODELS[dense_len] = random_model("tiny", dtype=torch.float64, sparse_config=sc)
    return MODELS[dense_len]


def reference(dense_len: int | None, prompt: list[int], params: SamplingParams) -> GenerationOutput:
    key = (dense_len, tuple(prompt), repr(params))
    if key not in REFS:
        REFS[key] = plain(model_for(dense_len), prompt, params)
    return REFS[key]


def workload(rnd: random.Random, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Prompts built from a few shared stems (so full prefix pages repeat) plus their own tails; greedy or
    seeded sampling, some with logprobs, penalties, stop strings, stop tokens, min_tokens or a grammar (the test
    adds priorities and logits processors to some runs from an RNG of its own)."""
    stems = [[rnd.randint(3, 1000) for _ in range(rnd.randint(PAGE, 5 * PAGE))] for _ in range(3)]
    out = []
    for _ in range(n):
        stem = rnd.choice(stems)
        p = stem[:rnd.randint(0, len(stem))] + [rnd.randint(3, 1000) for _ in range(rnd.randint(1, 60))]
        kw = {"max_tokens": rnd.randint(1, 40), "ignore_eos": rnd.random() < 0.8}
        if rnd.random() < 0.5:
            kw.update(temperature=0.8, seed=rnd.randint(0, 2**31))
        else:
            kw.update(temperature=0)
        if rnd.random() < 0.3:
            kw["logprobs"] = 2
        if rnd.random() < 0.2:
            kw.update(repetition_penalty=1.1, presence_penalty=0.2)
        if rnd.random() < 0.25:  # stop strings hold text back while streaming; common letters end early
            kw["stop"] = [rnd.choice(["e", "th", " a", "in", "\n"])]
            kw["include_stop_str_in_output"] = rnd.random() < 0.5
        if rnd.random() < 0.15:
            kw.update(stop_token_ids=[rnd.randint(3, 1000) for _ in range(20)],
                      min_tokens=rnd.randint(0, min(5, kw["max_tokens"])))
        elif rnd.random() < 0.12:  # a grammar's matcher must survive preemption and recomputation
            kw.update(rnd.choice([{"guided_choice": ["yes", "no", "maybe later"]},
                                  {"guided_regex": "[a-e ]{2,12}"}]))
            kw.pop("stop", None)
        out.append((p, SamplingParams(**kw)))
    return out


def ban_by_history(token_ids, logits):
    """A logits processor (vLLM V0's two-argument form) whose choice follows the ids generated so far: it must see
    the same history through preemption, recomputation and launched-ahead steps as in the run alone."""
    logits[(sum(token_ids) * 7 + len(token_ids)) % 1000 + 3] = float("-inf")
    return logits


def boost_by_prompt(prompt_ids, token_ids, logits):
    """The three-argument form: a token chosen from the prompt's last id and the output's length, pushed up."""
    logits[(prompt_ids[-1] + 13 * len(token_ids)) % 1000 + 3] += 4.0
    return logits


@pytest.mark.parametrize("seed", range(int(os.environ.get("CPM4_FUZZ_SEEDS", 12))))
def test_random_workloads_equal_their_runs_alone(seed):
    """CPM4_FUZZ_SEEDS=200 runs more (≈ 1.5 s a seed on 2 cores)."""
    rnd = random.Random(seed)
    dense_len = [None, 48, 100, 40][seed % 4]  # 48/100: some prompts sparse, some crossing while decoding
    model = model_for(dense_len)
    reqs = workload(rnd, rnd.randint(5, 10))
    longest = max(len(p) + sp.max_tokens for p, sp in reqs)
    # Room for the longest sequence alone (no request may end for want of pages), often not for the batch.
    pages = -(-(longest + 1) // PAGE) + rnd.randint(0, 8)
    caching = rnd.random() < 0.8
    # Priority scheduling in a third of the runs, drawn apart so the seeds' workloads stay what they were.
    side = random.Random(seed + 1_000_003)
    policy = "priority" if side.random() < 0.35 else "fcfs"
    if policy == "priority":
        reqs = [(p, dataclasses.replace(sp, priority=side.randint(-2, 2))) for p, sp in reqs]
    if side.random() < 0.4:  # logits processors on some requests
        procs = ([ban_by_history], [boost_by_prompt], [boost_by_prompt, ban_by_history])
        reqs = [(p, dataclasses.replace(sp, logits_processors=side.choice(procs)) if side.random() < 0.5 else sp)
                for p, sp in reqs]
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=pages, page_size=PAGE, dtype=torch.float64,
                                               prefix_caching=caching),
                    max_batch_size=rnd.randint(2, 8), chunk_tokens=rnd.choice([16, 24, 64, 256]),
                    async_output=rnd.random() < 0.5, scheduling_policy=policy)
    arrival = sorted(rnd.randint(0, 12) for _ in reqs)
    aborted = {f"r{i}" for i in range(len(reqs)) if rnd.random() < 0.15}
    abort_at = {rid: rnd.randint(0, 30) for rid in aborted}
    outs: dict[str, GenerationOutput] = {}
    step, added = 0, 0
    while added < len(reqs) or eng.has_work():
        while added < len(reqs) and arrival[added] <= step:
            p, sp = reqs[added]
            eng.add_request(f"r{added}", p, sp)
            added += 1
        for rid, at in abort_at.items():
            if at == step:
                eng.abort(rid)
        if eng.running and rnd.random() < 0.1 and eng._inflight is None:
            eng._preempt(rnd.choice(eng.running))  # as when pages run out, at a random point
        for rid, d in eng.step():
            outs.setdefault(rid, GenerationOutput([])).add(d)
        assert_pages_consistent(eng)
        step += 1
        assert step < 5000, "the engine does not finish"
    assert_all_free(eng)
    for i, (p, sp) in enumerate(reqs):
        rid, out, ref = f"r{i}", outs.get(f"r{i}"), reference(dense_len, p, sp)
        if rid in aborted and (out is None or out.finish_reason == "abort"):
            # Aborted before its end: what it produced is the start of its run alone.
            got = [] if out is None else out.token_ids
            assert got == ref.token_ids[:len(got)], rid
            continue
        assert (out.token_ids, out.finish_reason) == (ref.token_ids, ref.finish_reason), (rid, len(p), sp)
        assert out.text == ref.text, rid
        # Cached prompt tokens: whole pages, a token left to compute; none without prefix caching.
        n = out.num_cached_tokens
        assert n is not None and n % PAGE == 0 and 0 <= n <= len(p) - 1 and (caching or n == 0), (rid, n, len(p))
        if sp.logprobs is None:
            assert out.logprobs is None
            continue
        assert len(out.logprobs) == len(ref.logprobs)
        for a, b in zip(out.logprobs, ref.logprobs):
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top], rid
            assert a.logprob == pytest.approx(b.logprob, abs=1e-9), rid


def test_steps_launched_ahead_run_in_inference_mode():
    """Found by the random workloads: a decode step launched ahead ran the eager model with autograd recording
    (outside `_run`'s inference mode), and sampling it with a temperature then failed on the sampling plan's
    tensors made in inference mode by the step before. Two seeded sampled requests, steps launched ahead on
    the CPU: each equals its run alone."""
    model = random_model("tiny", dtype=torch.float32, sparse_config=None)
    ps = [[5, 6, 7, 8, 9], [10, 11, 12]]
    params = [SamplingParams(temperature=0.8, seed=s, max_tokens=12, ignore_eos=True) for s in (1, 2)]
    eng = LLMEngine(model, tok(), PagedKVCache(model.config, num_pages=8, page_size=PAGE), async_output=True)
    launched = []
    launch = eng._launch
    eng._launch = lambda reqs, ids: launched.append(len(reqs)) or launch(reqs, ids)
    for i, (p, sp) in enumerate(zip(ps, params)):
        eng.add_request(f"r{i}", p, sp)
    out = eng.run_to_completion()
    assert launched  # the steps did launch ahead
    for i, (p, sp) in enumerate(zip(ps, params)):
        assert out[f"r{i}"][1] == plain(model, p, sp).token_ids


def run_clients(eng, reqs: list[tuple[list[int], SamplingParams]], rnd: random.Random) -> list:
    """Stream `reqs` from asyncio clients arriving at random times, some closing their streams early, one
    cancelled at a random moment (a disconnect while waiting or streaming); each client's GenerationOutput, None
    for one that went away, or its CancelledError."""
    plan = [(rnd.uniform(0, 0.05), rnd.choice([None, None, None, 0, 1, 3])) for _ in reqs]  # delay, deltas kept

    async def client(i: int) -> GenerationOutput | None:
        delay, keep = plan[i]
        await asyncio.sleep(delay)
        out = GenerationOutput([])
        agen = eng.stream(*reqs[i], f"r{i}-{rnd.random()}", coalesce=False)
        try:
            async for d in agen:
                if keep is not None and len(out.token_ids) >= keep:
                    return None  # the client goes away: closing the stream aborts the request
                out.add(d)
        finally:
            await agen.aclose()
        return out

    async def main() -> list:
        tasks = [asyncio.create_task(client(i)) for i in range(len(reqs))]
        victim = rnd.randrange(len(reqs))
        await asyncio.sleep(rnd.uniform(0, 0.05))
        tasks[victim].cancel()
        return await asyncio.gather(*tasks, return_exceptions=True)

    return asyncio.run(main())


def check_clients(outs: list, reqs: list[tuple[list[int], SamplingParams]], dense_len: int | None) -> None:
    for i, (p, sp) in enumerate(reqs):
        if isinstance(outs[i], BaseException) or outs[i] is None:
            assert isinstance(outs[i], asyncio.CancelledError) or outs[i] is None, outs[i]
            continue
        ref = reference(dense_len, p, sp)
        assert (outs[i].token_ids, outs[i].text, outs[i].finish_reason) == (ref.token_ids, ref.text,
                                                                            ref.finish_reason), i


def wait_idle(idle, what: str) -> None:
    for _ in range(500):  # the worker takes the aborts between steps
        if idle():
            return
        time.sleep(0.01)
    raise AssertionError(f"{what} still busy")


@pytest.mark.parametrize("seed", range(int(os.environ.get("CPM4_FUZZ_CLIENT_SEEDS", 4))))
def test_random_clients_of_the_async_engine(seed):
    """The server's engine (worker thread, continuous batching) under random clients (`run_clients`): every
    completed stream equals its run alone (float64), the others end, and then every page is free again."""
    from cpm4.serve.engine import AsyncEngine

    rnd = random.Random(1000 + seed)
    dense_len = [None, 48][seed % 2]
    model = model_for(dense_len)
    reqs = workload(rnd, rnd.randint(6, 12))
    longest = max(len(p) + sp.max_tokens for p, sp in reqs)
    eng = AsyncEngine(model, tok(), max_batch_size=rnd.randint(2, 6), chunk_tokens=rnd.choice([16, 64, 256]),
                      kv_cache_tokens=PAGE * (-(-(longest + 1) // PAGE) + rnd.randint(0, 6)),
                      async_output=rnd.random() < 0.5)
    try:
        outs = run_clients(eng, reqs, rnd)
        # (A step launched ahead may stay behind once its rows all ended: the next step drains it.)
        wait_idle(lambda: not eng._requests and (eng._sched is None or not (eng._sched.waiting or eng._sched.running)),
                  "the engine")
        if eng._sched is not None:
            assert eng._sched.cache.num_free == eng._sched.cache.num_pages
    finally:
        eng.shutdown()
    check_clients(outs, reqs, dense_len)


def test_random_clients_of_the_engine_process(tmp_path):
    """The same clients against the engine in a child process (the server's default on CUDA), several rounds on
    one child: streams, early closes and cancellations cross the pipe; completed streams equal their runs alone
    (float64 in the child and here), nothing is left running between rounds."""
    from cpm4.model.checkpoint import save_checkpoint
    from cpm4.serve.engine_proc import ProcessEngine

    ckpt = tmp_path / "tiny"
    model = model_for(None)
    save_checkpoint(model, model.config, ckpt, tokenizer=tok())  # float64 weights: the child runs this model
    eng = ProcessEngine(ckpt, device="cpu", dtype="float64", tokenizer=tok(), max_batch_size=4, chunk_tokens=32,
                        kv_cache_tokens=PAGE * 24)
    try:
        for seed in range(3):
            rnd = random.Random(3000 + seed)
            reqs = workload(rnd, rnd.randint(5, 9))
            outs = run_clients(eng, reqs, rnd)
            wait_idle(lambda: eng.num_running == 0 and eng.num_waiting == 0, "the engine process")
            check_clients(outs, reqs, None)
        assert eng.is_running
    finally:
        eng.shutdown()


@pytest.mark.parametrize("seed", range(int(os.environ.get("CPM4_FUZZ_SEEDS", 12)) // 3))
def test_random_offline_batches_equal_their_runs_alone(seed):
    """`LLM.generate` (the offline path of `cpm4 generate`) over random per-prompt params, n up to 3, in a cache
    that may preempt: completion j of a seeded prompt is its run alone with `nth_seed(seed, j)`; greedy
    completions all equal the greedy run; prompts come back in order; every page is free at the end."""
    import dataclasses

    from cpm4 import LLM
    from cpm4.engine.sampling import nth_seed

    rnd = random.Random(2000 + seed)
    dense_len = [None, 48, 100][seed % 3]
    model = model_for(dense_len)
    reqs = workload(rnd, rnd.randint(3, 8))
    reqs = [(p, dataclasses.replace(sp, n=rnd.choice([1, 1, 2, 3]))) for p, sp in reqs]
    longest = max(len(p) + sp.max_tokens for p, sp in reqs)
    llm = LLM(model, tokenizer=tok(), max_num_seqs=rnd.randint(2, 8), chunk_tokens=rnd.choice([16, 64, 256]),
              kv_cache_tokens=PAGE * (-(-(longest + 1) // PAGE) + rnd.randint(0, 6)))
    outs = llm.generate([p for p, _ in reqs], [sp for _, sp in reqs])
    assert_all_free(llm.engine.engine)
    assert [o.prompt_token_ids for o in outs] == [p for p, _ in reqs]
    for (p, sp), o in zip(reqs, outs):
        assert len(o.outputs) == sp.n
        for j, c in enumerate(o.outputs):
            ref = reference(dense_len, p, dataclasses.replace(sp, n=1, seed=nth_seed(sp.seed, j)))
            assert (c.token_ids, c.text, c.finish_reason) == (ref.token_ids, ref.text, ref.finish_reason), (j, sp)
