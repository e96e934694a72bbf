"""Attack h130: today's stored-id ownership (9cfa5ea..2d0edcc; the newest fix, 2c8cba8, h129:
`handlers/messages.py:_name_files`, empty `messages` on a thread continue, `thread: null`) as
real SDK users meet it, one key and several keys, and the newest fix attacked again.

Upstreams are in-process raw sockets (`Scripted`, tests/test_attack_h126) answering the way
the request asks: an OpenAI Responses upstream (reasoning, function calls, code interpreter,
web search, streams), an OpenAI chat upstream behind the translated Responses route, and an
Anthropic Messages upstream (thinking, tool loops, streams, token counts, threads). FINDING
tests fail on the current code; HELD tests pin what was tried and held.
"""

from __future__ import annotations

import asyncio
import io
import json
import time
from typing import Any

import anthropic
import openai
import pydantic
import pytest

from gateway.handlers import messages as messages_handler
from gateway.state import STORED_SHARE_KEY
from tests import test_attack_h105
from tests.conftest import NEVER_HANG, create_key, openai_client
from tests.fakes import _response_events, _sse
from tests.raw_upstream import STREAM_HEAD
from tests.test_attack_h105 import Build, completion, message_item, response_body, whole
from tests.test_attack_h107 import SONNET
from tests.test_attack_h124 import claude_request, rows_of
from tests.test_attack_h126 import Scripted
from tests.test_attack_h128 import BOBS_RUN, ask, claude, events, not_found, post, sdk

build = test_attack_h105.build  # (the fixture, by its name)

