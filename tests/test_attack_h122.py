"""Attack on 95e2518 (helper-122): Anthropic's advisor tool refused to keys with a USD budget
or a model list (`_refuse_other_models`: any tool whose `type` starts with "advisor"), and the
sampling steps billed beside an answer (`usage.iterations` entries other than "message")
charged within their own bounds (`Call.steps`, `usage_bounds.steps_charged`).

Attacked as a hostile client (advisor spellings, duplicate keys inside a tool, compaction
streamed and cut), a hostile upstream (iterations of odd shapes, 10,000 entries, nested,
on the translated chat path) and an `anthropic` SDK user (an ordinary request, iterations of
"message" entries only, server-side fallbacks on an unrestricted key). Failing tests are
problems (the comment above each says what happens, what it costs, how realistic it is and
what would be right); tests marked `# SOUND:` pin properties checked here that hold.

What Anthropic's top-level usage includes, from the installed `anthropic` SDK (2.17.0):
- `compaction`: not included ("A `compaction` entry's tokens are not included in the
  top-level `usage` fields", types/beta/beta_usage.py `iterations`): adding it is right.
- `advisor_message`: billed apart at the advisor model's rates (h121's source, the tool's
  docs); the SDK's type says nothing either way.
- `fallback_message`: IS the answer's own usage relabelled. lib/middleware/_fallbacks.py
  reproduces the server-side wire shape: the serving hop's own self-reported (top-level)
  iteration is relabelled `{**last, "type": "fallback_message"}` (`_serving_iteration_entry`),
  "in place of `message`" (types/beta/beta_fallback_message_iteration_usage.py). Summing
  every non-"message" entry counts it twice.

Bundled price list: claude-opus-5-5 $4 / $20 a million tokens (cache reads $0.20, writes $5);
claude-3-5-haiku-latest $0.80 / $4.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgspec
import pytest

from gateway.usage_bounds import PROMPT_SLACK
from tests.conftest import create_key
from tests.raw_upstream import (
    STREAM_HEAD,
    RawUpstream,
    auth,
    charged,
    cut_after,
    read_request,
    sse,
)
from tests.test_attack_h105 import Build, build, mtok, row_and_spend, whole
from tests.test_attack_h119 import (
    HAIKU,
    IN,
    MSG,
    OPUS,
    OUT,
    STANDARD,
    cost,
    message,
    opus_usage,
    post_raw,
    sdk,
)
from tests.test_attack_h121 import ADVISOR_BETA, spliced

__all__ = ["build"]  # (the fixture)

COMPACT_BETA = {"anthropic-beta": "compact-2026-01-12"}
EDITS = {
    "edits": [{"type": "compact_20260112", "trigger": {"type": "input_tokens", "value": 50_000}}]
}
LONG = {"messages": [{"role": "user", "content": "x " * 210_000}]}
CACHE_READ = 0.2  # Opus's cache read rate, $ a million tokens


def step(kind: str, given: int, made: int, **extra: Any) -> dict[str, Any]:
    return {
        "type": kind,
        "input_tokens": given,
        "output_tokens": made,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    } | extra


def answer_with(iterations: Any, model: str = OPUS) -> bytes:
    return whole(message(opus_usage(None) | {"iterations": iterations}, model))


async def tokens_charged(gw: Any, secret: str) -> tuple[int, int, float]:
    row, _ = await row_and_spend(gw, secret)
    return row["prompt_tokens"], row["completion_tokens"], row["cost_usd"]


# --- the advisor tool, spelled so one side might miss it -----------------------------------

ADVISOR_TOOL = b'{"type": "advisor_20260301", "name": "advisor", "model": "%s"}' % OPUS.encode()


# SOUND: the advisor tool is refused to a USD budget and to a model list before anything goes
# upstream however its `type` is written where msgspec and Anthropic read the same value: an
# escaped type (`\u0061dvisor_...`), an escaped key (`typ\u0065`), a duplicate `type` whose
# last value is the advisor's (msgspec takes the last, as most JSON readers do), among
# client tools, after a client tool named "advisor".
@pytest.mark.parametrize("kind", ["usd", "models"])
@pytest.mark.parametrize(
    "tool",
    [
        b'{"type": "\\u0061dvisor_20260301", "name": "advisor", "model": "x"}',
        b'{"typ\\u0065": "advisor_20260301", "name": "advisor", "model": "x"}',
        b'{"type": "custom", "name": "advisor", "type": "advisor_20260301", "model": "x"}',
        b'{"type": null, "name": "advisor", "type": "advisor_20260301", "model": "x"}',
        ADVISOR_TOOL,
    ],
)
async def test_advisor_spellings_are_refused(build: Build, kind: str, tool: bytes) -> None:
    up = RawUpstream(answer_with([]), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await (
        create_key(gw, budget_usd=5.0) if kind == "usd" else create_key(gw, models=["m"])
    )
    client_tool = b'{"name": "advisor", "input_schema": {"type": "object"}}'
    raw = spliced(b'"tools": [' + client_tool + b", " + tool + b"]")
    status, body = await post_raw(gw, secret, "/v1/messages", raw, ADVISOR_BETA)
    assert status == 400 and not up.bodies, (status, body)
    assert body["error"]["message"].startswith("tools:"), body


# SOUND: a tool whose `type` is not a string (a number, an object, a list) is a 400 from the
# schema for every key, never relayed; a client tool named "advisor", a tool_choice naming
# "advisor" (it cannot define a tool) and a type Anthropic does not know in another case
# ("Advisor_20260301": Anthropic's tool types are exact literals, the SDK's
# `Literal["advisor_20260301"]`) are relayed as written, and select no other model.
@pytest.mark.parametrize("bad", [b"1", b'{"a": "advisor_20260301"}', b'["advisor_20260301"]'])
async def test_advisor_type_not_a_string_is_refused(build: Build, bad: bytes) -> None:
    up = RawUpstream(answer_with([]), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0)
    raw = spliced(b'"tools": [{"type": ' + bad + b', "name": "advisor"}]')
    status, body = await post_raw(gw, secret, "/v1/messages", raw, ADVISOR_BETA)
    assert status == 400 and not up.bodies, (status, body)


async def test_what_a_restricted_key_may_name_advisor(build: Build) -> None:
    up = RawUpstream(answer_with([], HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0, models=["m"])
    tools = [
        {"name": "advisor", "input_schema": {"type": "object"}},
        {"type": "custom", "name": "advisor2", "input_schema": {"type": "object"}},
        {"type": "Advisor_20260301", "name": "advisor3", "model": OPUS},
    ]
    body = MSG | {"tools": tools, "tool_choice": {"type": "tool", "name": "advisor"}}
    status, out = await post_raw(
        gw, secret, "/v1/messages", msgspec.json.encode(body), ADVISOR_BETA
    )
    assert status == 200, out
    assert up.bodies[0]["tools"] == tools


# WRONG (low: depends on Anthropic's JSON reader taking the FIRST of duplicate keys, where
# msgspec takes the last): `tools` reaches Anthropic as the client's raw bytes (`raw_object`
# keeps each top-level value as written), so a tool object with `type` twice,
# `{"type": "advisor_20260301", ..., "type": "custom"}`, is read by the gateway as a custom
# tool (not refused) and relayed with both keys. Python's json and Go's take
# the last (Anthropic then sees a custom tool with no input_schema: a 400, harmless); a
# first-wins or lenient reader anywhere in Anthropic's stack would consult Opus for a key
# limited to Haiku. Realistic only against such a reader. Right: relay `tools` re-encoded from
# what the gateway read (or refuse a tool object with duplicate keys), so both sides read one
# value.
@pytest.mark.xfail(
    strict=True,
    reason="known gap (docs/keys.md): `tools` go upstream as the client's bytes; a "
    "duplicated `type` key is read last-wins here, as Anthropic's parser is expected to",
)
async def test_duplicate_tool_type_reaches_anthropic_as_one_value(build: Build) -> None:
    up = KeepsBytes(answer_with([], HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, models=["m"])
    tool = b'{"type": "advisor_20260301", "name": "advisor", "model": "x", "type": "custom"}'
    status, body = await post_raw(
        gw, secret, "/v1/messages", spliced(b'"tools": [' + tool + b"]"), ADVISOR_BETA
    )
    if status == 400 and not up.bodies:
        return  # (refused: also right)
    assert status == 200, body
    assert up.raw[0].count(b'"type"') == 1, up.raw[0]


class KeepsBytes(RawUpstream):
    """A RawUpstream that keeps each request body's bytes as relayed (`raw`)."""

    def __init__(self, reply: bytes, *, hold: bool = True) -> None:
        super().__init__(reply, hold=hold)
        self.raw: list[bytes] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            path, body = await read_request(reader)
            self.paths.append(path)
            self.raw.append(body)
            self.bodies.append(json.loads(body))
            writer.write(self.reply)
            await writer.drain()
        finally:
            self.closed.set()
            writer.close()


