"""Attacks on the accuracy of limits and budgets while requests race and the admin API changes
a key mid-flight: a budget removed between a request's admission and its charge, and counts
of concurrency, requests per minute, tokens per minute and budgets against what the docs
promise. In memory and shared through a real Redis."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from aiohttp.test_utils import TestClient

from gateway.state import GATE_KEY, USAGE_KEY
from tests.conftest import app_of, sse_events, usage_rows
from tests.fakes import FakeOpenAI
from tests.test_accounting import admin_spend, make_settings, new_key, patch, spend_of, up
from tests.test_limits import CHAT, RESERVED, all_decided, auth, body

__all__ = ["make_settings", "up"]  # (the fixtures, shared with test_accounting)


def entering(
    gw: TestClient[Any, Any], monkeypatch: pytest.MonkeyPatch, count: int = 1
) -> asyncio.Event:
    """An event set once `count` requests have passed the gate's first step (`enter`, or a
    shared gate's `admit`): from there on each is reading its body."""
    gate = app_of(gw)[GATE_KEY]
    event = asyncio.Event()
    seen = [0]

    def one_more() -> None:
        seen[0] += 1
        if seen[0] >= count:
            event.set()

    name = "enter" if gate.admits_at_once else "admit"
    inner = getattr(gate, name)
    if gate.admits_at_once:

        def counting(key: Any) -> Any:
            ticket = inner(key)
            one_more()
            return ticket

        monkeypatch.setattr(gate, name, counting)
    else:

        async def counting_async(key: Any) -> Any:
            ticket = await inner(key)
            one_more()
            return ticket

        monkeypatch.setattr(gate, name, counting_async)
    return event


# The admin changes made while the request's body arrives, and the budget it ends with.
CHANGES: dict[str, tuple[list[dict[str, Any]], dict[str, Any] | None]] = {
    "removed_and_given_again": ([{"budget_tokens": None}], {"budget_tokens": 1_000}),
    "period_made_longer": ([{"budget_period": "month"}], None),
}