Json = dict[str, Any]
USAGE = {"input_tokens": 100, "output_tokens": 20, "total_tokens": 120}
CHAT_USAGE = {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class City(pydantic.BaseModel):
    city: str
    celsius: int


# --- upstreams --------------------------------------------------------------------------------


def responses_upstream(*, numbered: bool = True) -> Scripted:
    """An OpenAI Responses upstream: a function call (after a reasoning item, when whole) while
    a function tool has no output yet, else its built-in tools' calls and a message (JSON for a
    `json_schema` format). Item ids are numbered by request (`numbered`) or, as a server that
    counts a response's items does, restart at 1 in every response."""

    def reply(n: int, body: Json) -> bytes:
        def mint(prefix: str) -> str:
            return f"{prefix}_{n if numbered else 1}"

        tools, items = body.get("tools") or [], body["input"]
        last = items[-1] if isinstance(items, list) else {}
        output: list[Json] = []
        if (
            any(t["type"] == "function" for t in tools)
            and last.get("type") != "function_call_output"
        ):
            if not body.get("stream"):
                output.append({"type": "reasoning", "id": mint("rs"), "summary": []})
            call = {"type": "function_call", "id": mint("fc"), "call_id": f"call_{n}"}
            output.append(call | {"name": "get_weather", "arguments": '{"city":"Paris"}'})
            output[-1]["status"] = "completed"
        else:
            for tool in tools:
                if tool["type"] == "code_interpreter":
                    box = tool["container"]
                    box = box if isinstance(box, str) else f"cntr_{n}"
                    ran = {"type": "code_interpreter_call", "id": mint("ci"), "code": "1+1"}
                    output.append(
                        ran | {"container_id": box, "outputs": None, "status": "completed"}
                    )
                elif tool["type"] == "web_search":
                    action = {"type": "search", "query": "weather"}
                    output.append(
                        {"type": "web_search_call", "id": mint("ws")} | {"action": action}
                    )
                    output[-1]["status"] = "completed"
            schema = ((body.get("text") or {}).get("format") or {}).get("type") == "json_schema"
            text = '{"city": "Paris", "celsius": 21}' if schema else f"answer {n}"
            output.append(message_item(text) | {"id": mint("msg")})
        answer = response_body(USAGE, output) | {"id": f"resp_{n}", "model": "gpt-5"}
        answer["previous_response_id"] = body.get("previous_response_id")
        if not body.get("stream"):
            return whole(answer)
        return STREAM_HEAD + b"".join(_sse(e, e["type"]) for e in _response_events(answer))

    return Scripted(reply)


def chat_upstream() -> Scripted:
    """An OpenAI chat upstream (the translated Responses route): a tool call while the last
    message is not a tool's, else text; streamed when asked."""

    def reply(n: int, body: Json) -> bytes:
        if body.get("tools") and body["messages"][-1]["role"] != "tool":
            call: Json = {"id": f"call_{n}", "type": "function"}
            call["function"] = {"name": "get_weather", "arguments": '{"city":"Paris"}'}
            message: Json = {"role": "assistant", "content": None, "tool_calls": [call]}
        else:
            wants_json = (body.get("response_format") or {}).get("type") == "json_schema"
            text = '{"city": "Paris", "celsius": 21}' if wants_json else f"answer {n}"
            message = {"role": "assistant", "content": text}
        if not body.get("stream"):
            return completion(CHAT_USAGE, message)
        chunk = {"id": f"chatcmpl-{n}", "object": "chat.completion.chunk", "created": 1}
        chunk["model"] = "gpt-5"
        delta = {"role": "assistant", "content": message["content"]}
        done = {"index": 0, "delta": {}, "finish_reason": "stop"}
        parts = [
            chunk | {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
            chunk | {"choices": [done]},
            chunk | {"choices": [], "usage": CHAT_USAGE},
        ]
        return STREAM_HEAD + b"".join(_sse(p) for p in parts) + b"data: [DONE]\n\n"

    return Scripted(reply)


# --- the openai SDK's Responses, pass-through and translated ------------------------------------


async def openai_flows(client: openai.AsyncOpenAI, *, stored: bool) -> int:
    """A user's Responses flows (each an SDK call); how many requests went out."""
    first = await client.responses.create(model="m", input="Hi, I am Ana.")
    assert first.output_text.startswith("answer"), first
    async with client.responses.stream(model="m", input="Count to three.") as stream:
        streamed = await stream.get_final_response()
    assert streamed.output_text.startswith("answer"), streamed
    parsed = await client.responses.parse(model="m", input="Paris weather", text_format=City)
    assert parsed.output_parsed == City(city="Paris", celsius=21), parsed
    sent = 3
    if stored:  # (the gateway stores nothing of a translated response: no continuing it)
        again = await client.responses.create(
            model="m", input="What is my name?", previous_response_id=first.id
        )
        assert again.previous_response_id == first.id, again
        sent += 1
    # A function tool loop, stateless: the whole output sent back with the tool's result.
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    asked = await client.responses.create(model="m", input=history, tools=[WEATHER])  # type: ignore[list-item]
    calls = [item for item in asked.output if item.type == "function_call"]
    assert calls, asked.output
    history += asked.output
    history.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": "21C"})
    told = await client.responses.create(model="m", input=history, tools=[WEATHER])  # type: ignore[list-item]
    assert told.output_text.startswith("answer"), told
    history += told.output
    history.append({"role": "user", "content": "And tomorrow?"})
    later = await client.responses.create(model="m", input=history)
    assert later.output_text.startswith("answer"), later
    sent += 3
    if stored:  # built-in tools (a pass-through upstream's)
        box = {"type": "code_interpreter", "container": {"type": "auto"}}
        ran = await client.responses.create(model="m", input="Plot it.", tools=[box])  # type: ignore[list-item]
        container = next(i.container_id for i in ran.output if i.type == "code_interpreter_call")
        again = await client.responses.create(
            model="m",
            input="Plot it again.",
            previous_response_id=ran.id,
            tools=[{"type": "code_interpreter", "container": container}],
        )
        assert again.output_text.startswith("answer"), again
        found = await client.responses.create(
            model="m", input="News?", tools=[{"type": "web_search"}]
        )
        assert found.output[0].type == "web_search_call", found
        sent += 3
    return sent


# HELD: two keys, each with its own chains, run the openai SDK's Responses flows at once on a
# pass-through model (create, stream, parse with a pydantic model, `previous_response_id`, a
# function tool loop replaying `response.output` with its reasoning and function call items,
# code interpreter `auto` then its container by id, web search) and on a translated model:
# nothing refused, each request relayed once and one usage row each, priced as on 9cfa5ea.
@pytest.mark.parametrize("stored", [True, False], ids=["pass_through", "translated"])
async def test_openai_sdk_responses_flows_two_keys(build: Build, stored: bool) -> None:
    up = responses_upstream() if stored else chat_upstream()
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True} if stored else None)
    ana, ben = await create_key(gw, name="ana"), await create_key(gw, name="ben")
    async with openai_client(gw, ana) as a, openai_client(gw, ben) as b:
        async with asyncio.timeout(NEVER_HANG):
            sent = await asyncio.gather(
                openai_flows(a, stored=stored), openai_flows(b, stored=stored)
            )
    assert len(up.bodies) == sum(sent)
    rows = await rows_of(gw, sum(sent))
    assert [row["status"] for row in rows] == [200] * sum(sent)
    # gpt-5: $1.25 / $10 per Mtok; a web search $0.01; code interpreter $0.03 a request that
    # has it (a container named by id too, as on 9cfa5ea).
    tokens = 2 * sent[0] * (100 * 1.25 + 20 * 10) / 1e6
    fees = 2 * (0.01 + 2 * 0.03) if stored else 0.0
    assert abs(sum(row["cost_usd"] for row in rows) - tokens - fees) < 1e-9, rows


