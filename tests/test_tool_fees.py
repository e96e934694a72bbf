"""Responses built-in tools billed beyond tokens: file searches, code interpreter containers
and generated images are held at admission and charged from the answer (`gateway.tool_fees`).

A `responses_api` upstream on gpt-5-mini ($0.25 / $2 a million tokens in the bundled price
list); images at gpt-image-1's $40 a million image tokens unless a test says otherwise.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.tool_fees import Item, ServerTools, image_tokens
from tests.conftest import create_key
from tests.raw_upstream import RawUpstream, auth
from tests.test_attack_h105 import (
    Build,
    build,
    message_item,
    mtok,
    post,
    response_body,
    responses_event,
    row_and_spend,
    whole,
)

__all__ = ["build"]  # (the fixture, shared with the attack tests on what upstreams bill)

USAGE = {
    "input_tokens": 1_000,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 100,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 1_100,
}
TEXT = mtok(1_000, 0.25) + mtok(100, 2.0)
STREAM_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n"


def ask(tools: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": "Do it.", "tools": tools, "max_output_tokens": 100, **fields}


def test_image_tokens_by_quality_and_size() -> None:
    assert image_tokens("low", "1024x1024") == 272
    assert image_tokens("medium", "1536x1024") == 1568
    assert image_tokens("high", "1024x1536") == 6240
    # What the request leaves to the model is charged at the most it can be.
    assert image_tokens("auto", "auto") == 6240
    assert image_tokens(None, None) == 6240
    assert image_tokens("low", "auto") == 408
    # Other sizes (gpt-image-2) by their pixels, from the square's count.
    assert image_tokens("high", "3840x2160") == -(-4160 * 3840 * 2160 // (1024 * 1024))
    # A smaller size holds as the square: the upstream may make that instead.
    assert image_tokens("low", "512x512") == 272
    # Garbage, or past any image model's edge, is the largest standard size.
    for size in (
        "x",
        "10x",
        "1024x1024x2",
        "99999x1",
        "0x1024",
        "-5x10",
        1024,
        "\uff11\uff10x\uff11\uff10",
    ):
        assert image_tokens("high", size) == 6240, size


async def test_whole_answer_charges_each_billed_call(build: Build) -> None:
    output = [
        *({"type": "file_search_call", "id": f"fs_{i}", "status": "completed"} for i in range(3)),
        # Two runs of code in one container: one container billed.
        {"type": "code_interpreter_call", "id": "ci_1", "status": "completed",
         "container_id": "cntr_1", "code": "1+1", "outputs": None},
        {"type": "code_interpreter_call", "id": "ci_2", "status": "failed",
         "container_id": "cntr_1", "code": "1/0", "outputs": None},
        # An image whose quality and size the answer says, one charged as the request asked.
        {"type": "image_generation_call", "id": "ig_1", "status": "completed",
         "result": "iVBORw0KGgo=", "quality": "low", "size": "1024x1024"},
        {"type": "image_generation_call", "id": "ig_2", "status": "completed",
         "result": "iVBORw0KGgo="},
        # A failed search or image is not billed.
        {"type": "file_search_call", "id": "fs_x", "status": "failed"},
        {"type": "image_generation_call", "id": "ig_x", "status": "failed", "result": None},
        message_item("Done."),
    ]  # fmt: skip
    up = RawUpstream(whole(response_body(USAGE, output)), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    tools = [
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation", "quality": "high", "size": "1024x1536"},
    ]
    status, answer = await post(gw, secret, "/v1/responses", ask(tools))
    assert status == 200, answer
    row, spend = await row_and_spend(gw, secret)
    billed = TEXT + 3 * 0.0025 + 0.03 + mtok(272 + 6240, 40.0)
    assert row["cost_usd"] == pytest.approx(billed), (row["cost_usd"], billed)
    assert spend.usd == pytest.approx(billed) and spend.held_usd == 0


async def test_containers_are_charged_by_their_memory(build: Build) -> None:
    output = [
        {"type": "code_interpreter_call", "id": f"ci_{i}", "status": "completed",
         "container_id": f"cntr_{i % 2}", "code": "1", "outputs": None}
        for i in range(4)
    ]  # fmt: skip
    up = RawUpstream(whole(response_body(USAGE, output)), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    tools = [{"type": "code_interpreter", "container": {"type": "auto", "memory_limit": "4g"}}]
    status, answer = await post(gw, secret, "/v1/responses", ask(tools))
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(TEXT + 2 * 0.12)


# A budget holds the calls the tools may make: `max_tool_calls`, else 10, each at the most one
# of them bills. An image at high quality is $0.2496 (6,240 tokens at $40), so 10 of them do
# not fit in $1 and nothing goes upstream; one low-quality square image does.
async def test_image_tool_holds_its_images(build: Build) -> None:
    output = [
        {"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "x"},
    ]
    up = RawUpstream(whole(response_body(USAGE, output)), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=1.0)
    status, answer = await post(gw, secret, "/v1/responses", ask([{"type": "image_generation"}]))
    assert status == 429, answer
    assert answer["error"]["code"] == "insufficient_quota"
    assert up.paths == []
    cheap = [{"type": "image_generation", "quality": "low", "size": "1024x1024"}]
    status, answer = await post(gw, secret, "/v1/responses", ask(cheap, max_tool_calls=1))
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(TEXT + mtok(272, 40.0))


# A file search holds its $0.0025 a call: 10 calls without `max_tool_calls` do not fit in
# $0.005 (nothing goes upstream), one does; a container's $0.03 does not.
async def test_file_search_and_containers_hold_their_fees(build: Build) -> None:
    up = RawUpstream(whole(response_body(USAGE, [message_item("Done.")])), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=0.005)
    search = [{"type": "file_search", "vector_store_ids": ["vs_1"]}]
    status, _ = await post(gw, secret, "/v1/responses", ask(search, max_output_tokens=10))
    assert status == 429 and up.paths == []
    code = [{"type": "code_interpreter", "container": {"type": "auto"}}]
    status, _ = await post(gw, secret, "/v1/responses", ask(code, max_tool_calls=1))
    assert status == 429 and up.paths == []
    status, answer = await post(
        gw, secret, "/v1/responses", ask(search, max_tool_calls=1, max_output_tokens=10)
    )
    assert status == 200, answer


# A hostile upstream cannot charge a key for more calls than the request made room for.
async def test_calls_charged_are_bounded_by_max_tool_calls(build: Build) -> None:
    output = [
        {"type": "file_search_call", "id": f"fs_{i}", "status": "completed"} for i in range(5000)
    ]
    up = RawUpstream(whole(response_body(USAGE, output)), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    tools = [{"type": "file_search", "vector_store_ids": ["vs_1"]}]
    status, answer = await post(gw, secret, "/v1/responses", ask(tools, max_tool_calls=2))
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(TEXT + 2 * 0.0025)


def image_events(final: dict[str, Any] | None) -> bytes:
    """A stream that adds an image call, sends two partial images, and ends with `final`
    (a terminal response) or is cut there."""
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    item = {"type": "image_generation_call", "id": "ig_1", "status": "in_progress"}
    events = [
        responses_event("response.created", response=response),
        responses_event("response.output_item.added", output_index=0, item=item),
        *(
            responses_event(
                "response.image_generation_call.partial_image",
                output_index=0,
                item_id="ig_1",
                partial_image_index=i,
                partial_image_b64="iVBORw0KGgo=",
            )
            for i in range(2)
        ),
    ]
    if final is not None:
        done = response | {"status": "completed", "output": [final], "usage": USAGE}
        events.append(responses_event("response.completed", response=done))
    return STREAM_HEAD + b"".join(events)


IMAGE_TOOL = {"type": "image_generation", "quality": "medium", "size": "1024x1024"}


# An image started is billed as it runs: a stream cut after it is charged the image (at the
# request's quality and size) and the partial images it sent.
async def test_cut_stream_charges_the_image_it_started(build: Build) -> None:
    up = RawUpstream(image_events(None), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    tool = IMAGE_TOOL | {"partial_images": 2}
    resp = await gw.post("/v1/responses", json=ask([tool], stream=True), headers=auth(secret))
    await resp.read()
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] >= mtok(1056 + 2 * 100, 40.0), row


# The terminal response says what was made: an image that failed is not billed (its partial
# images were), one the answer sizes is charged at its size; each counted once.
@pytest.mark.parametrize(
    ("final", "tokens"),
    [
        ({"type": "image_generation_call", "id": "ig_1", "status": "failed", "result": None}, 0),
        (
            {"type": "image_generation_call", "id": "ig_1", "status": "completed",
             "result": "x", "quality": "low", "size": "1536x1024"},
            400,
        ),
    ],
)  # fmt: skip
async def test_terminal_response_settles_the_images(
    build: Build, final: dict[str, Any], tokens: int
) -> None:
    up = RawUpstream(image_events(final), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    tool = IMAGE_TOOL | {"partial_images": 2}
    resp = await gw.post("/v1/responses", json=ask([tool], stream=True), headers=auth(secret))
    assert "response.completed" in await resp.text()
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(TEXT + mtok(tokens + 2 * 100, 40.0))


# The image model's rate is the price list's (gpt-image-1.5: $32 a million image tokens), and
# one it lacks is charged at the most the list asks.
@pytest.mark.parametrize(("model", "rate"), [("gpt-image-1.5", 32.0), ("gpt-image-77", 40.0)])
async def test_image_rate_is_the_image_models(build: Build, model: str, rate: float) -> None:
    output = [{"type": "image_generation_call", "id": "ig_1", "status": "completed", "result": "x"}]
    up = RawUpstream(whole(response_body(USAGE, output)), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    tool = IMAGE_TOOL | {"model": model}
    status, answer = await post(gw, secret, "/v1/responses", ask([tool]))
    assert status == 200, answer
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(TEXT + mtok(1056, rate))


def test_only_tools_billed_beyond_tokens_are_kept() -> None:
    def tools(*specs: Any) -> list[Any]:
        return [json.dumps(spec).encode() for spec in specs]

    assert (
        ServerTools.of(tools({"type": "function", "name": "f"}, {"type": "web_search"}), 3) is None
    )
    found = ServerTools.of(tools({"type": "file_search"}, "not a tool", 7), None)
    assert found is not None and found.tools == {"file_search"}
    # A container's memory the gateway does not know is held at the largest.
    odd = ServerTools.of(tools({"type": "code_interpreter", "container": {"memory_limit": 9}}), 1)
    assert odd is not None and odd.container_price == 1.92
    named = ServerTools.of(tools({"type": "code_interpreter", "container": "cntr_1"}), 1)
    assert named is not None and named.container_price == 0.03


# A call whose container id comes only with its `done` event is one container, not two.
async def test_a_container_said_late_is_one_container(build: Build) -> None:
    response = {"id": "resp_1", "object": "response", "status": "in_progress", "output": []}
    item = {"type": "code_interpreter_call", "id": "ci_1", "status": "in_progress", "code": ""}
    done = item | {"status": "completed", "container_id": "cntr_1", "outputs": None}
    events = [
        responses_event("response.created", response=response),
        responses_event("response.output_item.added", output_index=0, item=item),
        responses_event("response.output_item.done", output_index=0, item=done),
        responses_event(
            "response.completed",
            response=response | {"status": "completed", "output": [done], "usage": USAGE},
        ),
    ]
    up = RawUpstream(STREAM_HEAD + b"".join(events), hold=False)
    gw = await build("openai", up, "gpt-5-mini", fields={"responses_api": True})
    secret = await create_key(gw, budget_usd=5.0)
    tools = [{"type": "code_interpreter", "container": {"type": "auto"}}]
    resp = await gw.post("/v1/responses", json=ask(tools, stream=True), headers=auth(secret))
    assert "response.completed" in await resp.text()
    row, _ = await row_and_spend(gw, secret)
    assert row["cost_usd"] == pytest.approx(TEXT + 0.03)


def test_mini_images_and_what_an_answer_says() -> None:
    assert image_tokens("low", "1024x1024", "gpt-image-1-mini") == 625
    assert image_tokens("high", "1536x1024", "gpt-image-1-mini") == 6500
    tools = ServerTools.of([b'{"type": "image_generation", "quality": "medium"}'], 2)
    assert tools is not None
    # The answer's own quality and size lower the charge, never raise it.
    tools.take(Item(type="image_generation_call", id="a", quality="low", size="1024x1024"), 0)
    tools.take(Item(type="image_generation_call", id="b", quality="high", size="4096x4096"), 1)
    assert tools.cost(1_000_000.0) == 272 + 1584
