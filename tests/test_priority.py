"""Priority scheduling (vLLM's --scheduling-policy priority): waiting requests by (priority, arrival), the
largest (priority, arrival) preempted first, outputs unchanged; `priority` refused under first-come-first-served."""

import functools

import pytest
import torch
from conftest import random_model
from test_engine import tok

from cpm4 import LLM, SamplingParams
from cpm4.engine.generate import generate_ids
from cpm4.engine.paged import PagedKVCache
from cpm4.engine.scheduler import LLMEngine


@functools.cache
def model():
    return random_model("tiny", dtype=torch.float32)


def _prompt(seed: int, n: int = 12) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 1000, (n,), generator=g).tolist()


def _alone(p, params) -> list[int]:
    return generate_ids(model(), tok(), [p], [params])[0].token_ids


def _first_token_order(eng: LLMEngine) -> tuple[list[str], dict[str, list[int]]]:
    """Run to the end; the request ids in the order their first tokens came, and every request's tokens."""
    order, toks = [], {}
    while eng.has_work():
        for rid, d in eng.step():
            if d.token_ids and rid not in toks:
                order.append(rid)
            toks.setdefault(rid, []).extend(d.token_ids)
    return order, toks


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_requests_start_by_priority_then_arrival(policy):
    """One batch slot: under priority the requests start lowest value first, equal values in arrival order (a
    negative priority is allowed, as vLLM's); under fcfs in arrival order. Outputs are each request's alone."""
    eng = LLMEngine(model(), tok(), PagedKVCache(model().config, num_pages=64, page_size=16), max_batch_size=1,
                    scheduling_policy=policy)
    prio = {"a": 5, "b": 0, "c": 5, "d": -1, "e": 0}
    params = {}
    for i, (rid, p) in enumerate(prio.items()):
        params[rid] = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                     priority=p if policy == "priority" else 0)
        eng.add_request(rid, _prompt(i), params[rid])
    order, toks = _first_token_order(eng)
    assert order == (["d", "b", "e", "a", "c"] if policy == "priority" else list(prio))
    for i, rid in enumerate(prio):
        assert toks[rid] == _alone(_prompt(i), params[rid])


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_preemption_takes_the_lowest_priority(policy, monkeypatch):
    """Two running requests outgrow a small cache: fcfs preempts the latest admitted (y), priority the largest
    (priority, arrival) (x, admitted first with priority 1 against y's 0). Neither loses output."""
    eng = LLMEngine(model(), tok(), PagedKVCache(model().config, num_pages=6, page_size=16), max_batch_size=2,
                    scheduling_policy=policy)
    victims = []
    preempt = eng._preempt
    monkeypatch.setattr(eng, "_preempt", lambda req: (victims.append(req.request_id), preempt(req))[1])
    px, py = _prompt(1, 30), _prompt(2, 30)
    sx = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, priority=1 if policy == "priority" else 0)
    sy = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    eng.add_request("x", px, sx)
    toks = {"x": []}
    for rid, d in eng.step():  # x is admitted and running before y arrives
        toks[rid] += d.token_ids
    eng.add_request("y", py, sy)
    while eng.has_work():
        for rid, d in eng.step():
            toks.setdefault(rid, []).extend(d.token_ids)
    assert victims and victims[0] == ("x" if policy == "priority" else "y")
    assert toks["x"] == _alone(px, sx) and toks["y"] == _alone(py, sy)


def test_priority_needs_the_priority_policy():
    """As vLLM: a priority other than 0 under fcfs is an error naming both, before the request is queued; a bad
    policy or priority value is refused."""
    eng = LLMEngine(model(), tok(), PagedKVCache(model().config, num_pages=8, page_size=16))
    with pytest.raises(ValueError, match="priority 2 needs priority scheduling"):
        eng.add_request("r", _prompt(0), SamplingParams(max_tokens=2, priority=2))
    assert not eng.has_work() and "r" not in eng.by_id
    with pytest.raises(ValueError, match="scheduling_policy must be one of fcfs, priority"):
        LLMEngine(model(), tok(), PagedKVCache(model().config, num_pages=8, page_size=16), scheduling_policy="lifo")
    for bad in (1.5, "1", True, 2**63):
        with pytest.raises(ValueError, match="priority must be an int"):
            SamplingParams(priority=bad)


def test_llm_generate_priority(tiny_checkpoint):
    """`LLM(scheduling_policy="priority").generate(prompts, sp, priority=[...])` (vLLM's form): outputs in prompt
    order and equal to fcfs's; a list of the wrong length, or priorities under fcfs, refused before any work."""
    ps = ["one", "two three", "four five six", "seven"]
    sp = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    fcfs = LLM(tiny_checkpoint, device="cpu", max_num_seqs=1)
    want = [o.token_ids for o in fcfs.generate(ps, sp)]
    llm = LLM(tiny_checkpoint, device="cpu", max_num_seqs=1, scheduling_policy="priority")
    assert [o.token_ids for o in llm.generate(ps, sp, priority=[3, 1, 2, 0])] == want
    with pytest.raises(ValueError, match="one int per prompt \\(4\\)"):
        llm.generate(ps, sp, priority=[1])
    with pytest.raises(ValueError, match="needs priority scheduling"):
        fcfs.generate(ps, sp, priority=[0, 0, 1, 0])
    with pytest.raises(ValueError, match="scheduling_policy must be one of"):
        LLM(tiny_checkpoint, device="cpu", scheduling_policy="sjf")