# FINDING (medium, regression: one key's multi-turn tool loops refused for good): an upstream
# that numbers a response's items itself (`rs_1`, `fc_1`, `msg_1` in every response, unique
# response ids, as OpenAI-compatible servers that number items per response, or take ids from
# a counter or the second's timestamp, do) answers ana first, so its item ids are remembered as
# ana's (`StoredResponses.own`). Ben's own answer then shows the same ids; his SDK tool loop
# sends `response.output` back with them (the documented stateless pattern) and gets a 404
# "Item with id 'rs_1' not found" (param `input[1].id`): his own reasoning item, nothing sent
# upstream, on every later turn for as long as ana's ids are remembered (up to 100,000 ids:
# in practice for the process's life). On 9cfa5ea: 200. Expected: ben's request relayed, as
# the item ids his own answer showed him cannot be "another key's data" to him. Cause:
# `stored.py:StoredResponses._keep` keeps an id's first key and drops the second key's claim;
# `handlers/responses.py:_references` then refuses every input item's `id` known as another
# key's (`Naming.name`), so an id shown to two keys is the first's alone.
async def test_an_upstream_reusing_item_ids_does_not_lock_the_second_key_out(
    build: Build,
) -> None:
    up = responses_upstream(numbered=False)
    gw = await build("openai", up, "gpt-5", fields={"responses_api": True})
    ana, ben = await create_key(gw, name="ana"), await create_key(gw, name="ben")
    history: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    async with openai_client(gw, ana) as a, openai_client(gw, ben) as b:
        await a.responses.create(model="m", input=history, tools=[WEATHER])  # type: ignore[list-item]
        asked = await b.responses.create(model="m", input=history, tools=[WEATHER])  # type: ignore[list-item]
        assert [item.id for item in asked.output] == ["rs_1", "fc_1"], asked.output
        history += asked.output
        history.append({"type": "function_call_output", "call_id": "call_1", "output": "21C"})
        try:
            told = await b.responses.create(model="m", input=history, tools=[WEATHER])  # type: ignore[list-item]
        except openai.NotFoundError as refused:
            pytest.fail(f"ben's own items refused: {refused.body}")
    assert told.output_text == "answer 2" and len(up.bodies) == 3


# --- the anthropic SDK's Messages ---------------------------------------------------------------

PIXEL = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9"
    "awAAAABJRU5ErkJggg=="
)
PDF = "JVBERi0xLjQKJcOkw7zDtsOfCjEgMCBvYmoKPDwvVHlwZSAvQ2F0YWxvZz4+CmVuZG9iagp0cmFpbGVy"