# --- iterations: what is charged -----------------------------------------------------------


# SOUND: iterations of "message" entries only (a server-tool loop's turns, the SDK's shape for
# any answer) change nothing: the answer is charged its top-level counts alone, not doubled,
# streamed or not, through the `anthropic` SDK.
@pytest.mark.parametrize("stream", [False, True])
async def test_message_iterations_change_nothing(build: Build, stream: bool) -> None:
    steps = [step("message", IN // 2, OUT // 2), step("message", IN // 2, OUT // 2)]
    if stream:
        up = RawUpstream(compaction_stream(steps, summary=None), hold=False)
    else:
        up = RawUpstream(answer_with(steps), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    client = sdk(gw, secret)
    try:
        if stream:
            async with client.beta.messages.stream(
                model="m", max_tokens=1_000, messages=[{"role": "user", "content": "hi"}]
            ) as events:
                done = await events.get_final_message()
        else:
            done = await client.beta.messages.create(
                model="m", max_tokens=1_000, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        await client.close()
    assert done.usage.iterations is not None and len(done.usage.iterations) == 2
    given, made, usd = await tokens_charged(gw, secret)
    assert (given, made) == (IN, OUT)
    assert usd == pytest.approx(cost(STANDARD))


# SOUND: an ordinary Claude Code request (cached system, tools, thinking) on a USD-budget,
# model-list key, answered with cache reads and writes and one "message" iteration: charged
# exactly as before the change (input, cache read and write rates; no steps).
async def test_claude_code_costs_unchanged(build: Build) -> None:
    usage = {
        "input_tokens": 2_000,
        "output_tokens": 500,
        "cache_creation_input_tokens": 3_000,
        "cache_read_input_tokens": 20_000,
        "cache_creation": {"ephemeral_5m_input_tokens": 3_000, "ephemeral_1h_input_tokens": 0},
        "iterations": [
            step(
                "message",
                2_000,
                500,
                cache_creation_input_tokens=3_000,
                cache_read_input_tokens=20_000,
            )
        ],
    }
    up = RawUpstream(whole(message(usage)), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0, models=["m"])
    body = {
        "model": "m",
        "max_tokens": 32_000,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "fix the bug"}]}],
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
        "thinking": {"type": "enabled", "budget_tokens": 8_000},
    }
    beta = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}
    status, out = await post_raw(gw, secret, "/v1/messages", msgspec.json.encode(body), beta)
    assert status == 200, out
    row, _ = await row_and_spend(gw, secret)
    owed = mtok(2_000, 4.0) + mtok(3_000, 5.0) + mtok(20_000, CACHE_READ) + mtok(500, 20.0)
    assert row["cost_usd"] == pytest.approx(owed), (row, owed)