@pytest.mark.parametrize("change", list(CHANGES))
async def test_a_budget_changed_while_a_body_is_read_keeps_the_spending(
    up: tuple[FakeOpenAI, TestClient[Any, Any]], monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """A request passes the gate with its key's budget, and the admin API removes the budget
    (or makes its period a month instead of a day) while the request's body is still
    arriving. The request is then charged against the budget record it entered with. The
    key's spending must stay what the usage table says plus the request, not start again at
    zero: else the key spends its budget a second time."""
    _, gw = up
    during, after = CHANGES[change]
    secret, key_id = await new_key(gw, budget_tokens=1_000, budget_period="day")
    await one(gw, secret)
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    spent = (await admin_spend(gw, key_id))["tokens"]
    assert spent > 0
    reading = entering(gw, monkeypatch)
    go = asyncio.Event()
    payload = msgspec.json.encode(body())

    async def slow_body() -> AsyncIterator[bytes]:
        yield payload[:1]  # (the client sends the headers with the first chunk)
        await go.wait()
        yield payload[1:]

    headers = auth(secret) | {"Content-Type": "application/json"}
    late = asyncio.create_task(gw.post(CHAT, data=slow_body(), headers=headers))
    await reading.wait()
    for fields in during:
        await patch(gw, key_id, **fields)
    go.set()
    async with await late as r:
        assert r.status == 200, await r.text()
        late_used = (await r.json())["usage"]["total_tokens"]
    await app_of(gw)[USAGE_KEY].wait_recorded(2)
    if after is not None:
        await patch(gw, key_id, **after)
    assert (await admin_spend(gw, key_id))["tokens"] == spent + late_used
    assert (await spend_of(gw, secret)).held_tokens == 0


async def one(gw: TestClient[Any, Any], secret: str) -> int:
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as r:
        assert r.status == 200, await r.text()
        total: int = (await r.json())["usage"]["total_tokens"]
    return total


def slow_posts(
    gw: TestClient[Any, Any], secret: str, count: int, go: asyncio.Event
) -> list[asyncio.Task[tuple[int, dict[str, Any]]]]:
    """`count` requests whose bodies arrive once `go` is set (their headers at once)."""
    payload = msgspec.json.encode(body())

    async def slow_body() -> AsyncIterator[bytes]:
        yield payload[:1]  # (the client sends the headers with the first chunk)
        await go.wait()
        yield payload[1:]

    async def post() -> tuple[int, dict[str, Any]]:
        headers = auth(secret) | {"Content-Type": "application/json"}
        async with gw.post(CHAT, data=slow_body(), headers=headers) as r:
            answer: dict[str, Any] = await r.json()
            return r.status, answer

    return [asyncio.create_task(post()) for _ in range(count)]


async def test_a_budget_lowered_while_bodies_arrive_applies_to_them(
    up: tuple[FakeOpenAI, TestClient[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Twenty requests pass the gate under a large budget, and the admin API lowers it to
    what is spent plus room for one request while their bodies arrive. The docs promise a
    change through the admin API applies at once and a budget overspent by at most one
    request: so at most one of them may be admitted, not all twenty on the old budget."""
    _, gw = up
    secret, key_id = await new_key(gw, budget_tokens=100_000)
    await one(gw, secret)
    await app_of(gw)[USAGE_KEY].wait_recorded(1)
    spent = (await admin_spend(gw, key_id))["tokens"]
    go = asyncio.Event()
    reading = entering(gw, monkeypatch, 20)
    tasks = slow_posts(gw, secret, 20, go)
    await reading.wait()
    await patch(gw, key_id, budget_tokens=spent + RESERVED)
    go.set()
    answers = await asyncio.gather(*tasks)
    statuses = sorted(status for status, _ in answers)
    assert statuses == [200] + [429] * 19, statuses
    refused = [a for status, a in answers if status == 429]
    assert all(a["error"]["code"] == "insufficient_quota" for a in refused)
    used = sum(a["usage"]["total_tokens"] for status, a in answers if status == 200)
    await app_of(gw)[USAGE_KEY].wait_recorded(2)
    assert (await admin_spend(gw, key_id))["tokens"] == spent + used
    assert (await spend_of(gw, secret)).held_tokens == 0


async def test_a_refusal_for_tokens_says_none_are_left_while_a_request_holds_more(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """A request whose most (a token a byte of its UTF-8) is far beyond its likely size (four
    characters a token) is admitted and holds more than the key's tokens per minute: the
    bucket is in debt. A request refused meanwhile for tokens must say so in its headers:
    no tokens remaining, not the whole limit."""
    fake, gw = up
    secret, _ = await new_key(gw, tpm=300)
    release = asyncio.Event()
    fake.script(hold=release)
    big = body(messages=[{"role": "user", "content": "日本語" * 100}])
    first = asyncio.create_task(gw.post(CHAT, json=big, headers=auth(secret)))
    await fake.request_seen.wait()
    async with gw.post(CHAT, json=body(), headers=auth(secret)) as r:
        assert r.status == 429
        assert (await r.json())["error"]["code"] == "rate_limit_exceeded"
        assert r.headers["x-ratelimit-limit-tokens"] == "300"
        assert r.headers["x-ratelimit-remaining-tokens"] == "0"
        assert r.headers["x-ratelimit-reset-tokens"] != "0ms"
        assert float(r.headers["retry-after-ms"]) > 0
    release.set()
    async with await first as r:
        assert r.status == 200


def assert_true_headers(headers: Any, rpm: int | None, tpm: int | None) -> None:
    """The `x-ratelimit-*` headers name the key's limits and a remaining within them."""
    for name, limit in (("requests", rpm), ("tokens", tpm)):
        if limit is None:
            assert f"x-ratelimit-limit-{name}" not in headers
            continue
        assert headers[f"x-ratelimit-limit-{name}"] == str(limit)
        assert 0 <= int(headers[f"x-ratelimit-remaining-{name}"]) <= limit


async def test_twenty_at_once_against_three_slots_admit_exactly_three(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """Twenty requests of one key arrive at once, its concurrency is three: exactly three
    reach the upstream, seventeen are refused with an OpenAI 429, `retry-after` and true
    `x-ratelimit-*` headers; once the three end, three more get in."""
    fake, gw = up
    secret, _ = await new_key(gw, max_concurrency=3, rpm=1_000, tpm=100_000)
    release = asyncio.Event()
    fake.script(hold=release, times=3)

    async def post() -> tuple[int, Any, dict[str, Any]]:
        async with gw.post(CHAT, json=body(), headers=auth(secret)) as r:
            return r.status, r.headers, await r.json()

    tasks = [asyncio.create_task(post()) for _ in range(20)]
    await all_decided(tasks, fake)
    assert len(fake.chat_requests) == 3
    refused = [t.result() for t in tasks if t.done()]
    assert len(refused) == 17
    for status, headers, answer in refused:
        assert status == 429
        assert answer["error"]["code"] == "rate_limit_exceeded", answer
        assert int(headers["retry-after"]) >= 1 and float(headers["retry-after-ms"]) > 0
        assert_true_headers(headers, 1_000, 100_000)
    release.set()
    for status, headers, _ in await asyncio.gather(*tasks):
        assert status in (200, 429)
        assert_true_headers(headers, 1_000, 100_000)
    again = [asyncio.create_task(post()) for _ in range(3)]
    assert [status for status, _, _ in await asyncio.gather(*again)] == [200] * 3


async def test_a_burst_past_the_requests_per_minute_admits_exactly_the_limit(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """Twelve requests at once against 5 requests per minute: exactly five are answered,
    seven refused with a wait of about a fifth of a minute and no requests remaining."""
    _, gw = up
    secret, _ = await new_key(gw, rpm=5)

    async def post() -> tuple[int, Any]:
        async with gw.post(CHAT, json=body(), headers=auth(secret)) as r:
            await r.read()
            return r.status, r.headers

    answers = await asyncio.gather(*(post() for _ in range(12)))
    assert sorted(status for status, _ in answers) == [200] * 5 + [429] * 7
    for status, headers in answers:
        assert_true_headers(headers, 5, None)
        if status == 429:
            assert headers["x-ratelimit-remaining-requests"] == "0"
            assert 0 < float(headers["retry-after-ms"]) <= 12_000
            assert headers["retry-after"] in ("12", "11", "10")


async def test_a_thousand_requests_leave_the_counters_equal_to_their_sum(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """A thousand requests, fifty at a time, JSON and streams: the key's budget spending is
    the sum of their usage, nothing stays held, and (in memory, its clock held still) the
    tokens per minute remaining are the limit less that sum: no drift."""
    _, gw = up
    gate = app_of(gw)[GATE_KEY]
    if gate.admits_at_once:  # (Redis keeps its own time: its buckets refill meanwhile)
        gate.limiter._clock = lambda: 1_000.0
    limit = 10_000_000
    secret, key_id = await new_key(gw, tpm=limit, budget_tokens=limit)
    stream = body(stream=True, stream_options={"include_usage": True})

    async def post(i: int) -> tuple[int, Any]:
        async with gw.post(CHAT, json=stream if i % 2 else body(), headers=auth(secret)) as r:
            assert r.status == 200, await r.text()
            if i % 2:
                used: int = sse_events(await r.read())[-1]["usage"]["total_tokens"]
            else:
                used = (await r.json())["usage"]["total_tokens"]
            return used, r.headers

    total = 0
    last: Any = None
    for start in range(0, 1_000, 50):
        for used, headers in await asyncio.gather(*(post(start + i) for i in range(50))):
            total += used
            last = headers
    await app_of(gw)[USAGE_KEY].wait_recorded(1_000)
    assert (await admin_spend(gw, key_id))["tokens"] == total
    assert (await spend_of(gw, secret)).held_tokens == 0
    if gate.admits_at_once:
        async with gw.post(CHAT, json=body(), headers=auth(secret)) as r:
            total += (await r.json())["usage"]["total_tokens"]
            assert r.headers["x-ratelimit-remaining-tokens"] == str(limit - total)
    assert_true_headers(last, None, limit)


async def test_fifty_racing_a_budget_with_failures_and_hang_ups_overspend_one_at_most(
    up: tuple[FakeOpenAI, TestClient[Any, Any]],
) -> None:
    """Fifty requests race a small token budget: JSON, streams, requests the upstream fails
    (their holds come back) and streams whose client hangs up after the first chunk (what was
    generated is counted). The spending ends equal to the usage rows' tokens, nothing held,
    and past the budget by at most one request's use."""
    fake, gw = up
    budget = 10 * RESERVED
    secret, key_id = await new_key(gw, budget_tokens=budget)
    fake.script(match="fail", status=500, times=50)
    kinds = ["json", "stream", "fail", "hang_up", "cut"]
    fake.script(match="cut", drop_after=1, times=50)

    async def post(kind: str) -> tuple[int, int]:
        stream = kind in ("stream", "hang_up", "cut")
        extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
        one_body = body(messages=[{"role": "user", "content": f"{kind} please"}], **extra)
        async with gw.post(CHAT, json=one_body, headers=auth(secret)) as r:
            if r.status != 200 or not stream:
                answer = await r.json()
                return r.status, answer.get("usage", {}).get("total_tokens", 0)
            if kind == "hang_up":
                await r.content.readline()
                r.close()
                return r.status, -1  # (what was generated: the usage row says)
            if kind == "cut":
                await r.read()  # (ends with an error event: the usage row says)
                return r.status, -1
            events = sse_events(await r.read())
            return r.status, events[-1].get("usage", {}).get("total_tokens", 0) or 0

    answers = await asyncio.gather(*(post(kinds[i % 5]) for i in range(50)))
    statuses = [status for status, _ in answers]
    assert set(statuses) <= {200, 429, 502, 503}, answers  # (5xx: the upstream failed)
    upstream = sum(status != 429 for status in statuses)
    await app_of(gw)[USAGE_KEY].wait_recorded(upstream)
    rows = [row for row in await usage_rows(gw) if row["key_id"] == key_id]
    counted = sum(row["total_tokens"] or 0 for row in rows)
    spend = await spend_of(gw, secret)
    assert (spend.tokens, spend.held_tokens) == (counted, 0)
    most_one = max((row["total_tokens"] or 0) for row in rows)
    assert counted <= budget + most_one