def claude_upstream() -> Scripted:
    """An Anthropic upstream: a token count for a body without `max_tokens`; thinking and a
    `tool_use` while a tool is offered and the last turn is no tool's result, else text;
    `msg_<n>`, streamed when asked."""

    def reply(n: int, body: Json) -> bytes:
        if "max_tokens" not in body:
            return whole({"input_tokens": 42})
        content = body["messages"][-1]["content"] if body["messages"] else ""
        answered = isinstance(content, list) and content[0].get("type") == "tool_result"
        if body.get("tools") and not answered:
            blocks: list[Json] = [{"type": "thinking", "thinking": "Look.", "signature": "sig"}]
            blocks.append({"type": "tool_use", "id": f"toolu_{n}", "name": "get_weather"})
            blocks[-1]["input"] = {"city": "Paris"}
            stop = "tool_use"
        else:
            blocks, stop = [{"type": "text", "text": f"answer {n}"}], "end_turn"
        if not body.get("stream"):
            return whole(claude(n, blocks, stop_reason=stop))
        pairs: list[tuple[str, Json]] = [
            ("message_start", {"message": claude(n, content=[], stop_reason=None)})
        ]
        for at, block in enumerate(blocks):
            pairs.append(("content_block_start", {"index": at, "content_block": block}))
            pairs.append(("content_block_stop", {"index": at}))
        ended = {"delta": {"stop_reason": stop}, "usage": {"output_tokens": 5}}
        pairs += [("message_delta", ended), ("message_stop", {})]
        return STREAM_HEAD + events(*pairs)

    return Scripted(reply)


def tool_result(use_id: str) -> Json:
    """A tool's result holding text, images and documents, base64 and by URL."""
    image = {"type": "base64", "media_type": "image/png", "data": PIXEL}
    pdf = {"type": "base64", "media_type": "application/pdf", "data": PDF}
    parts: list[Json] = [
        {"type": "text", "text": "Paris: 21C. The report's file_id"},
        {"type": "image", "source": image},
        {"type": "image", "source": {"type": "url", "url": "https://cdn.example/map.png"}},
        {"type": "document", "source": pdf, "title": "Forecast"},
        {"type": "document", "source": {"type": "url", "url": "https://cdn.example/f.pdf"}},
    ]
    return {"type": "tool_result", "tool_use_id": use_id, "content": parts}


async def claude_flows(client: anthropic.AsyncAnthropic) -> int:
    """Claude Code-like traffic through the SDK; how many requests went out."""
    asked = claude_request(streamed=False)
    first = await client.messages.create(**asked)
    use = first.content[1]
    assert use.type == "tool_use", first
    asked["messages"] += [
        {"role": "assistant", "content": [block.model_dump() for block in first.content]},
        {"role": "user", "content": [tool_result(use.id)]},
    ]
    async with client.messages.stream(**asked) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text", final
    counted = await client.messages.count_tokens(
        model="m", messages=asked["messages"], system=asked["system"], tools=asked["tools"]
    )
    assert counted.input_tokens == 42
    thread = client.beta.messages.thread(model="m", max_tokens=64, system="Be brief.")
    one = await thread.send({"role": "user", "content": "one"})
    async with thread.stream({"role": "user", "content": "two"}) as streamed:
        two = await streamed.get_final_message()
    three = await thread.send({"role": "user", "content": "three"})
    assert one.id != two.id != three.id, (one, two, three)
    return 6


