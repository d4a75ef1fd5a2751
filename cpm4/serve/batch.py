"""`cpm4 run-batch`: a file of requests in the OpenAI Batch API's JSONL format, run offline (vLLM's `run-batch`).

Each input line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}`; each output
line is `{"id": ..., "custom_id": ..., "response": {"status_code": ..., "request_id": ..., "body": ...}, "error":
...}`, in the input's order. The bodies go through the server's own app in-process (no socket), so a batch line is
validated and answered exactly as the same request to `cpm4 serve`; many run at once, batched by the engine.

A malformed file (a line that is not a JSON object, a missing or repeated custom_id, a method other than POST) is
refused before the model loads, naming the line; a request the server would refuse (a bad field, an unknown URL, a
prompt too long) becomes that line's error and the others go on. The output is written under a temporary name and
renamed at the end: an interrupted run leaves no partial file.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The endpoints a line may name: the server's generation routes.
URLS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


@dataclass
class BatchRequest:
    line: int  # 1-based, for messages
    custom_id: str
    url: str
    body: dict[str, Any]


def read_batch(path: str | os.PathLike) -> list[BatchRequest]:
    """The requests of a batch input file; ValueError naming the file and line of the first malformed one.
    Blank lines are skipped."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors write one) is not JSON
    except FileNotFoundError:
        raise FileNotFoundError(f"no batch input file {path}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    out: list[BatchRequest] = []
    seen: dict[str, int] = {}
    # Lines end at "\n" only (CRLF's "\r" is JSON whitespace): splitlines also split inside JSON strings holding
    # U+2028, U+2029 or U+0085, which json.dumps(ensure_ascii=False) writes unescaped.
    for n, raw in enumerate(text.split("\n"), 1):
        if not raw.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(raw)
        except ValueError as e:
            raise ValueError(f"{where}: not JSON ({e})") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (a line has custom_id, method, url, "
                             "body)")
        cid, method, url, body = obj.get("custom_id"), obj.get("method"), obj.get("url"), obj.get("body")
        if not isinstance(cid, str) or not cid:
            raise ValueError(f"{where}: custom_id must be a non-empty string, got {cid!r}")
        if cid in seen:
            raise ValueError(f"{where}: custom_id {cid!r} repeats line {seen[cid]} (each must be unique)")
        seen[cid] = n
        if method != "POST":
            raise ValueError(f"{where}: method must be \"POST\", got {method!r}")
        if not isinstance(url, str):
            raise ValueError(f"{where}: url must be a string, got {url!r}")
        if not isinstance(body, dict):
            raise ValueError(f"{where}: body must be a JSON object, got {type(body).__name__}")
        out.append(BatchRequest(n, cid, url, body))
    return out


def _output(custom_id: str, status: int, body: Any, error: Any) -> dict[str, Any]:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": f"cpm4-batch-{uuid.uuid4().hex}", "body": body},
            "error": error}


async def _answer(client: Any, req: BatchRequest) -> dict[str, Any]:
    """One line's output: the app's answer, or the error it gave."""
    if req.url not in URLS:
        return _output(req.custom_id, 400, None, {
            "message": f"line {req.line}: url {req.url!r} is not served; run-batch takes {', '.join(URLS)}",
            "type": "invalid_request_error", "param": "url", "code": None})
    if req.body.get("stream"):  # a batch line gets one answer, never a stream (vLLM refuses it too)
        return _output(req.custom_id, 400, None, {
            "message": f"line {req.line}: a batch request must not ask for a stream (\"stream\": true)",
            "type": "invalid_request_error", "param": "stream", "code": None})
    try:
        r = await client.post(req.url, json=req.body)
    except Exception as e:  # noqa: BLE001 - one line's failure is that line's error, the batch goes on
        return _output(req.custom_id, 500, None, {"message": f"line {req.line}: {type(e).__name__}: {e}",
                                                  "type": "server_error", "param": None, "code": None})
    try:
        data = r.json()
    except ValueError:
        data = {"message": r.text}
    if r.status_code == 200:
        return _output(req.custom_id, 200, data, None)
    err = data.get("error", data) if isinstance(data, dict) else data
    return _output(req.custom_id, r.status_code, None, err)


async def run_batch(app: Any, requests: list[BatchRequest], output: str | os.PathLike, *,
                    max_concurrency: int = 64, progress: bool = True) -> dict[str, int]:
    """Answer `requests` through `app` (the server's FastAPI app, in-process) with at most `max_concurrency` in
    flight, writing the output lines in the input's order to `output` (renamed into place at the end). Returns
    counts: {"total", "completed", "failed"}."""
    import httpx
    from tqdm import tqdm

    from cpm4.data.io import atomic_path

    sem = asyncio.Semaphore(max_concurrency)
    done: dict[int, dict[str, Any]] = {}
    counts = {"total": len(requests), "completed": 0, "failed": 0}
    bar = tqdm(total=len(requests), unit="req", desc="Running batch", disable=not progress, mininterval=1)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 is a line's error
    async with httpx.AsyncClient(transport=transport, base_url="http://run-batch", timeout=None) as client:

        async def one(i: int, req: BatchRequest) -> None:
            async with sem:
                out = await _answer(client, req)
            done[i] = out
            counts["completed" if out["error"] is None else "failed"] += 1
            bar.update()

        with atomic_path(output) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                tasks = [asyncio.create_task(one(i, r)) for i, r in enumerate(requests)]
                try:
                    # Lines are written as soon as all before them are answered: memory holds only those waiting.
                    nxt = 0
                    for t in asyncio.as_completed(tasks):
                        await t
                        while nxt in done:
                            f.write(json.dumps(done.pop(nxt), ensure_ascii=False) + "\n")
                            nxt += 1
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    for t in tasks:
                        t.cancel()
                    bar.close()
    return counts