# WRONG (medium, every key that may send `fallbacks`: token budgets, unbudgeted keys' recorded
# cost): a server-side fallback's answer labels its serving iteration `fallback_message` "in
# place of `message`" (the SDK's type), and that entry is the answer's own usage (the SDK's
# middleware builds it from the serving hop's top-level usage: `_serving_iteration_entry`).
# `beyond_messages` sums every entry that is not "message", so the served answer is charged
# twice: here 20,000 in / 2,000 out for 10,000 / 1,000 billed ($0.12 recorded for $0.06), on
# every request a fallback answers. Realistic: `fallbacks` is relayed to exactly these keys
# (h121), and the SDK's own BetaRefusalFallbackMiddleware writes this shape. Right: charge
# only the types known to be billed beside the top level (`compaction`, `advisor_message`),
# not "everything but message".
async def test_fallback_message_iteration_is_not_charged_twice(build: Build) -> None:
    iterations = [
        step("message", 3_000, 10, model=OPUS),  # (the declined hop)
        step("fallback_message", IN, OUT, model=HAIKU),
    ]
    up = RawUpstream(answer_with(iterations, HAIKU), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_tokens=10**9)
    raw = spliced(b'"fallbacks": [{"model": "%s"}]' % HAIKU.encode())
    status, out = await post_raw(gw, secret, "/v1/messages", raw, None)
    assert status == 200, out
    given, made, _ = await tokens_charged(gw, secret)
    assert (given, made) == (IN, OUT), (given, made)