def test_server_priority_field(tiny_checkpoint):
    """The request field `priority` (completions, chat, Responses): a 400 naming it under fcfs, taken under
    --scheduling-policy priority; the CLI option reaches the engine; a bad policy fails before the model loads."""
    from fastapi.testclient import TestClient

    from cpm4.serve import load_app
    from cpm4.serve.cli import add_serve_command, engine_options

    body = {"prompt": "Hi", "max_tokens": 2, "priority": 3}
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "priority": -2}
    resp = {"input": "Hi", "max_output_tokens": 2, "priority": 1}
    for policy in ("fcfs", "priority"):
        app, engine = load_app(tiny_checkpoint, device="cpu", log_stats_interval=0, engine_process=False,
                               scheduling_policy=policy)
        try:
            with TestClient(app) as c:
                for url, b in (("/v1/completions", body), ("/v1/chat/completions", chat), ("/v1/responses", resp)):
                    r = c.post(url, json=b)
                    if policy == "fcfs":
                        assert r.status_code == 400, (url, r.text)
                        err = r.json()["error"]
                        assert err["param"] == "priority" and "needs priority scheduling" in err["message"]
                    else:
                        assert r.status_code == 200, (url, r.text)
                assert c.post("/v1/completions", json={**body, "priority": 0}).status_code == 200
        finally:
            engine.shutdown()
    import argparse

    p = add_serve_command(argparse.ArgumentParser().add_subparsers())
    assert engine_options(p.parse_args(["--scheduling-policy", "priority"]))["scheduling_policy"] == "priority"
    assert engine_options(p.parse_args([]))["scheduling_policy"] == "fcfs"
    with pytest.raises(ValueError, match="scheduling_policy must be one of"):
        load_app(tiny_checkpoint / "missing", scheduling_policy="nope")


def test_process_engine_checks_priority_in_the_parent(tiny_checkpoint):
    """The engine in a child process: the policy is checked before the spawn and requests' priorities in the
    parent (a 400 before anything crosses the pipe)."""
    from cpm4.serve.engine_proc import ProcessEngine

    with pytest.raises(ValueError, match="scheduling_policy must be one of"):
        ProcessEngine(tiny_checkpoint, device="cpu", scheduling_policy="bogus")
    eng = ProcessEngine(tiny_checkpoint, device="cpu", max_batch_size=1, kv_cache_tokens=1024)
    try:
        with pytest.raises(ValueError, match="needs priority scheduling"):
            eng.check_params(SamplingParams(priority=1))
        eng.check_params(SamplingParams(priority=0))
    finally:
        eng.shutdown()


@pytest.mark.parametrize("kind", ["continuous", "plain", "process"])
def test_async_engine_serves_by_priority(kind, tmp_path):
    """The async engine (continuous batching, the plain loop that takes whole batches, and in a child process):
    with one batch slot and three requests queued together, they run in (priority, arrival) order, each with
    its tokens alone."""
    import asyncio

    from cpm4.model.checkpoint import save_checkpoint
    from cpm4.serve.engine import AsyncEngine
    from cpm4.serve.engine_proc import ProcessEngine

    if kind == "process":  # the same model, from a folder the child loads
        save_checkpoint(model(), model().config, tmp_path / "m", tokenizer=tok())
        eng = ProcessEngine(tmp_path / "m", device="cpu", dtype="float32", max_batch_size=1, kv_cache_tokens=1024,
                            scheduling_policy="priority")
    else:
        eng = AsyncEngine(model(), tok(), max_batch_size=1, continuous=kind == "continuous", kv_cache_tokens=1024,
                          scheduling_policy="priority")
    try:
        prio = {"a": 0, "b": 2, "c": 1}
        params = {rid: SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, priority=p)
                  for rid, p in prio.items()}
        started: list[str] = []

        async def one(i: int, rid: str) -> list[int]:
            toks = []
            async for d in eng.stream(_prompt(i), params[rid], rid):
                if d.token_ids and not toks:
                    started.append(rid)
                toks += d.token_ids
            return toks

        async def all_three():
            return await asyncio.gather(*(one(i, rid) for i, rid in enumerate(prio)))

        outs = asyncio.run(all_three())
        assert started == ["a", "c", "b"]  # a may start before the others arrive: it is first either way
        for i, (rid, toks) in enumerate(zip(prio, outs)):
            assert toks == _alone(_prompt(i), params[rid])
        with pytest.raises(ValueError, match="scheduling_policy must be one of"):
            AsyncEngine(model(), tok(), scheduling_policy="lifo")
    finally:
        eng.shutdown()
