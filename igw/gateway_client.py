"""Sending traffic through the test bed's gateway, for `igw demo` and the end-to-end tests.

One way to build the bed's requests (KServe v2 path, OpenAI-style body), to send many of them at once
(aiohttp, bounded concurrency, statuses + headers + latency kept), and to send a burst that falls in one
fixed rate-limit window: the rate-limit service counts per whole second of the shared clock, so a burst
that starts just after a second boundary and ends before the next one is counted against a single
window, and "admitted" then equals the limit exactly. A burst that straddles a boundary is re-sent in the
next window (the caller sees only the clean attempt).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import aiohttp

SAMPLE_INPUT = [0.5, 1.0, -1.0, 2.0]


def infer_body(data: Sequence[float] = SAMPLE_INPUT) -> dict:
    """A KServe v2 infer request for the demo models (4 features)."""
    return {"inputs": [{"name": "input", "shape": [1, len(data)], "datatype": "FP32", "data": list(data)}]}


@dataclass(frozen=True)
class Request:
    method: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


@dataclass(frozen=True)
class Result:
    status: int  # 0: no HTTP answer (connection error or timeout)
    headers: dict[str, str]  # lower-case names
    body: bytes
    sent_at: float  # time.time() when sent
    elapsed_ms: float
    error: str = ""

    def json(self) -> dict:
        return json.loads(self.body)


def auth(key: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"} if key else {}


def v2_infer(gateway: str, model: str, key: str | None, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> Request:
    """POST /v2/models/{model}/infer: the model is in the path."""
    payload = json.dumps(infer_body()).encode() if body is None else body
    return Request("POST", f"{gateway}/v2/models/{model}/infer",
                   {"content-type": "application/json", **auth(key), **(headers or {})}, payload)


def openai_style(gateway: str, model: str, key: str | None, path: str = "/v1/chat/completions",
                 headers: dict[str, str] | None = None) -> Request:
    """An OpenAI-style call: the model (canonical name or alias) is named only in the JSON body."""
    payload = json.dumps({"model": model, **infer_body()}).encode()
    return Request("POST", f"{gateway}{path}", {"content-type": "application/json", **auth(key), **(headers or {})},
                   payload)


async def _send_all(requests: Sequence[Request], concurrency: int, timeout: float,
                    on_done: Callable[[Result], None] | None) -> list[Result]:
    results: list[Result | None] = [None] * len(requests)
    gate = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one(i: int, request: Request) -> None:
            async with gate:
                sent_at, started = time.time(), time.perf_counter()
                try:
                    async with session.request(request.method, request.url, headers=request.headers,
                                               data=request.body or None) as response:
                        body = await response.read()
                        result = Result(response.status, {k.lower(): v for k, v in response.headers.items()}, body,
                                        sent_at, (time.perf_counter() - started) * 1000)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    result = Result(0, {}, b"", sent_at, (time.perf_counter() - started) * 1000,
                                    f"{type(exc).__name__}: {exc}")
                results[i] = result
                if on_done is not None:
                    on_done(result)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(requests)))
    return [r for r in results if r is not None]


def send(requests: Sequence[Request], *, concurrency: int = 32, timeout: float = 10.0,
         on_done: Callable[[Result], None] | None = None) -> list[Result]:
    """Send every request (concurrency 1: one after the other, in order); results in request order."""
    return asyncio.run(_send_all(requests, max(1, concurrency), timeout, on_done))


async def _offer(request: Request, rate: float, seconds: float, timeout: float) -> list[Result]:
    """Open loop: request i is sent at start + i/rate whatever the answers before it (as independent
    clients would), so an overloaded gateway cannot slow the offered rate down."""
    connector = aiohttp.TCPConnector(limit=256)
    results: list[Result] = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as session:

        async def one() -> None:
            sent_at, started = time.time(), time.perf_counter()
            try:
                async with session.request(request.method, request.url, headers=request.headers,
                                           data=request.body or None) as response:
                    body = await response.read()
                    results.append(Result(response.status, {k.lower(): v for k, v in response.headers.items()}, body,
                                          sent_at, (time.perf_counter() - started) * 1000))
            except (aiohttp.ClientError, TimeoutError) as exc:
                results.append(Result(0, {}, b"", sent_at, (time.perf_counter() - started) * 1000, str(exc)))

        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return sorted(results, key=lambda r: r.sent_at)


def offer(request: Request, *, rate: float, seconds: float, timeout: float = 10.0) -> list[Result]:
    """Send `request` at a fixed `rate` per second for `seconds` (open loop); results by send time."""
    return asyncio.run(_offer(request, rate, seconds, timeout))


def offer_many(
    requests: Sequence[Request], *, rate: float, seconds: float, timeout: float = 10.0
) -> list[list[Result]]:
    """`offer` to several targets at once (e.g. two gateways sharing one budget), each at `rate`."""

    async def run() -> list[list[Result]]:
        return list(await asyncio.gather(*(_offer(r, rate, seconds, timeout) for r in requests)))

    return asyncio.run(run())


def admitted_per_second(results: Sequence[Result], since: float) -> list[int]:
    """200s per whole second after `since` (time.time()), for every second the results cover."""
    counts: dict[int, int] = {}
    for result in results:
        second = int(result.sent_at - since)
        counts[second] = counts.get(second, 0) + (result.status == 200)
    return [counts.get(s, 0) for s in range(max(counts) + 1)] if counts else []


class WindowMissed(RuntimeError):
    """No attempt fitted inside one rate-limit window (the machine is too slow or too busy)."""


def send_in_one_window(requests: Sequence[Request], *, concurrency: int = 32, attempts: int = 4,
                       window_s: float = 1.0, on_done: Callable[[Result], None] | None = None) -> list[Result]:
    """Send the burst so that all of it is counted in one fixed window of `window_s` seconds."""
    for _ in range(attempts):
        now = time.time()
        start = (now // window_s + 1) * window_s + 0.01  # just after the next window starts
        time.sleep(max(0.0, start - now))
        first = time.time()
        results = send(requests, concurrency=concurrency, timeout=window_s)
        last = time.time()
        if first // window_s == last // window_s:
            if on_done is not None:
                for result in results:
                    on_done(result)
            return results
    raise WindowMissed(f"{len(requests)} requests never fitted in one {window_s:g}s window in {attempts} attempts")


def current_limit(result: Result) -> int | None:
    """The limit Envoy reports in x-ratelimit-limit (draft 03: '<limit>, <limit>;w=<window>, ...')."""
    value = result.headers.get("x-ratelimit-limit")
    if not value:
        return None
    try:
        return int(value.split(",", 1)[0].strip())
    except ValueError:
        return None


def policy_limits(result: Result) -> list[int]:
    """Every quota policy in x-ratelimit-limit ('20, 100;w=1, 20;w=1' -> [100, 20])."""
    value = result.headers.get("x-ratelimit-limit", "")
    return [int(part.split(";", 1)[0]) for part in value.split(",")[1:] if ";" in part]


def wait_for_limit(request: Request, expected: int, *, since: float, timeout: float = 5.0,
                   interval: float = 0.01) -> float:
    """Poll with single requests until one reports `expected` among its quota policies; returns seconds
    from `since` (a time.time()) to the send time of that request."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        result = send([request], concurrency=1)[0]
        if expected in policy_limits(result):
            return result.sent_at - since
        time.sleep(interval)
    raise TimeoutError(f"no answer reported a limit of {expected} within {timeout}s")


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]