# WRONG (low-medium, USD budgets with compaction; over-charge): a step's cache reads and
# writes are charged as uncached input: `beyond_messages` adds `cache_read_input_tokens` and
# `cache_creation_input_tokens` into one input count, which `_account` adds to the prompt at
# the model's input rate. A compaction step reading 150,000 cached tokens (the summary step
# reads the same prefix the answer caches; the SDK's compaction entry has its own cache
# fields for this) is charged $0.60 for $0.03 billed, 20x; a cache write is charged 0.8x of
# its 1.25x rate. Realistic: a long Claude Code session with caching and compaction on. Right:
# keep a step's cache reads and writes apart (`cache_read_tokens`, `cache_write_tokens`) and
# price them at the cache rates, as the top-level ones are.
async def test_compaction_cache_reads_are_charged_at_the_read_rate(build: Build) -> None:
    iterations = [
        step("compaction", 1_000, 3_000, cache_read_input_tokens=150_000),
        step("message", IN, OUT),
    ]
    up = RawUpstream(answer_with(iterations), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = msgspec.json.encode(MSG | LONG | {"context_management": EDITS})
    status, out = await post_raw(gw, secret, "/v1/messages", body, COMPACT_BETA)
    assert status == 200, out
    _, _, usd = await tokens_charged(gw, secret)
    owed = cost(STANDARD) + mtok(1_000, 4.0) + mtok(150_000, CACHE_READ) + mtok(3_000, 20.0)
    assert usd == pytest.approx(owed), (usd, owed)


# SOUND: a hostile upstream's odd iterations charge only what a well-formed entry would, and
# never more than the bounds: non-objects, nested lists, negative, boolean, float, string
# and over-2**40 counts add nothing; an entry without `type`, or of a type not known to be
# billed on top ("Message", since this file's fallback finding), adds nothing; only 256
# entries of 10,000 are read; 256 huge entries are charged 8 x the prompt
# bound in and 65,536 out at most.
@pytest.mark.parametrize(
    ("iterations", "extra"),
    [
        ([1, "compaction", None, [step("compaction", 5, 5)], {"type": "compaction"}], (0, 0)),
        ([step("compaction", -5, -5), step("compaction", True, True)], (0, 0)),
        ([step("compaction", 5.0, "5"), step("compaction", 2**41, 2**41)], (0, 0)),
        ({"type": "compaction", "input_tokens": 5, "output_tokens": 5}, (0, 0)),
        ([{"input_tokens": 7, "output_tokens": 3}], (0, 0)),
        ([step("Message", 7, 3)], (0, 0)),
        ([step("compaction", 1, 1)] * 10_000, (256, 256)),
    ],
)
async def test_odd_iterations(build: Build, iterations: Any, extra: tuple[int, int]) -> None:
    up = RawUpstream(answer_with(iterations), hold=False)
    gw = await build("anthropic", up, OPUS, fields={"max_response_bytes": 50_000_000})
    secret = await create_key(gw, budget_usd=5.0)
    status, out = await post_raw(gw, secret, "/v1/messages", msgspec.json.encode(MSG), None)
    assert status == 200, out
    given, made, _ = await tokens_charged(gw, secret)
    assert (given, made) == (IN + extra[0], OUT + extra[1])


# WRONG (low; documentation and a hostile or broken upstream only): docs/configuration.md says
# a step's input is charged "within eight times the request's prompt bound", but on the
# Messages pass-through (the only path a real compaction or advisor step comes on) the call
# has no `body`, so `usage_bounds.prompt_bound` is None and `steps_charged` leaves the input
# unbounded: 300 entries of 2**40 are charged 2**40 input tokens ($4.4 million on Opus: the
# key's budget gone in one answer). New exposure is small: the pass-through's top-level
# `input_tokens` is unbounded the same way already (a 2**40 there is charged as is). Right:
# bound a pass-through's prompt (and its steps) by the client's body, as a chat call's is, or
# correct the docs.
@pytest.mark.xfail(
    strict=True,
    reason="documented (docs/configuration.md, Prices): a pass-through's counts, top-level "
    "and steps, are not bounded; a bound by the translated request undercharged documents "
    "sent by URL (test_attack_h123)",
)
async def test_huge_iterations_are_bounded(build: Build) -> None:
    up = RawUpstream(answer_with([step("compaction", 2**40, 2**40)] * 300), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=50.0)
    raw = msgspec.json.encode(MSG)
    status, out = await post_raw(gw, secret, "/v1/messages", raw, None)
    assert status == 200, out
    given, made, _ = await tokens_charged(gw, secret)
    assert given - IN <= 8 * (len(raw) + PROMPT_SLACK) and made - OUT == 65_536, (given, made)


# SOUND: iterations nested 600 deep do not break the answer (served; read into `object`,
# within msgspec's depth, or unreadable and the row estimated) and charge no step. (An answer
# nested ~1,000 deep anywhere is a 500 at the parent commit too: not this change's.)
async def test_deeply_nested_iterations(build: Build) -> None:
    nested = b"[" * 600 + b"]" * 600
    usage = msgspec.json.encode(opus_usage(None))[:-1] + b', "iterations": ' + nested + b"}"
    answer = msgspec.json.encode(message({})).replace(b'"usage":{}', b'"usage":' + usage)
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    up = RawUpstream(head % len(answer) + answer, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    status, _ = await post_raw(gw, secret, "/v1/messages", msgspec.json.encode(MSG), None)
    assert status in (200, 502)
    if status == 200:
        given, made, _ = await tokens_charged(gw, secret)
        assert given <= IN + 8 * 100_000 and made <= OUT + 65_536


# --- streams -------------------------------------------------------------------------------

SUMMARY = "Summary of the conversation: " + "s" * 14_000  # (~3,500 tokens)


def compaction_stream(
    iterations: list[dict[str, Any]] | None,
    *,
    summary: str | None = SUMMARY,
    at_start: bool = False,
    end: bool = True,
) -> bytes:
    """A Messages stream that compacts (a `compaction` block first, when `summary`), then
    answers "ok"; `iterations` on the closing `message_delta` (or on `message_start`)."""
    usage = opus_usage(None) | {"output_tokens": 1}
    if at_start and iterations is not None:
        usage["iterations"] = iterations
    start = message(usage) | {"content": [], "stop_reason": None}
    out = STREAM_HEAD + sse({"type": "message_start", "message": start}, "message_start")
    index = 0
    if summary is not None:
        out += sse(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "compaction", "content": ""},
            },
            "content_block_start",
        )
        out += sse(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "compaction_delta", "content": summary},
            },
            "content_block_delta",
        )
        out += sse({"type": "content_block_stop", "index": 0}, "content_block_stop")
        index = 1
    if not end:
        return out
    out += sse(
        {
            "type": "content_block_start",
            "index": index,
            "content_block": {"type": "text", "text": ""},
        },
        "content_block_start",
    )
    out += sse(
        {
            "type": "content_block_delta",
            "index": index,
            "delta": {"type": "text_delta", "text": "ok"},
        },
        "content_block_delta",
    )
    out += sse({"type": "content_block_stop", "index": index}, "content_block_stop")
    final: dict[str, Any] = {"output_tokens": OUT}
    if iterations is not None and not at_start:
        final["iterations"] = iterations
    out += sse(
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": final,
        },
        "message_delta",
    )
    return out + sse({"type": "message_stop"}, "message_stop")