# HELD: two keys run the anthropic SDK's Claude Code-like traffic at once on a pass-through
# model (a cache-marked system prompt and tool, thinking, a tool loop whose result holds
# base64 and URL images and documents and text mentioning `file_id`, a streamed turn, a token
# count, a beta thread sent, streamed and sent again): nothing refused, each thread continues
# from its own messages, one usage row a request, priced as on 9cfa5ea.
async def test_anthropic_sdk_flows_two_keys(build: Build) -> None:
    up = claude_upstream()
    gw = await build("anthropic", up, SONNET)
    ana, ben = await create_key(gw, name="ana"), await create_key(gw, name="ben")
    a, b = sdk(gw, ana), sdk(gw, ben)
    try:
        async with asyncio.timeout(NEVER_HANG):
            sent = sum(await asyncio.gather(claude_flows(a), claude_flows(b)))
    finally:
        await a.close()
        await b.close()
    assert len(up.bodies) == sent
    threads = [body["thread"] for body in up.bodies if "thread" in body]
    assert sum(thread == {"type": "create"} for thread in threads) == 2, threads
    rows = await rows_of(gw, sent)
    assert [row["status"] for row in rows] == [200] * sent
    # Sonnet: $3 / $15 per Mtok; 10 in and 5 out a message, the token counts free.
    assert abs(sum(row["cost_usd"] for row in rows) - 10 * (10 * 3 + 5 * 15) / 1e6) < 1e-9


# --- the newest fix: files named at any depth (`handlers/messages.py:_name_files`) ---------------


def long_conversation(shape: str) -> bytes:
    """A 2 MB Messages body whose JSON holds an escape (`Café`, as `json.dumps` writes it), so
    its messages are looked through for files: Claude Code-like turns (a tool call, then its
    result, 5 KB of text), or one tool call whose input holds a million small numbers (a chart
    tool's points)."""
    turns: list[Json] = [{"role": "user", "content": "Café sales?"}]
    if shape == "claude_code":
        for n in range(385):
            use = {"type": "tool_use", "id": f"toolu_{n}", "name": "Read", "input": {"p": "a.py"}}
            told = {"type": "tool_result", "tool_use_id": f"toolu_{n}", "content": "x" * 5_000}
            turns += [{"role": "assistant", "content": [use]}, {"role": "user", "content": [told]}]
    else:
        use = {"type": "tool_use", "id": "toolu_1", "name": "plot", "input": {"y": [0] * 10**6}}
        told = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Plotted."}
        turns += [{"role": "assistant", "content": [use]}, {"role": "user", "content": [told]}]
    body = json.dumps({"model": "m", "max_tokens": 64, "messages": turns}, separators=(",", ":"))
    assert 1.9e6 < len(body) < 2.1e6 and "\\u00e9" in body
    return body.encode()


