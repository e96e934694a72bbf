"""Attack on 6bd8942 (helper-123): the `usage.iterations` entries Anthropic bills beside an
answer's top-level counts (`compaction`, `advisor_message`: `wire.BILLED_STEPS`) charged as
`Call.steps` = (uncached input, cache reads, cache writes, output), added in
`pipeline._account` and bounded by `usage_bounds.steps_charged` (each input part within 8 x
the prompt bound, on the pass-through the translated request's prompt size; output 65,536).

Attacked from outside: as an `anthropic` / `openai` SDK user (what each sees of usage), as an
honest Anthropic upstream (compaction over documents the gateway cannot size, an hour's cache
writes in a compaction step, failover after a first attempt reported steps, a stream cut
after its closing count, count_tokens), as a hostile upstream (huge steps on every path) and
as a hostile client with a USD budget (many compacting requests in flight at once). Failing
tests are problems (the comment above each says what happens, what it costs, how realistic it
is and what would be right); tests marked `# SOUND:` pin properties checked here that hold.

Bundled price list: claude-opus-5-5 $4 / $20 a million tokens (cache writes $5, 1h $8, reads
$0.20).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from gateway.state import USAGE_KEY
from tests.conftest import NEVER_HANG, app_of, create_key, openai_client, usage_rows
from tests.raw_upstream import STREAM_HEAD, RawUpstream, auth, sse
from tests.test_attack_h105 import Build, Gathering, build, mtok, row_and_spend, whole
from tests.test_attack_h117 import Scripted
from tests.test_attack_h119 import (
    IN,
    MSG,
    OPUS,
    OUT,
    STANDARD,
    Duo,
    cost,
    duo,
    message,
    opus_usage,
    post_raw,
    sdk,
)
from tests.test_attack_h122 import (
    COMPACT_BETA,
    COMPACTED,
    EDITS,
    LONG,
    answer_with,
    compaction_stream,
    step,
    tokens_charged,
)

__all__ = ["build", "duo"]  # (the fixtures)

WRITE, WRITE_1H, READ = 5.0, 8.0, 0.2  # Opus's cache rates, $ a million tokens


# --- the bound on the pass-through: the translated request is not the prompt --------------

# A 120-page PDF Anthropic fetches itself, or one uploaded with the Files API: both are read
# by Anthropic as input (~1,500-3,000 tokens a page), and both are dropped by `to_chat` (a
# `url` document and a `file` source are only the translation's refusal), so the translated
# request the pass-through's step bound is taken from holds a few words.
URL_PDF = {"type": "document", "source": {"type": "url", "url": "https://example.com/10k.pdf"}}
FILE_PDF = {
    "type": "document",
    "source": {"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"},
}


# WRONG (medium, every key, USD budgets and recorded cost; under-charge): on the Messages
# pass-through `steps_charged` bounds a step's input by 8 x the TRANSLATED request's prompt
# size (`prompt_size(call.request) + PROMPT_SLACK`), but `to_chat` drops whatever only
# Anthropic can take (a document by `url`, a `file` source, server-tool results, search
# results, container uploads): they become the translation's refusal and nothing of the
# prompt. A compacting conversation over such a document (a 10-K by URL, ~150,000 tokens, one
# question) is summarized by a compaction step that reads all of it, and Anthropic bills
# 150,000 input tokens for it; the gateway charges at most 8 x (a few hundred bytes + 4,096):
# 33,040 here, so ~117,000 tokens ($0.47 on Opus) a compaction go unpaid, and after compaction the
# top level reads only the summary, so nothing else covers it. Realistic: document Q&A agents
# with `context_management` compaction on, the case compaction is for. A hostile client gets
# the same discount at will (pin a big public PDF by URL). Right: where the translation left
# part of the prompt out (`Translation.refusal` is set), the pass-through has no prompt bound
# it can trust: leave steps unbounded as `_unseen` requests are (the top level already is), or
# bound them by the client's body bytes plus the largest document such a block can be.
@pytest.mark.parametrize("doc", [URL_PDF, FILE_PDF], ids=["url", "file"])
async def test_step_bound_counts_what_the_translation_dropped(build: Build, doc: Any) -> None:
    iterations = [step("compaction", 150_000, 2_000), step("message", IN, OUT)]
    up = RawUpstream(answer_with(iterations), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=50.0)
    content = [doc, {"type": "text", "text": "What were the risk factors?"}]
    body = MSG | {"messages": [{"role": "user", "content": content}]}
    body |= {"context_management": EDITS}
    beta = {"anthropic-beta": "compact-2026-01-12,files-api-2025-04-14"}
    status, out = await post_raw(gw, secret, "/v1/messages", msgspec.json.encode(body), beta)
    assert status == 200, out
    given, made, _ = await tokens_charged(gw, secret)
    assert made == OUT + 2_000
    assert given == IN + 150_000, given


# SOUND: a hostile upstream's steps on the pass-through: their output is bounded (65,536),
# and their input is not, as the top-level counts of a pass-through are not (documented: a
# bound by the translated request undercharged documents sent by URL, this file's test of
# them). Each input kind stops at the largest count the gateway reads (2**40).
async def test_pass_through_text_request_bounds_hostile_steps(build: Build) -> None:
    huge = step(
        "compaction",
        2**40,
        2**40,
        cache_read_input_tokens=2**40,
        cache_creation_input_tokens=2**40,
    )
    up = RawUpstream(answer_with([huge] * 300), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=50.0)
    status, out = await post_raw(gw, secret, "/v1/messages", msgspec.json.encode(MSG), None)
    assert status == 200, out
    row, _ = await row_and_spend(gw, secret)
    assert row["completion_tokens"] == OUT + 65_536, row
    assert IN < row["prompt_tokens"] <= IN + 3 * 2**40, row
    assert row["cache_read_tokens"] <= 2**40 and row["cache_write_tokens"] <= 2**40, row


# SOUND: on the translated chat path (a chat client, an Anthropic route) the bound is the
# client's own body: the same hostile steps charge at most 8 x (body + images + 4,096) per
# input kind and 65,536 output.
async def test_translated_chat_bounds_hostile_steps(build: Build) -> None:
    huge = step("compaction", 2**40, 2**40, cache_read_input_tokens=2**40)
    up = RawUpstream(answer_with([huge] * 300), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=50.0)
    resp = await gw.post("/v1/chat/completions", json=CHAT, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    row, _ = await row_and_spend(gw, secret)
    assert row["prompt_tokens"] <= IN + 2 * 8 * (4_096 + 200), row
    assert row["completion_tokens"] == OUT + 65_536, row


CHAT = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}


# SOUND (as documented; a hostile upstream only): a chat request the gateway cannot size
# (`_unseen`) has no prompt bound, and it reaches an Anthropic route: `web_search_options`
# is dropped by `to_anthropic` (nothing searches), not refused. There `steps_charged` leaves
# each input kind of the steps at what the upstream says (up to 2**40 each: $4.4 million of
# Opus input), exactly as the answer's top-level `input_tokens` already is on that request
# (`prompt_bound` None: a top-level 2**40 is charged as is), so the steps open nothing a
# hostile upstream did not have; docs/configuration.md says unseen prompts have no bound.
# (Worth a note: on Anthropic, where `web_search_options` is dropped unread, the request could
# be sized as seen; a file by id is refused there with a 400.)
@pytest.mark.parametrize("where", ["steps", "top"])
async def test_unseen_chat_request_steps_no_worse_than_the_top_level(
    build: Build, where: str
) -> None:
    if where == "steps":
        reply = answer_with([step("compaction", 2**40, 0)])
    else:
        reply = whole(message(opus_usage(None) | {"input_tokens": 2**40}))
    up = RawUpstream(reply, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=50.0)
    body = CHAT | {"web_search_options": {}}
    resp = await gw.post("/v1/chat/completions", json=body, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    assert "web_search_options" not in up.bodies[0] and "tools" not in up.bodies[0]
    row, _ = await row_and_spend(gw, secret)
    assert row["prompt_tokens"] >= 2**40, row  # (either way: unbounded, both paths alike)
    file = [{"type": "file", "file": {"file_id": "file-1"}}]
    by_id = CHAT | {"messages": [{"role": "user", "content": file}]}
    resp = await gw.post("/v1/chat/completions", json=by_id, headers=auth(await create_key(gw)))
    assert resp.status == 400, await resp.text()


# --- what the steps are charged at ----------------------------------------------------------


# WRONG (low, USD budgets and recorded cost; under-charge): a step's cache writes are charged
# at the 5-minute write rate whatever their TTL. The SDK's `BetaCompactionIterationUsage` and
# `BetaAdvisorMessageIterationUsage` carry their own `cache_creation` breakdown
# (`ephemeral_1h_input_tokens`), but `beyond_messages` reads only the step's
# `cache_creation_input_tokens`, and `_account` adds it to `cache_write_tokens` while
# `cache_write_1h_tokens` stays the top level's. 100,000 tokens a compaction step writes for an
# hour cost $0.80 on Opus and are charged $0.50 ($0.30 short, 37.5%). Realistic where clients
# cache for an hour (Claude Code's long sessions, the ones that compact). Right: read the
# step's `cache_creation.ephemeral_1h_input_tokens` too (a fifth count, within the step's
# writes) and add it to `call.cache_write_1h_tokens`.
async def test_a_steps_hour_cache_writes_are_charged_at_the_hour_rate(build: Build) -> None:
    hour = {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 100_000}
    iterations = [
        step("compaction", 1_000, 3_000, cache_creation_input_tokens=100_000, cache_creation=hour),
        step("message", IN, OUT),
    ]
    up = RawUpstream(answer_with(iterations), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = msgspec.json.encode(MSG | LONG | {"context_management": EDITS})
    status, out = await post_raw(gw, secret, "/v1/messages", body, COMPACT_BETA)
    assert status == 200, out
    row, _ = await row_and_spend(gw, secret)
    owed = cost(STANDARD) + mtok(1_000, 4.0) + mtok(100_000, WRITE_1H) + mtok(3_000, 20.0)
    assert row["cost_usd"] == pytest.approx(owed), (row["cost_usd"], owed)


# SOUND: a step's 5-minute cache writes and its reads are charged at their own rates, beside
# the top level's (1h writes there keep their rate), and added to the row's cache columns
# once: no double count of the top level, no step counted as uncached input.
async def test_step_cache_reads_and_writes_beside_the_top_level(build: Build) -> None:
    usage = opus_usage(None) | {
        "cache_creation_input_tokens": 2_000,
        "cache_read_input_tokens": 5_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 2_000},
        "iterations": [
            step(
                "compaction",
                1_000,
                3_000,
                cache_read_input_tokens=150_000,
                cache_creation_input_tokens=4_000,
            ),
            step("message", IN, OUT),
        ],
    }
    up = RawUpstream(whole(message(usage)), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = msgspec.json.encode(MSG | LONG | {"context_management": EDITS})
    status, out = await post_raw(gw, secret, "/v1/messages", body, COMPACT_BETA)
    assert status == 200, out
    row, _ = await row_and_spend(gw, secret)
    assert row["prompt_tokens"] == IN + 2_000 + 5_000 + 1_000 + 150_000 + 4_000, row
    assert row["cache_read_tokens"] == 155_000 and row["cache_write_tokens"] == 6_000, row
    owed = (
        cost(STANDARD)
        + mtok(2_000, WRITE_1H)
        + mtok(5_000, READ)
        + mtok(1_000, 4.0)
        + mtok(150_000, READ)
        + mtok(4_000, WRITE)
        + mtok(3_000, 20.0)
    )
    assert row["cost_usd"] == pytest.approx(owed), (row["cost_usd"], owed)


# --- streams, cuts, failover, count_tokens ---------------------------------------------------


# SOUND: a stream cut after its closing `message_delta` (which carries the iterations) but
# before `message_stop` charges the compaction once (the final count is in hand), and one whose
# `message_start` already carried the iterations and whose `message_delta` repeats them is
# charged them once, not twice.
@pytest.mark.parametrize("start_too", [False, True])
async def test_cut_after_the_closing_delta_charges_the_step_once(
    build: Build, start_too: bool
) -> None:
    reply = compaction_stream(COMPACTED, at_start=start_too)
    if start_too:
        reply = reply.replace(
            b'"usage": {"output_tokens": 1000}',
            b'"usage": {"output_tokens": 1000, "iterations": '
            + msgspec.json.encode(COMPACTED)
            + b"}",
        )
    reply = reply[: reply.index(b"event: message_stop")]  # (the connection drops there)
    up = RawUpstream(reply, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | LONG | {"context_management": EDITS, "stream": True}
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret) | COMPACT_BETA)
    assert resp.status == 200
    await resp.read()
    given, made, _ = await tokens_charged(gw, secret)
    assert (given, made) == (IN + 180_000, OUT + 3_500)


def _start_then_overloaded() -> bytes:
    start = message(opus_usage(None) | {"output_tokens": 1, "iterations": COMPACTED})
    start |= {"content": [], "stop_reason": None}
    return (
        STREAM_HEAD
        + sse({"type": "message_start", "message": start}, "message_start")
        + sse(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
            "error",
        )
    )


# SOUND: a first route that streamed `message_start` with a compaction in its iterations and
# then failed (`overloaded_error`) before any content is failed over, and its steps are
# forgotten (`failover._forget`): the answering route's own counts alone are charged.
async def test_failover_after_a_first_attempt_reported_steps(duo: Duo) -> None:
    first = Scripted(lambda path, body, key: _start_then_overloaded())
    second = Scripted(lambda path, body, key: compaction_stream(None, summary=None))
    gw = await duo(("anthropic", first, OPUS, {}), ("anthropic", second, OPUS, {}))
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | {"stream": True}
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret))
    got = await resp.read()
    given, made, _ = await tokens_charged(gw, secret)
    assert second.seen, got  # (failed over: the client saw nothing of the first)
    assert b"overloaded" not in got, got
    assert (given, made) == (IN, OUT), (given, made)


# SOUND: count_tokens holds nothing and charges no tokens, whatever the upstream's answer
# carries (an `iterations` list of huge compactions in a count is read by nobody).
async def test_count_tokens_charges_no_steps(build: Build) -> None:
    answer = {
        "input_tokens": 42,
        "usage": {"iterations": [step("compaction", 2**30, 2**20)]},
        "iterations": [step("compaction", 2**30, 2**20)],
    }
    up = RawUpstream(whole(answer), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    count = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    status, out = await post_raw(
        gw, secret, "/v1/messages/count_tokens", msgspec.json.encode(count), None
    )
    assert status == 200 and out["input_tokens"] == 42, out
    async with asyncio.timeout(NEVER_HANG):
        await app_of(gw)[USAGE_KEY].wait_recorded(1)
    (row,) = await usage_rows(gw)
    assert row["prompt_tokens"] == 0 and row["completion_tokens"] == 0, row
    assert row["cost_usd"] == 0, row


# --- what the SDKs see --------------------------------------------------------------------


# SOUND: on the pass-through the `anthropic` SDK sees Anthropic's own usage, byte for byte
# (top level and iterations as sent), while the key is charged the compaction beside it.
async def test_anthropic_sdk_sees_anthropics_own_usage(build: Build) -> None:
    usage = opus_usage(None) | {"iterations": COMPACTED}
    up = RawUpstream(whole(message(usage)), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    client = sdk(gw, secret)
    try:
        done = await client.beta.messages.create(
            model="m",
            max_tokens=1_000,
            messages=[{"role": "user", "content": "x " * 210_000}],
            context_management=EDITS,  # type: ignore[arg-type]
            betas=["compact-2026-01-12"],
        )
    finally:
        await client.close()
    assert (done.usage.input_tokens, done.usage.output_tokens) == (IN, OUT)
    got = [it.model_dump(exclude_none=True) for it in done.usage.iterations or []]
    assert got == COMPACTED
    given, made, _ = await tokens_charged(gw, secret)
    assert (given, made) == (IN + 180_000, OUT + 3_500)


# SOUND (with the note of h122): the `openai` SDK's streamed usage on the translated path is
# Anthropic's top level alone (chat has no place for a step; not inflated by the charge).
async def test_openai_sdk_streamed_usage_is_the_top_level(build: Build) -> None:
    up = RawUpstream(compaction_stream(COMPACTED, summary=None), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    client = openai_client(gw, secret)
    try:
        stream = await client.chat.completions.create(
            model="m",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (IN, OUT)
    given, made, _ = await tokens_charged(gw, secret)
    assert made == OUT + 3_500 and given > IN


# --- admission: what a request in flight holds for its compaction ----------------------------

# A compacting request a client shapes to cost more than it holds: dense text (two bytes a
# token: "x " repeated, so the hold's "a token is at least a byte" most is only twice the
# real size), `max_tokens: 1`, and compaction `instructions` asking for a long summary. The
# compaction step reads the 50,000-token prompt and writes a 20,000-token summary (output
# rate); the answer then reads the summary as its prompt.
DENSE = {
    "model": "m",
    "max_tokens": 1,
    "messages": [{"role": "user", "content": "x " * 50_000}],
    "context_management": {
        "edits": [
            {
                "type": "compact_20260112",
                "trigger": {"type": "input_tokens", "value": 50_000},
                "instructions": "Restate the whole conversation in full detail, verbatim.",
            }
        ]
    },
}
DENSE_USAGE = {
    "input_tokens": 20_500,
    "output_tokens": 1,
    "cache_creation_input_tokens": 0,
    "cache_read_input_tokens": 0,
    "iterations": [step("compaction", 50_000, 20_000), step("message", 20_500, 1)],
}
DENSE_COST = mtok(50_000 + 20_500, 4.0) + mtok(20_000 + 1, 20.0)  # $0.682


# WRONG (low-medium, USD and token budgets; overspend past the documented bound): admission
# holds a request's prompt (at most a token a byte) and its output limit, nothing for a
# compaction step. The step's output (the summary, at the output rate, not limited by the
# request's `max_tokens`) and the answer's re-reading of it are charged after the fact, so a
# compacting request can use more than it held, and every request in flight can do so at
# once: keys.md's "never overspent by more than one request's actual usage, however many
# requests arrive at once" fails, and compaction is not among its listed exceptions. Here a $2
# budget admits 5 concurrent requests (each holds ~$0.40: 100 KB of prompt, 1 output token),
# each costs $0.68: $3.41 spent, past budget + one request ($2.68). Quantified: the overspend
# is about the budget x (actual / held - 1) whatever the budget, +70% here; with the summary at
# the 65,536 tokens `steps_charged` allows (and its re-read) each request costs $1.77 against
# a $0.40 hold: 4.4x the budget. An honest Claude Code compaction (English at ~4 bytes a
# token, a ~3,500-token summary) stays within its hold; only a client shaping dense text and a
# long summary gets past, a few dollars per $1 of budget. Right: hold a compacting request
# (`context_management` with a `compact_*` edit, on the pass-through) its summary's output too
# (e.g. `STEPS_OUTPUT_MOST` at the output rate, or the trigger's tokens re-read), or list
# compaction among the documented exceptions.
@pytest.mark.xfail(
    strict=True,
    reason="documented exception to the overspend bound (docs/keys.md): admission holds "
    "nothing for a server-side compaction's summary",
)
async def test_compacting_requests_in_flight_stay_within_the_overspend_bound(
    build: Build,
) -> None:
    up = Gathering(whole(message(DENSE_USAGE)))
    gw = await build("anthropic", up, OPUS)
    budget = 2.0
    secret = await create_key(gw, budget_usd=budget)

    async def one() -> tuple[int, Any]:
        resp = await gw.post("/v1/messages", json=DENSE, headers=auth(secret) | COMPACT_BETA)
        return resp.status, await resp.read()

    tasks = [asyncio.create_task(one()) for _ in range(10)]
    async with asyncio.timeout(NEVER_HANG):
        while up.arrived + sum(t.done() for t in tasks) < len(tasks):
            up.changed.clear()
            waiter = asyncio.create_task(up.changed.wait())
            await asyncio.wait([waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
        up.release.set()
        results = await asyncio.gather(*tasks)
    statuses = [status for status, _ in results]
    served = statuses.count(200)
    assert served >= 2, [json.loads(b)["error"] for s, b in results if s != 200][:1]
    _, spend = await row_and_spend(gw, secret, rows=served)
    assert spend.usd == pytest.approx(served * DENSE_COST)
    assert spend.usd <= budget + DENSE_COST, (served, spend.usd, budget + DENSE_COST)
