"""Attack on 1ecc895 (helper-121): Anthropic's server-side `fallbacks` refused to a key with a
USD budget or a model list (kept as one unread `msgspec.Raw`; "null" and "[]" pass, a value
neither a list nor "default" is a 400 for every key), relayed for other keys.

Attacked as a hostile client holding a restricted key (a USD budget, a model list): spellings
of `fallbacks` the gateway's decoder might read apart from Anthropic's (escaped key,
duplicates, whitespace, case), `fallbacks` through the translated path, through chat
completions and Responses to an Anthropic route, through count_tokens; then the other
top-level Messages fields the pass-through relays that select another model or bill
otherwise (`tools` with Anthropic's advisor tool, `context_management` compaction,
`inference_geo`). Also as an `anthropic` SDK user (`fallbacks` on an unrestricted key) and as
Claude Code (an ordinary request on a restricted key). Failing tests are problems (the comment
above each says what happens, what it costs, how realistic it is and what would be right);
tests marked `# SOUND:` pin properties checked here that hold.

The pass-through re-encodes the body from `raw_object` (msgspec, last duplicate wins, escapes
decoded), and `_refuse_other_models` reads the same msgspec decode: the two sides cannot read
`fallbacks` apart, and Anthropic gets one normalised `fallbacks` key.

Bundled price list: claude-opus-5-5 $4 / $20 a million tokens; claude-3-5-haiku-latest
$0.80 / $4.
"""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from tests.conftest import create_key
from tests.raw_upstream import RawUpstream, auth
from tests.test_attack_h105 import Build, build, mtok, row_and_spend, whole
from tests.test_attack_h119 import (
    FALLBACK_BETA,
    HAIKU,
    IN,
    MSG,
    OPUS,
    OUT,
    STANDARD,
    cost,
    message,
    opus_answer,
    opus_usage,
    post_raw,
    sdk,
)

__all__ = ["build"]  # (the fixture)

HAIKU_RATES = (0.8, 4.0)
BETA = "server-side-fallback-2026-07-01"
ENTRY = b'{"model": "%s"}' % OPUS.encode()


def spliced(fragment: bytes) -> bytes:
    """MSG with `fragment` (top-level members, as written: escapes and duplicates kept)."""
    return msgspec.json.encode(MSG)[:-1] + b", " + fragment + b"}"


async def restricted(gw: Any, kind: str) -> str:
    if kind == "usd":
        return await create_key(gw, budget_usd=5.0)
    return await create_key(gw, models=["m"])


# --- `fallbacks` spelled so one side might miss it ----------------------------------------