# FINDING (medium, regression of 2c8cba8 (h129): any key stalls the event loop for
# every key): the file scan now decodes every message's content as plain Python objects and
# walks each value to depth 16 (`_Turn.content: object`, `_name_files`), tool call inputs
# included, whenever the body may spell `file_id"` (any `\u` escape does: `json.dumps`'s
# default writes every non-ASCII character as one) and anything is remembered. A 2 MB request
# whose tool input holds a list of a million numbers costs ~200 ms in `_stored` (a Python call
# and an f-string per element; ~3 s at the default 32 MB `max_body_bytes`), where decoding the
# body costs ~3 ms and e841899's typed scan cost ~3 ms; Claude Code-like 2 MB turns cost ~3 ms
# (HELD). Expected: at most ~20 ms for 2 MB (on 9cfa5ea there is no scan). Cause:
# `handlers/messages.py:_stored`/`_name_files`: decodes to `object` and recurses into
# everything, though Anthropic takes a file only in a block's `file_id` or a `source`
# (a tool_use `input` names none).
@pytest.mark.filterwarnings("ignore:Sending a large body:ResourceWarning")  # (the relay's)
@pytest.mark.parametrize("shape", ["claude_code", "tool_input"])
async def test_the_file_scan_of_a_2_mb_request_is_cheap(
    build: Build, shape: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = claude_upstream()
    gw = await build("anthropic", up, SONNET)
    ana = await create_key(gw, name="ana")
    hello = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
    assert (await post(gw, ana, hello))[0] == 200  # (its message id remembered)
    spent: list[float] = []
    scan = getattr(messages_handler, "_stored", None)

    def timed(*args: Any) -> Any:
        started = time.perf_counter()
        try:
            return scan(*args)  # type: ignore[misc]
        finally:
            spent.append(time.perf_counter() - started)

    monkeypatch.setattr(messages_handler, "_stored", timed, raising=False)
    headers = {"Authorization": f"Bearer {ana}", "Content-Type": "application/json"}
    data = io.BytesIO(long_conversation(shape))
    async with gw.post("/v1/messages", data=data, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert sum(spent) < 0.020, f"{sum(spent) * 1e3:.0f} ms looking for files in 2 MB"


# HELD: the newest fix attacked again. Bob's code wrote `file_bob_payroll`; alice names it at
# the deepest place Anthropic takes a file (an image's file source inside a document's content
# source inside a tool result), or under an escaped key: 404, nothing upstream. Text that
# merely mentions his id (`"file_id": "file_bob_payroll"` in a string) and a non-string
# `file_id` are relayed. A thread continued with no `messages` is relayed on the token count
# for its owner and refused (404) to a stranger; `messages: []` with `thread: null` is a 400;
# `thread: null` beside a container is relayed. On a translated route an empty continue is
# refused as a thread (`thread_unsupported_request`) and `thread: null` beside a container as
# the container.
async def test_files_at_depth_and_empty_thread_continues(build: Build) -> None:
    def reply(n: int, body: Json) -> bytes:
        if "max_tokens" not in body:
            return whole({"input_tokens": 42})
        return whole(claude(n, BOBS_RUN if n == 0 else None))

    up = Scripted(reply)
    gw = await build("anthropic", up, SONNET)
    bob, alice = await create_key(gw, name="bob"), await create_key(gw, name="alice")
    assert (await post(gw, bob, ask()))[0] == 200
    bobs = {"type": "file", "file_id": "file_bob_payroll"}
    image = {"type": "image", "source": bobs}
    scan = {"type": "document", "source": {"type": "content", "content": [image]}}
    deepest = [
        {"role": "user", "content": "Open the scan."},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "t1", "name": "scan"} | {"input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [scan]}],
        },
    ]
    not_found(*await post(gw, alice, ask(messages=deepest)))
    escaped = b'{"model":"m","max_tokens":8,"messages":[{"role":"user","content":[{"type":"image",'
    escaped += b'"source":{"type":"file","file\\u005fid":"file_bob_payroll"}}]}]}'
    not_found(*await post(gw, alice, escaped))
    assert len(up.bodies) == 1
    mention = {"type": "text", "text": 'Is "file_id": "file_bob_payroll" yours? file_id'}
    odd = {"type": "image", "source": {"type": "file", "file_id": 7}}
    for content in ([mention], [odd]):
        status, body = await post(gw, alice, ask(messages=[{"role": "user", "content": content}]))
        assert status == 200, (content, body)
    status, body = await post(gw, alice, ask())
    assert status == 200, body
    own = {"type": "continue", "previous_message_id": body["id"]}
    count = "/v1/messages/count_tokens"
    status, body = await post(gw, alice, {"model": "m", "messages": [], "thread": own}, count)
    assert status == 200 and body == {"input_tokens": 42}, body
    assert up.bodies[-1] == {"model": SONNET, "messages": [], "thread": own}
    not_found(*await post(gw, bob, {"model": "m", "messages": [], "thread": own}, count))
    status, body = await post(gw, alice, ask(thread=None, messages=[]))
    assert status == 400 and "messages" in body["error"]["message"], body
    status, body = await post(gw, alice, ask(thread=None, container="container_mine"))
    assert status == 200, body
    translated = await build("openai", Scripted(lambda n, _: completion(CHAT_USAGE)), "gpt-4o")
    key = await create_key(translated)
    # (On the same database, alice's thread is another key's here too, once written; a
    # translated route sends no thread upstream, so it is refused for the route, unread.)
    await gw.app[STORED_SHARE_KEY].flush()
    status, body = await post(translated, key, ask(messages=[], thread=own))
    assert status == 400, body
    assert body["error"]["details"] == {"error_code": "thread_unsupported_request"}, body
    status, body = await post(translated, key, ask(thread=None, container="c_1"))
    assert status == 400 and "'container'" in body["error"]["message"], body