COMPACTED = [step("compaction", 180_000, 3_500), step("message", IN, OUT)]


# SOUND: a streamed compaction is charged once whether its iterations come on the closing
# `message_delta` (the SDK's `BetaMessageDeltaUsage.iterations`, which its accumulator puts
# in place of the start's) or on `message_start`, or on both (the delta's replaces the
# start's: not summed).
@pytest.mark.parametrize("where", ["delta", "start", "both"])
async def test_streamed_compaction_is_charged_once(build: Build, where: str) -> None:
    reply = compaction_stream(COMPACTED, at_start=where == "start")
    if where == "both":
        reply = compaction_stream(COMPACTED, at_start=True).replace(
            b'"usage": {"output_tokens": 1000}',
            b'"usage": {"output_tokens": 1000, "iterations": '
            + msgspec.json.encode(COMPACTED)
            + b"}",
        )
        assert reply.count(b"180000") == 2
    up = RawUpstream(reply, hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | LONG | {"context_management": EDITS, "stream": True}
    resp = await gw.post("/v1/messages", json=body, headers=auth(secret) | COMPACT_BETA)
    assert resp.status == 200
    await resp.read()
    given, made, usd = await tokens_charged(gw, secret)
    assert (given, made) == (IN + 180_000, OUT + 3_500)
    assert usd == pytest.approx(cost(STANDARD, IN + 180_000, OUT + 3_500))


# WRONG (medium-low, every USD budget; a hostile client's cheap summary): a streamed
# compaction's iterations come only on the closing `message_delta`, after the `compaction`
# block. A client that reads the compaction block (the whole summary: one `compaction_delta`)
# and hangs up is charged as a cut stream: input at least the prompt's estimate (here 105k, so
# the compaction's reading is roughly covered), but output the larger of `message_start`'s
# placeholder and the streamed text at four characters a token, and a `compaction_delta`'s
# `content` is not counted as streamed: 1 output token for a 14,000-character summary
# Anthropic billed ~3,500 output tokens of (~$0.07 a time on Opus; the SDK says compaction
# output is billed). The client keeps the summary, which is what it wanted: it resends it as
# its next request's history. Realistic: one hang-up after a marker, repeatable; an honest
# stream cut there too. Right: count a `compaction_delta`'s content as streamed output (as
# text, thinking and tool JSON are), or charge an unseen step's likely output on a cut after a
# compaction block.
@pytest.mark.xfail(
    strict=True,
    reason="known gap (docs/configuration.md, Prices): a compaction's usage comes only in "
    "the closing `message_delta`; a stream cut after its summary block is not charged it",
)
async def test_a_cut_after_the_compaction_block_charges_the_summary(build: Build) -> None:
    up = RawUpstream(compaction_stream(None, end=False))  # (held open: the client hangs up)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    body = MSG | LONG | {"context_management": EDITS, "stream": True}
    got = await cut_after(gw, secret, "/v1/messages", body, b"compaction_delta")
    assert SUMMARY[:40].encode() in got
    row, _ = await charged(gw, secret)
    assert row["completion_tokens"] >= len(SUMMARY) // 4, row


# --- the translated chat path --------------------------------------------------------------


# SOUND (with a note): iterations on the translated chat path are charged as on the
# pass-through (`chat` calls `UsageTally.billed`), within the same bounds. The chat client's
# `usage` shows the top-level counts alone (chat has no field for a step), so a chat client
# sees less than it is charged when an upstream reports steps; a translated request sends no
# `context_management` nor tools of Anthropic's, so only a proxy or a hostile upstream
# reports any, and it could as well inflate the top level (bounded alike).
async def test_translated_chat_steps(build: Build) -> None:
    up = RawUpstream(answer_with(COMPACTED), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    chat = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]}
    resp = await gw.post("/v1/chat/completions", json=chat, headers=auth(secret))
    assert resp.status == 200, await resp.text()
    shown = (await resp.json())["usage"]
    assert (shown["prompt_tokens"], shown["completion_tokens"]) == (IN, OUT)
    given, made, _ = await tokens_charged(gw, secret)
    assert made == OUT + 3_500 and IN < given <= IN + 180_000, (given, made)