# SOUND: every spelling of a non-empty `fallbacks` the pass-through would relay as one is
# refused to a USD budget and to a model list, before anything goes upstream: the key escaped
# (`fallb\u0061cks`), a duplicate whose last value is non-empty after `[]` or `null`,
# whitespace inside and around the list, "default", a list holding "default". (Both sides are
# msgspec: last duplicate wins, escapes decoded; the relayed body is re-encoded from that.)
@pytest.mark.parametrize("kind", ["usd", "models"])
@pytest.mark.parametrize(
    "fragment",
    [
        b'"fallb\\u0061cks": [' + ENTRY + b"]",
        b'"\\u0066\\u0061\\u006c\\u006c\\u0062\\u0061\\u0063\\u006b\\u0073": [' + ENTRY + b"]",
        b'"fallbacks": [], "fallbacks": [' + ENTRY + b"]",
        b'"fallbacks": null, "fallbacks": [' + ENTRY + b"]",
        b'"fallbacks": [], "fallb\\u0061cks": [' + ENTRY + b"]",
        b'"fallbacks": \n\t [ \n' + ENTRY + b" \n] \n",
        b'"fallbacks": "default"',
        b'"fallbacks": ["default"]',
        b'"fallbacks": [null]',
    ],
)
async def test_fallbacks_spellings_are_refused(build: Build, kind: str, fragment: bytes) -> None:
    up = RawUpstream(opus_answer(None, model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await restricted(gw, kind)
    status, body = await post_raw(gw, secret, "/v1/messages", spliced(fragment), FALLBACK_BETA)
    assert status == 400 and not up.bodies, (status, body)
    assert body["error"]["message"].startswith("fallbacks:"), body


# SOUND: what a restricted key may send is what Anthropic gets: an empty `fallbacks` (`[]`,
# `null`, and a non-empty one overridden by a later `[]`) goes upstream as that empty value,
# and a key spelled in another case (`Fallbacks`, `FALLBACKS`) goes as that other key,
# never as `fallbacks` (Anthropic's field names are case-sensitive: an unknown field there).
@pytest.mark.parametrize(
    ("fragment", "relayed"),
    [
        (b'"fallbacks": []', []),
        (b'"fallbacks": null', None),
        (b'"fallbacks": [' + ENTRY + b'], "fallbacks": []', []),
        (b'"fallbacks": [' + ENTRY + b'], "fallbacks": null', None),
        (b'"Fallbacks": [' + ENTRY + b"]", "absent"),
        (b'"FALLBACKS": [' + ENTRY + b"]", "absent"),
    ],
)
async def test_what_a_restricted_key_may_send(build: Build, fragment: bytes, relayed: Any) -> None:
    up = RawUpstream(opus_answer(None, model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0, models=["m"])
    status, body = await post_raw(gw, secret, "/v1/messages", spliced(fragment), FALLBACK_BETA)
    assert status == 200, body
    sent = up.bodies[0]
    if relayed == "absent":
        assert "fallbacks" not in sent, sent
    else:
        assert sent["fallbacks"] == relayed, sent


# SOUND: a token count with `fallbacks` is relayed on a restricted key: no model answers it,
# nothing is charged (the count names the requested model's tokens).
async def test_count_tokens_with_fallbacks(build: Build) -> None:
    up = RawUpstream(whole({"input_tokens": 12}), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0, models=["m"])
    count = {k: v for k, v in MSG.items() if k != "max_tokens"}
    raw = msgspec.json.encode(count)[:-1] + b', "fallbacks": [' + ENTRY + b"]}"
    status, body = await post_raw(gw, secret, "/v1/messages/count_tokens", raw, FALLBACK_BETA)
    assert status == 200 and body == {"input_tokens": 12}, body
    assert up.paths == ["/v1/messages/count_tokens"]


# SOUND: chat completions and Responses to an Anthropic route cannot carry `fallbacks` (nor
# `speed`): the translation builds Anthropic's request from typed fields, and an unknown
# top-level field of the client's is not in it.
@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/chat/completions",
            {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("/v1/responses", {"model": "m", "max_output_tokens": 100, "input": "hi"}),
    ],
)
async def test_other_apis_carry_no_fallbacks(build: Build, path: str, body: dict[str, Any]) -> None:
    up = RawUpstream(opus_answer(None, model=HAIKU), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0, models=["m"])
    extra = {"fallbacks": [{"model": OPUS, "speed": "fast"}], "speed": "fast"}
    resp = await gw.post(path, json=body | extra, headers=auth(secret) | FALLBACK_BETA)
    assert resp.status == 200, await resp.text()
    sent = up.bodies[0]
    assert "fallbacks" not in sent and "speed" not in sent, sent


# --- other fields the pass-through relays: another model, other rates ----------------------


def advisor_answer(executor: str = HAIKU) -> bytes:
    """Anthropic's answer when the executor consulted the advisor tool once: top-level usage
    is the executor's alone; the advisor's sub-inference is an `advisor_message` iteration,
    billed at its model's rates (docs: agents-and-tools/tool-use/advisor-tool)."""
    usage = opus_usage(None) | {
        "iterations": [
            {
                "type": "message",
                "input_tokens": IN // 2,
                "output_tokens": OUT // 2,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
            {
                "type": "advisor_message",
                "model": OPUS,
                "input_tokens": 12_000,
                "output_tokens": 1_600,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
            {
                "type": "message",
                "input_tokens": IN // 2,
                "output_tokens": OUT // 2,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        ]
    }
    answer = message(usage, executor)
    answer["content"] = [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "advisor", "input": {}},
        {
            "type": "advisor_tool_result",
            "tool_use_id": "srvtoolu_1",
            "content": {"type": "advisor_result", "text": "Plan: ..."},
        },
        {"type": "text", "text": "ok"},
    ]
    return whole(answer)


ADVISOR = {"type": "advisor_20260301", "name": "advisor", "model": OPUS}
ADVISOR_BETA = {"anthropic-beta": "advisor-tool-2026-03-01"}
ADVISED = mtok(12_000, STANDARD[0]) + mtok(1_600, STANDARD[1])  # $0.08 at Opus's rates


# WRONG (high, model lists; the same hole `fallbacks` was closed for): Anthropic's advisor
# tool (`{"type": "advisor_20260301", "name": "advisor", "model": "claude-opus-..."}` in
# `tools`, beta `advisor-tool-2026-03-01`, GA-track since April 2026, built into Claude Code's
# `/advisor`) makes a second model, named in the tool, run a sub-inference over the whole
# transcript inside the same request. `MessagesTool` reads only a tool's name, type and
# `max_uses`; the pass-through relays it untouched, so a key limited to Haiku gets Opus's
# reasoning (1,400-1,800 tokens a call, several calls a request with `max_uses` unset)
# although Opus is no model the key may use, nor any route maps. Realistic: it is the tool's
# purpose, one line in `tools`. Right: refuse an `advisor_*` tool to a key with a model list
# (as `fallbacks`), or check its `model` against the key's models and the routes.
async def test_advisor_tool_reaches_a_model_outside_the_list(build: Build) -> None:
    up = RawUpstream(advisor_answer(), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, models=["m"])
    body = msgspec.json.encode(MSG | {"tools": [ADVISOR]})
    status, out = await post_raw(gw, secret, "/v1/messages", body, ADVISOR_BETA)
    assert status == 400 and not up.bodies, (status, out, up.bodies[:1])


# WRONG (high, every USD budget; Claude Code's `/advisor opus` does this on every turn it
# consults): the advisor's tokens are never charged. Anthropic's top-level `usage` counts the
# executor only; each advisor call is an `advisor_message` entry of `usage.iterations`, billed
# at the advisor model's rates. The gateway reads the top-level counts alone (nothing reads
# `iterations`) at the route's model: here $0.012 recorded (Haiku, 10k in / 1k out) for
# $0.092 billed, the advisor's $0.08 (12k in / 1.6k out at Opus's $4 / $20) uncharged and
# never held; a key's budget runs ~8x over on an advisor-heavy agent loop. Realistic: any SDK
# user of the tool, and Claude Code users who set an advisor. Right: add each
# `advisor_message` iteration at its model's rates (unknown model: refuse the tool to USD
# budgets), and hold the advisor's likely cost (its `max_tokens` times `max_uses`).
async def test_advisor_tokens_are_charged(build: Build) -> None:
    up = RawUpstream(advisor_answer(), hold=False)
    gw = await build("anthropic", up, HAIKU)
    secret = await create_key(gw, budget_usd=5.0)
    body = msgspec.json.encode(MSG | {"tools": [ADVISOR]})
    status, out = await post_raw(gw, secret, "/v1/messages", body, ADVISOR_BETA)
    if status == 400 and not up.bodies:
        return  # (refused to a USD budget: also right)
    assert status == 200, out
    row, spend = await row_and_spend(gw, secret)
    owed = cost(HAIKU_RATES) + ADVISED
    assert row["cost_usd"] == pytest.approx(owed), (row["cost_usd"], owed)
    assert spend.usd == pytest.approx(owed)


# WRONG (high, every USD budget): server-side compaction (`context_management: {"edits":
# [{"type": "compact_20260112"}]}`, beta `compact-2026-01-12`) summarises the conversation in
# an extra sampling step on the same model once the prompt passes its trigger (50k tokens at
# least), billed; Anthropic's top-level `usage` is only the final iteration's (the docs'
# example: 23k in / 1k out at the top, a `compaction` iteration of 180k in / 3.5k out beside
# it). The gateway charges the top-level counts alone: here $0.112 recorded for $0.902
# billed on Opus, ~8x under, every time a long agent session compacts (and compaction may run
# several times in a request with server tools). A client can make every request compact
# (trigger at 50k, resend the long history uncompacted). Right: sum `usage.iterations` where
# present (each `compaction` and `message` entry at the route's rates; `advisor_message` at
# its model's), or refuse `compact_*` edits to USD budgets.
async def test_compaction_iteration_is_charged(build: Build) -> None:
    usage = {
        "input_tokens": 23_000,
        "output_tokens": 1_000,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "iterations": [
            {
                "type": "compaction",
                "input_tokens": 180_000,
                "output_tokens": 3_500,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
            {
                "type": "message",
                "input_tokens": 23_000,
                "output_tokens": 1_000,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        ],
    }
    answer = message(usage, OPUS)
    answer["content"] = [
        {"type": "compaction", "content": "Summary of the conversation: ..."},
        {"type": "text", "text": "ok"},
    ]
    up = RawUpstream(whole(answer), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    trigger = {"type": "input_tokens", "value": 50_000}
    edits = {"edits": [{"type": "compact_20260112", "trigger": trigger}]}
    # (A request that compacts holds its conversation: past the trigger, and past what a
    # compaction reads, or the usage bound would cap the reported prompt as implausible.)
    long = {"messages": [{"role": "user", "content": "x " * 210_000}]}
    body = msgspec.json.encode(MSG | long | {"context_management": edits})
    status, out = await post_raw(
        gw, secret, "/v1/messages", body, {"anthropic-beta": "compact-2026-01-12"}
    )
    if status == 400 and not up.bodies:
        return  # (refused to a USD budget: also right)
    assert status == 200, out
    row, spend = await row_and_spend(gw, secret)
    owed = cost(STANDARD, 23_000 + 180_000, 1_000 + 3_500)
    assert row["cost_usd"] == pytest.approx(owed), (row["cost_usd"], owed)
    assert spend.usd == pytest.approx(owed)


# WRONG (low-medium, every USD budget): `inference_geo: "us"` (Anthropic's data residency,
# Claude Opus 4.6 and later) is billed at 1.1x every token category, and the answer says so
# (`usage.inference_geo: "us"`); the pass-through relays the field and charges the standard
# rates: $0.06 recorded for $0.066 billed, 10% under on every request of a client that pins
# US inference (a compliance setting some organisations put in every request). Right: charge
# 1.1x where the answer's `usage.inference_geo` is "us" on a model that bills it (held so
# too), or refuse `inference_geo` to USD budgets where the multiplier is not known.
@pytest.mark.xfail(
    strict=True,
    reason="known gap (docs/configuration.md, Prices): the price list has no data-residency "
    "rates, and `inference_geo` is relayed and charged the standard ones",
)
async def test_us_inference_is_charged_its_premium(build: Build) -> None:
    up = RawUpstream(whole(message(opus_usage(None) | {"inference_geo": "us"})), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0)
    status, out = await post_raw(
        gw, secret, "/v1/messages", msgspec.json.encode(MSG | {"inference_geo": "us"}), None
    )
    if status == 400 and not up.bodies:
        return  # (refused to a USD budget: also right)
    assert status == 200, out
    assert up.bodies[0]["inference_geo"] == "us"
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(1.1 * cost(STANDARD)), row["cost_usd"]


# --- as a real client ------------------------------------------------------------------------


# SOUND: the `anthropic` SDK's `fallbacks` on an unrestricted key (a token budget, no model
# list) is relayed as sent, and the answer charged at the requested model's rates (as
# docs/configuration.md "Prices" says).
async def test_sdk_fallbacks_on_an_unrestricted_key(build: Build) -> None:
    up = RawUpstream(opus_answer("standard"), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_tokens=10**9)
    client = sdk(gw, secret)
    try:
        done = await client.beta.messages.create(
            model="m",
            max_tokens=1_000,
            messages=[{"role": "user", "content": "hi"}],
            fallbacks=[{"model": HAIKU}],
            betas=[BETA],
        )
    finally:
        await client.close()
    assert done.usage.input_tokens == IN
    assert up.bodies[0]["fallbacks"] == [{"model": HAIKU}]
    assert up.bodies[0]["model"] == OPUS
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(cost(STANDARD))


# SOUND: an ordinary Claude Code request (system blocks with `cache_control`, tools, thinking,
# metadata, its betas) on a key with a USD budget and a model list is unaffected: served,
# relayed as sent (model rewritten), no `fallbacks` added.
async def test_claude_code_request_is_unaffected(build: Build) -> None:
    up = RawUpstream(opus_answer(None), hold=False)
    gw = await build("anthropic", up, OPUS)
    secret = await create_key(gw, budget_usd=5.0, models=["m"])
    body = {
        "model": "m",
        "max_tokens": 32_000,
        "system": [
            {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}}
        ],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "fix the bug"}]}],
        "tools": [
            {
                "name": "Bash",
                "description": "Run a command",
                "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}},
            }
        ],
        "thinking": {"type": "enabled", "budget_tokens": 8_000},
        "metadata": {"user_id": "user_abc"},
    }
    beta = {"anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14"}
    status, out = await post_raw(gw, secret, "/v1/messages", msgspec.json.encode(body), beta)
    assert status == 200, out
    sent = up.bodies[0]
    assert sent == body | {"model": OPUS}, sent
