"""`cpm4 run-batch`: a file of requests in the OpenAI Batch API's JSONL format, run offline (vLLM's `run-batch`).

Each input line is `{"custom_id": ..., "method": "POST", "url": "/v1/chat/completions", "body": {...}}`; each output
line is `{"id": ..., "custom_id": ..., "response": {"status_code": ..., "request_id": ..., "body": ...}, "error":
...}`, in the input's order. The bodies go through the server's own app in-process (no socket), so a batch line is
validated and answered exactly as the same request to `cpm4 serve`; many run at once, batched by the engine.

A malformed file (a line that is not a JSON object, a missing or repeated custom_id, a method other than POST) is
refused before the model loads, naming the line; a request the server would refuse (a bad field, an unknown URL, a
prompt too long) becomes that line's error and the others go on. The output is written under a temporary name and
renamed at the end: an interrupted run leaves no partial file.

Memory stays bounded however long the file: it is checked in one pass that keeps only the custom_ids, then read
again line by line as requests are sent, with a bounded window read but not yet written.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import uuid
from collections import deque
from collections.abc import Iterable, Iterator
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


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The file's non-blank lines with their 1-based numbers, read one at a time. Lines end at "\n" only (CRLF's
    "\r" is JSON whitespace): str.splitlines, and text-mode reading, also split inside JSON strings holding
    U+2028, U+2029 or U+0085, which json.dumps(ensure_ascii=False) writes unescaped."""
    try:
        f = open(path, "rb")  # binary: iteration splits at b"\n" alone
    except FileNotFoundError:
        raise FileNotFoundError(f"no batch input file {path}") from None
    with f:
        offset = 0
        for n, raw in enumerate(f, 1):
            if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a BOM (Windows editors write one) is not JSON
                raw, offset = raw[3:], 3
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {offset + e.start}, line {n})") from None
            offset += len(raw)
            if text.strip():
                yield n, text


def _parse(path: Path, n: int, text: str) -> BatchRequest:
    """One line as a request; ValueError naming the file and line where it is malformed."""
    where = f"{path}:{n}"
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise ValueError(f"{where}: not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - {"custom_id", "method", "url", "body"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (a line has custom_id, method, url, body)")
    cid, method, url, body = obj.get("custom_id"), obj.get("method"), obj.get("url"), obj.get("body")
    if not isinstance(cid, str) or not cid:
        raise ValueError(f"{where}: custom_id must be a non-empty string, got {cid!r}")
    if method != "POST":
        raise ValueError(f"{where}: method must be \"POST\", got {method!r}")
    if not isinstance(url, str):
        raise ValueError(f"{where}: url must be a string, got {url!r}")
    if not isinstance(body, dict):
        raise ValueError(f"{where}: body must be a JSON object, got {type(body).__name__}")
    return BatchRequest(n, cid, url, body)


class BatchFile:
    """A checked batch input file: its length, and its requests read afresh, one line at a time, on each iteration
    (so a large file is never held whole as Python objects)."""

    def __init__(self, path: Path, count: int, stamp: tuple[int, int, int]) -> None:
        self.path, self._count, self._stamp = path, count, stamp

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[BatchRequest]:
        # Checked once, before the model loaded; a file rewritten since would be run unchecked (a repeated custom_id).
        if _stamp(self.path) != self._stamp:
            raise ValueError(f"{self.path}: changed since it was checked; run again")
        # It is read as the requests run: one cut or rewritten in place meanwhile would leave lines unanswered (the
        # output short, yet whole) or run them unchecked. Every line passed the check: one that fails now changed.
        count = 0
        try:
            for n, text in _lines(self.path):
                count += 1
                if count > self._count:
                    break
                yield _parse(self.path, n, text)
        except ValueError:
            count = -1
        if count != self._count or _stamp(self.path) != self._stamp:
            raise ValueError(f"{self.path}: changed while it was run; run again")


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    if not stat.S_ISREG(st.st_mode):
        # It is read twice (checked before the model loads, then run): a pipe would be empty the second time, or
        # hang there, and a directory is no file.
        raise ValueError(f"{path}: the batch input must be a regular file (it is read twice), not a pipe, device "
                         "or directory")
    return st.st_size, st.st_mtime_ns, st.st_ino


def read_batch(path: str | os.PathLike) -> BatchFile:
    """The requests of a batch input file, checked in one streaming pass (only the custom_ids are kept, to find a
    repeat); ValueError naming the file and line of the first malformed one. Blank lines are skipped. Iterating the
    result reads the file again."""
    path = Path(path)
    try:
        stamp = _stamp(path)  # before reading: a change made while it is read shows when it is run
    except FileNotFoundError:
        raise FileNotFoundError(f"no batch input file {path}") from None
    seen: dict[str, int] = {}
    for n, text in _lines(path):
        cid = _parse(path, n, text).custom_id
        if cid in seen:
            raise ValueError(f"{path}:{n}: custom_id {cid!r} repeats line {seen[cid]} (each must be unique)")
        seen[cid] = n
    return BatchFile(path, len(seen), stamp)


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


async def run_batch(app: Any, requests: Iterable[BatchRequest], output: str | os.PathLike, *,
                    max_concurrency: int = 64, max_buffered: int | None = None,
                    progress: bool = True) -> dict[str, int]:
    """Answer `requests` through `app` (the server's FastAPI app, in-process) with at most `max_concurrency` in
    flight, writing the output lines in the input's order to `output` (renamed into place at the end). Requests are
    taken from `requests` as they are needed: at most `max_buffered` (default 4 x `max_concurrency`) are held at
    once, read but not yet written, so memory stays bounded however long the input is (and at most that many are in
    flight, where it is the smaller). Returns counts: {"total", "completed", "failed"}."""
    for name, v in (("max_concurrency", max_concurrency), ("max_buffered", max_buffered)):
        if v is not None and (not isinstance(v, int) or v < 1):  # 0 would never let a request start: a hang
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    import httpx
    from tqdm import tqdm

    from cpm4.data.io import atomic_path

    # Answers are written in order, so one slow request holds back those after it: the window beyond the requests in
    # flight lets the engine keep working past it, and bounds what waits.
    window = max_buffered or 4 * max_concurrency
    sem = asyncio.Semaphore(max_concurrency)
    counts = {"total": 0, "completed": 0, "failed": 0}
    total = len(requests) if hasattr(requests, "__len__") else None
    bar = tqdm(total=total, unit="req", desc="Running batch", disable=not progress, mininterval=1)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)  # a 500 is a line's error
    async with httpx.AsyncClient(transport=transport, base_url="http://run-batch", timeout=None) as client:

        async def one(req: BatchRequest) -> dict[str, Any]:
            async with sem:
                out = await _answer(client, req)
            counts["completed" if out["error"] is None else "failed"] += 1
            bar.update()
            return out

        with atomic_path(output) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                pending: deque[asyncio.Task] = deque()  # in input order: in flight, waiting, or answered unwritten

                def write_done() -> None:  # each answer as soon as all before it are written
                    while pending and pending[0].done():
                        f.write(json.dumps(pending.popleft().result(), ensure_ascii=False) + "\n")

                try:
                    for req in requests:
                        counts["total"] += 1
                        while len(pending) >= window:
                            await asyncio.wait([pending[0]])
                            write_done()
                        pending.append(asyncio.create_task(one(req)))
                        write_done()
                    while pending:
                        await asyncio.wait([pending[0]])
                        write_done()
                    f.flush()
                    os.fsync(f.fileno())
                finally:
                    for t in pending:
                        t.cancel()
                    bar.close()
    return counts
