"""Attack h125: cross-key isolation from outside. A hostile client holds one ordinary virtual
key (alice) and tries to see, change or spend another key's (bob's) data, limits or budget.

Two keys on one gateway, made through the admin API, with different model lists, rate limits,
concurrency and budgets. Clients are the real `openai` SDK and raw HTTP. Upstreams are
in-process: `FakeOpenAI` for chat, and `Stateful`, an OpenAI Responses upstream that stores
what it answers as OpenAI does (`store` defaults to true): responses by id, their output items
by id, code-interpreter containers by id, background responses. It resolves
`previous_response_id`, `item_reference` and a `container` id from any client of the gateway,
since every request reaches it with the operator's one upstream API key, just as OpenAI
resolves them for every request of that key's project.

The product's rule: nothing a client sees leaks another key's data. For stored responses the
gateway enforces it itself (providers.md "Storage when passed through": "a key that names
another key's response gets a 404 instead of that key's conversation"). The failing tests show
state minted for bob that alice still reaches through the gateway. Passing tests (`# HELD:`)
pin what was tried and held.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.settings import ModelConfig, Target
from tests.conftest import (
    NEVER_HANG,
    MakeSettings,
    RawReply,
    fake_provider,
    openai_client,
    provider_config,
    raw_request,
    read_reply,
    start_fakes,
    start_gateway,
    usage_rows,
)
from tests.fakes import _response_events, _sse

ADMIN = "admin-key-0123456789abcdef"
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
ORIGIN = "https://app.example"
BOB_SECRET = "BOB-PAYROLL-7731"  # what bob tells the model; alice must never read it
PRICES = {"input_price_per_mtok": 1.0, "output_price_per_mtok": 2.0}

Json = dict[str, Any]


class Stateful:
    """An OpenAI Responses upstream that stores what it answers, as OpenAI does."""

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.responses: dict[str, list[str]] = {}  # id -> the conversation's texts so far
        self.items: dict[str, str] = {}  # output item id -> its text
        self.containers: dict[str, str] = {}  # container id -> the files in it
        self.bodies: list[Json] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/responses", self.create)
        return app

    @staticmethod
    def missing(message: str, param: str, code: str | None) -> web.Response:
        error = {"message": message, "type": "invalid_request_error", "param": param}
        return web.json_response({"error": error | {"code": code}}, status=404)

    async def create(self, request: web.Request) -> web.StreamResponse:
        body: Json = await request.json()
        self.bodies.append(body)
        texts: list[str] = []
        previous = body.get("previous_response_id")
        if previous is not None:
            if previous not in self.responses:
                return self.missing(
                    f"Previous response with id '{previous}' not found.",
                    "previous_response_id",
                    "previous_response_not_found",
                )
            texts += self.responses[previous]
        items = body["input"] if isinstance(body["input"], list) else [body["input"]]
        for item in items:
            if isinstance(item, str):
                texts.append(item)
            elif item.get("type") == "item_reference":
                if item["id"] not in self.items:
                    return self.missing(f"Item with id '{item['id']}' not found.", "input", None)
                texts.append(self.items[item["id"]])
            else:
                content = item["content"]
                texts.append(content if isinstance(content, str) else content[0]["text"])
        output: list[Json] = []
        for tool in body.get("tools") or []:
            if tool.get("type") != "code_interpreter":
                continue
            container = tool["container"]
            if isinstance(container, str):
                if container not in self.containers:
                    return self.missing(f"Container '{container}' not found.", "tools", None)
                texts.append(f"files: {self.containers[container]}")
            else:  # {"type": "auto"}: a new container, holding what the code wrote
                container = f"cntr_{next(self.ids)}"
                self.containers[container] = f"{texts[-1]}.csv"
            call = {"type": "code_interpreter_call", "id": f"ci_{next(self.ids)}"}
            call |= {"container_id": container, "code": "print(1)", "outputs": None}
            output.append(call | {"status": "completed"})
        text = "echo: " + " | ".join(texts)
        response_id, item_id = f"resp_{next(self.ids)}", f"msg_{next(self.ids)}"
        part = {"type": "output_text", "text": text, "annotations": []}
        message = {"type": "message", "id": item_id, "role": "assistant", "status": "completed"}
        output.append(message | {"content": [part]})
        if body.get("store", True):
            self.responses[response_id] = [*texts, text]
            self.items[item_id] = text
        background = body.get("background") is True
        usage = {"input_tokens": 10, "output_tokens": 5, "total_tokens": 15}
        answer = {
            "id": response_id,
            "object": "response",
            "created_at": int(time.time()),
            "status": "queued" if background else "completed",
            "background": background,
            "error": None,
            "incomplete_details": None,
            "model": body["model"],
            # A background response is answered at once, queued: its output and usage come
            # later, read from the upstream (OpenAI's `GET /v1/responses/{id}`).
            "output": [] if background else output,
            "parallel_tool_calls": True,
            "previous_response_id": previous,
            "store": body.get("store", True),
            "tool_choice": "auto",
            "tools": body.get("tools") or [],
            "usage": None if background else usage,
            "metadata": {},
        }
        if not body.get("stream"):
            return web.json_response(answer)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        for number, event in enumerate(_response_events(answer)):
            await stream.write(_sse(event | {"sequence_number": number}, event["type"]))
        await stream.write_eof()
        return stream


@dataclass
class Kiosk:
    gw: TestClient[Any, Any]
    stateful: Stateful
    chat: Any  # the FakeOpenAI behind the chat models
    alice: Json  # the admin API's answer that made the key (its secret under "key")
    bob: Json

    def sdk(self, key: Json) -> openai.AsyncOpenAI:
        return openai_client(self.gw, key["key"])


async def make_key(gw: TestClient[Any, Any], **fields: Any) -> Json:
    async with gw.post("/admin/keys", json=fields, headers=ADMIN_HEADERS) as resp:
        assert resp.status == 201, await resp.text()
        made: Json = await resp.json()
    return made


@pytest.fixture
async def kiosk(
    aiohttp_client: AiohttpClient, aiohttp_server: AiohttpServer, make_settings: MakeSettings
) -> Kiosk:
    stateful = Stateful()
    server = await aiohttp_server(stateful.app())
    chat = (await start_fakes(aiohttp_server, "openai"))["openai"]
    providers = (
        fake_provider("openai", chat),
        provider_config(
            "openai",
            name="store",
            base_url=str(server.make_url("/v1")),
            api_keys=["sk-up-0123456789"],
            responses_api=True,
        ),
    )
    models = (
        ModelConfig(name="gpt-4o-mini", targets=(Target("openai", "gpt-4o-mini"),), **PRICES),
        ModelConfig(name="payroll-model", targets=(Target("openai", "gpt-4o"),), **PRICES),
        ModelConfig(name="stateful", targets=(Target("store", "gpt-4o-mini"),), **PRICES),
    )
    settings = make_settings(
        providers=providers, models=models, admin_key=ADMIN, cors_origins=(ORIGIN,)
    )
    gw = await start_gateway(aiohttp_client, settings)
    # Bob has no budget, so his `background` responses are relayed (keys.md).
    alice = await make_key(
        gw, name="alice", models=["gpt-4o-mini", "stateful"], rpm=100, budget_usd=5.0
    )
    bob = await make_key(
        gw,
        name="bob-payroll",
        models=["payroll-model", "stateful"],
        rpm=7,
        max_concurrency=1,
        notes="payroll service",
    )
    return Kiosk(gw, stateful, chat, alice, bob)


def expect_404(exc: openai.NotFoundError, param: str) -> None:
    error = exc.body
    assert isinstance(error, dict), error
    assert error["type"] == "not_found_error", error
    assert str(error["param"]).startswith(param), error
    assert BOB_SECRET not in str(error), error


# --- Stored Responses state minted for bob ---------------------------------------------------


# FINDING (high: another key's conversation): a background response's id is not taken as
# bob's. `background: true` is relayed for a key without a budget or tokens per minute
# (keys.md); OpenAI answers at once with a `queued` response without usage, and stores the
# conversation. `handlers/responses.py:_remember` remembers the owner of a response only when
# its answer carried usage, so this id stays unknown, and an unknown id is relayed for anyone
# (`stored.py:StoredResponses.prompt`). Alice continues bob's response and reads his prompt:
# 200 "echo: ... BOB-PAYROLL-7731 ...". Expected: the 404 `previous_response_not_found` that
# alice gets for bob's ordinary responses (next test), and nothing sent upstream. The same
# happens for any pass-through answer without usage (an OpenAI-compatible server that omits
# it); likely also for a stream bob hangs up on before its terminal event, since ids are read
# only there (`providers/openai_responses.py:ResponsesRelay._event_type`; not tested here).
async def test_bobs_background_response_cannot_be_continued_by_alice(kiosk: Kiosk) -> None:
    async with kiosk.sdk(kiosk.bob) as bob:
        queued = await bob.responses.create(
            model="stateful", input=f"Salary table: {BOB_SECRET}", background=True
        )
    assert queued.status == "queued"
    sent = len(kiosk.stateful.bodies)
    async with kiosk.sdk(kiosk.alice) as alice:
        with pytest.raises(openai.NotFoundError) as refused:
            got = await alice.responses.create(
                model="stateful", input="Repeat everything above.", previous_response_id=queued.id
            )
            pytest.fail(f"alice continued bob's conversation: {got.output_text!r}")
    expect_404(refused.value, "previous_response_id")
    assert refused.value.code == "previous_response_not_found"
    assert len(kiosk.stateful.bodies) == sent  # nothing went upstream


# HELD (documented, providers.md "Storage when passed through"): bob's ordinary response, and
# the streamed one, are not found for alice (404 `previous_response_not_found`, nothing
# upstream), and bob continues his own.
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
async def test_bobs_response_is_not_found_for_alice(kiosk: Kiosk, stream: bool) -> None:
    async with kiosk.sdk(kiosk.bob) as bob:
        if stream:
            async with bob.responses.stream(model="stateful", input=BOB_SECRET) as events:
                first = await events.get_final_response()
        else:
            first = await bob.responses.create(model="stateful", input=BOB_SECRET)
        sent = len(kiosk.stateful.bodies)
        async with kiosk.sdk(kiosk.alice) as alice:
            with pytest.raises(openai.NotFoundError) as refused:
                await alice.responses.create(
                    model="stateful", input="Repeat.", previous_response_id=first.id
                )
        expect_404(refused.value, "previous_response_id")
        assert len(kiosk.stateful.bodies) == sent
        again = await bob.responses.create(
            model="stateful", input="Go on.", previous_response_id=first.id
        )
        assert BOB_SECRET in again.output_text


# FINDING (high: another key's conversation): an `item_reference` input item names a stored
# item by id, and the gateway relays any id: only `previous_response_id` is checked against
# the key that made it (`handlers/responses.py:_stored_prompt` counts item references for
# admission, `stored.py` keeps response ids only, not their items' ids). Alice references the
# message item of bob's response and gets its text back: 200 "echo: echo: BOB-PAYROLL-7731 |
# ...". Expected: a 404 naming `input` (as for bob's response id), nothing sent upstream.
async def test_item_reference_to_bobs_output_item_is_not_found_for_alice(kiosk: Kiosk) -> None:
    async with kiosk.sdk(kiosk.bob) as bob:
        first = await bob.responses.create(model="stateful", input=BOB_SECRET)
    item_id = first.output[0].id
    sent = len(kiosk.stateful.bodies)
    async with kiosk.sdk(kiosk.alice) as alice:
        with pytest.raises(openai.NotFoundError) as refused:
            got = await alice.responses.create(
                model="stateful",
                input=[
                    {"type": "item_reference", "id": item_id},
                    {"role": "user", "content": "Repeat that."},
                ],
            )
            pytest.fail(f"alice read bob's item: {got.output_text!r}")
    expect_404(refused.value, "input")
    assert len(kiosk.stateful.bodies) == sent


# FINDING (medium: another key's files): a code-interpreter container made for bob's request
# (its id is in his answer's `code_interpreter_call.container_id`; OpenAI keeps a container
# and the files its code wrote for 20 idle minutes) is relayed as the `container` of alice's
# tool, so alice's code runs in bob's container and reads his files: 200 "... files:
# BOB-PAYROLL-7731.csv". Expected: a 404 naming the tool (`tools[0].container`), as for bob's
# response id, and nothing sent upstream. Cause: `handlers/responses.py` relays tool
# definitions untouched; no container id is remembered per key (`stored.py`).
async def test_bobs_code_interpreter_container_is_not_found_for_alice(kiosk: Kiosk) -> None:
    auto = [{"type": "code_interpreter", "container": {"type": "auto"}}]
    async with kiosk.sdk(kiosk.bob) as bob:
        first = await bob.responses.create(model="stateful", input=BOB_SECRET, tools=auto)  # type: ignore[arg-type]
    calls = [item for item in first.output if item.type == "code_interpreter_call"]
    container = calls[0].container_id
    sent = len(kiosk.stateful.bodies)
    async with kiosk.sdk(kiosk.alice) as alice:
        with pytest.raises(openai.NotFoundError) as refused:
            got = await alice.responses.create(
                model="stateful",
                input="List the files.",
                tools=[{"type": "code_interpreter", "container": container}],
            )
            pytest.fail(f"alice used bob's container: {got.output_text!r}")
    expect_404(refused.value, "tools")
    assert len(kiosk.stateful.bodies) == sent


# HELD: the retrieval routes never reach bob's stored response: GET, DELETE, input_items and
# cancel with bob's id are the documented 404 `response_not_found` (http-api.md), say nothing
# of it, and send nothing upstream.
async def test_retrieval_routes_with_bobs_response_id(kiosk: Kiosk) -> None:
    async with kiosk.sdk(kiosk.bob) as bob:
        first = await bob.responses.create(model="stateful", input=BOB_SECRET)
    sent = len(kiosk.stateful.bodies)
    headers = {"Authorization": f"Bearer {kiosk.alice['key']}"}
    path = f"/v1/responses/{first.id}"
    routes = [("GET", path), ("DELETE", path), ("GET", f"{path}/input_items")]
    for method, url in [*routes, ("POST", f"{path}/cancel")]:
        async with kiosk.gw.request(method, url, headers=headers) as resp:
            text = await resp.text()
            assert resp.status == 404, (method, url, text)
            assert (await resp.json())["error"]["code"] == "response_not_found", text
            assert BOB_SECRET not in text
    assert len(kiosk.stateful.bodies) == sent


# --- What alice's key sees of bob's ------------------------------------------------------------


def leaks(kiosk: Kiosk, reply: str) -> list[str]:
    """What of bob's key (its id, name, display prefix, notes, secret, model) `reply` shows."""
    bob = kiosk.bob
    marks = [bob["id"], bob["name"], bob["prefix"], bob["notes"], bob["key"], "payroll-model"]
    return [mark for mark in marks if mark in reply]


async def raw(kiosk: Kiosk, method: str, target: str, headers: dict[str, str]) -> RawReply:
    head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
    request = f"{method} {target} HTTP/1.1\r\nHost: kiosk\r\n{head}Connection: close\r\n\r\n"
    return await raw_request(kiosk.gw, request.encode())


# HELD: every route a virtual key reaches lists only its own models; bob's model is "not
# found" (not "forbidden") on `/v1/models/{id}`; the admin API, `/metrics` and the dashboard
# refuse alice's key through path tricks (`//admin`, `..`, percent-encoding, a trailing slash,
# OPTIONS, `X-Original-URL`/`X-Forwarded-*`), and no answer names bob's key, id or model.
async def test_alice_sees_nothing_of_bob_on_any_route(kiosk: Kiosk) -> None:
    alice = {"Authorization": f"Bearer {kiosk.alice['key']}"}
    async with kiosk.sdk(kiosk.alice) as sdk:
        assert [m.id async for m in sdk.models.list()] == ["gpt-4o-mini", "stateful"]
        with pytest.raises(openai.NotFoundError):
            await sdk.models.retrieve("payroll-model")
    refused = {401, 404, 405}
    probes = [
        ("GET", "//admin/keys", alice, refused),
        ("GET", "/admin/../admin/keys", alice, refused),
        ("GET", "/%61dmin/keys", alice, refused),
        ("GET", "/admin/keys/", alice, refused),
        ("GET", "/admin//keys", alice, refused),
        ("GET", f"/admin/keys/{kiosk.bob['id']}", alice, refused),
        ("PATCH", f"/admin/keys/{kiosk.bob['id']}", alice, refused),
        ("DELETE", f"/admin/keys/{kiosk.bob['id']}", alice, refused),
        ("GET", "/admin/usage?by=key", alice, refused),
        ("GET", "/admin/stats", alice, refused),
        ("OPTIONS", "/admin/keys", alice, refused),
        ("GET", "/metrics", alice, refused),
        ("GET", "/metrics", {"x-api-key": kiosk.alice["key"]}, refused),
        (
            "GET",
            "/dashboard/keys",
            alice | {"Cookie": f"kiosk_session={kiosk.alice['key']}"},
            {303},
        ),
        ("GET", "/v1/usage", alice, {404}),
        ("GET", "/v1/files", alice, {404}),
        ("GET", "/readyz", {}, {200}),
        (
            "GET",
            "/v1/models",
            alice | {"X-Original-URL": "/admin/keys", "X-Forwarded-Prefix": "/admin"},
            {200},
        ),
    ]
    for method, target, headers, statuses in probes:
        reply = await raw(kiosk, method, target, headers)
        text = reply.body.decode() + str(reply.headers)
        assert reply.status in statuses, (method, target, reply.status, text)
        assert not leaks(kiosk, text), (method, target, text)
    # A HEAD (which GET routes answer) is refused alike.
    async with kiosk.gw.head("/admin/keys", headers=alice) as resp:
        assert resp.status == 401


# HELD: a wrong key answers the same whatever it is: a prefix of bob's key, bob's key with a
# byte more or less or another case, a random key; the same 401 for bob's real key id and a
# made-up one on the admin API, so neither keys nor key ids can be enumerated. A key in the
# query string is no key. Bob's request rate is not touched by any of it.
async def test_wrong_keys_near_bobs_answer_alike_and_spend_nothing(kiosk: Kiosk) -> None:
    bob_key = kiosk.bob["key"]
    wrong = [
        bob_key[:-1],
        bob_key[:24],
        bob_key + "x",
        bob_key.upper(),
        f"{bob_key[:20]} {bob_key[20:]}",
        "sk-kiosk-" + "A" * 43,
    ]
    bodies = set()
    for secret in wrong:
        for name, value in [("Authorization", f"Bearer {secret}"), ("x-api-key", secret)]:
            reply = await raw(kiosk, "GET", "/v1/models", {name: value})
            assert reply.status == 401, reply
            bodies.add(reply.body)
    assert bodies == {
        b'{"error":{"message":"Incorrect API key provided.","type":"authentication_error",'
        b'"param":null,"code":"invalid_api_key"}}'
    }
    reply = await raw(kiosk, "GET", f"/v1/models?api_key={bob_key}&key={bob_key}", {})
    assert reply.status == 401
    assert reply.json()["error"]["code"] == "missing_api_key"
    alice = {"Authorization": f"Bearer {kiosk.alice['key']}"}
    answers = [
        await raw(kiosk, "GET", f"/admin/keys/{key_id}", alice)
        for key_id in (kiosk.bob["id"], "key_000000000000")
    ]
    assert {(a.status, a.body) for a in answers} == {(answers[0].status, answers[0].body)}
    async with kiosk.sdk(kiosk.bob) as bob:
        got = await bob.chat.completions.with_raw_response.create(
            model="payroll-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert got.headers["x-ratelimit-limit-requests"] == "7"
    assert got.headers["x-ratelimit-remaining-requests"] == "6"  # his one request only


# HELD: with several key headers the documented precedence holds (endpoints.md: a Bearer token
# wins, then `x-api-key`, then `api-key`; another scheme is ignored), and of two
# `Authorization` headers the first: the request is alice's in its models, its rate headers
# and its usage row, never bob's.
async def test_two_keys_in_one_request_are_one_key(kiosk: Kiosk) -> None:
    alice, bob = kiosk.alice["key"], kiosk.bob["key"]
    variants = [
        {"Authorization": f"Bearer {alice}", "x-api-key": bob, "api-key": bob},
        {"Authorization": f"Basic {bob}", "x-api-key": alice},
        {"x-api-key": alice, "api-key": bob},
    ]
    for headers in variants:
        reply = await raw(kiosk, "GET", "/v1/models", headers)
        assert reply.status == 200 and not leaks(kiosk, reply.body.decode()), reply
        assert reply.headers["x-ratelimit-limit-requests"] == "100"
    twice = (
        "GET /v1/models HTTP/1.1\r\nHost: kiosk\r\n"
        f"Authorization: Bearer {alice}\r\nAuthorization: Bearer {bob}\r\n"
        "Connection: close\r\n\r\n"
    )
    reply = await raw_request(kiosk.gw, twice.encode())
    assert reply.status == 200 and not leaks(kiosk, reply.body.decode()), reply
    body = b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}'
    async with kiosk.gw.post(
        "/v1/chat/completions",
        data=body,
        headers={
            "Authorization": f"Bearer {alice}",
            "x-api-key": bob,
            "Content-Type": "application/json",
        },
    ) as resp:
        assert resp.status == 200, await resp.text()
    rows = await usage_rows(kiosk.gw)
    assert [row["key_id"] for row in rows] == [kiosk.alice["id"]]


def chat_request(secret: str | None, model: str, *, last: bool = False) -> bytes:
    body = f'{{"model": "{model}", "messages": [{{"role": "user", "content": "hi"}}]}}'
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: kiosk\r\nContent-Type: application/json\r\n"
    if secret is not None:
        head += f"Authorization: Bearer {secret}\r\n"
    if last:
        head += "Connection: close\r\n"
    return f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode()


# HELD: on one kept-alive connection, bob's request, then one without a key, then alice's, all
# pipelined: each is its own key's (200, 401, 200; a row each, to its key). And a refused
# request's body is never read as a request of its own (no smuggling past the 401): exactly
# one answer per request sent.
async def test_one_connection_pipelined_keys_stay_apart(kiosk: Kiosk) -> None:
    alice, bob = kiosk.alice["key"], kiosk.bob["key"]
    reader, writer = await asyncio.open_connection(kiosk.gw.host, kiosk.gw.port)
    try:
        writer.write(
            chat_request(bob, "payroll-model")
            + chat_request(None, "payroll-model")
            + chat_request(alice, "gpt-4o-mini", last=True)
        )
        async with asyncio.timeout(NEVER_HANG):
            statuses = [(await read_reply(reader)).status for _ in range(3)]
            assert await reader.read() == b""  # and nothing more
    finally:
        writer.close()
    assert statuses == [200, 401, 200]
    rows = await usage_rows(kiosk.gw)
    assert sorted(row["key_id"] for row in rows) == sorted([kiosk.alice["id"], kiosk.bob["id"]])
    smuggled = chat_request(alice, "gpt-4o-mini")
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: kiosk\r\nAuthorization: Bearer wrong\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(smuggled)}\r\n\r\n"
    )
    reader, writer = await asyncio.open_connection(kiosk.gw.host, kiosk.gw.port)
    try:
        writer.write(head.encode() + smuggled + b"GET /healthz HTTP/1.1\r\nHost: k\r\n")
        writer.write(b"Connection: close\r\n\r\n")
        async with asyncio.timeout(NEVER_HANG):
            replies = [await read_reply(reader) for _ in range(2)]
            assert await reader.read() == b""
    finally:
        writer.close()
    assert [r.status for r in replies] == [401, 200], replies
    assert len(await usage_rows(kiosk.gw)) == 2  # the smuggled request made no row


# HELD: limits are per key. While bob's one allowed request is held at the upstream, bob's
# next is a 429 (his `max_concurrency` 1) and alice's goes through, its rate headers hers; bob's
# refusal is counted for bob only. A client-sent `X-Request-ID` equal to bob's is echoed
# (documented, operations.md) and shows alice nothing of bob's.
async def test_limits_and_request_ids_are_per_key(kiosk: Kiosk) -> None:
    release = asyncio.Event()
    kiosk.chat.script(hold=release, match="held")
    held_body = [{"role": "user", "content": "held"}]
    async with kiosk.sdk(kiosk.bob) as bob, kiosk.sdk(kiosk.alice) as alice:
        kiosk.chat.request_seen.clear()
        first = asyncio.create_task(
            bob.chat.completions.with_raw_response.create(model="payroll-model", messages=held_body)
        )
        async with asyncio.timeout(NEVER_HANG):
            await kiosk.chat.request_seen.wait()
        with pytest.raises(openai.RateLimitError) as refused:
            await bob.chat.completions.create(model="payroll-model", messages=held_body)
        assert "in flight for this API key (limit 1)" in refused.value.message
        mine = await alice.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
        )
        assert mine.headers["x-ratelimit-limit-requests"] == "100"
        assert mine.headers["x-ratelimit-remaining-requests"] == "99"
        release.set()
        async with asyncio.timeout(NEVER_HANG):
            theirs = await first
        bob_request_id = theirs.headers["x-request-id"]
        echoed = await alice.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Request-ID": bob_request_id},
        )
    assert echoed.headers["x-request-id"] == bob_request_id
    assert not leaks(kiosk, echoed.text + str(echoed.headers))
    rows = await usage_rows(kiosk.gw)
    owners = {(row["request_id"], row["key_id"]) for row in rows}
    assert (bob_request_id, kiosk.bob["id"]) in owners
    assert (bob_request_id, kiosk.alice["id"]) in owners


# HELD: CORS (`cors_origins` lists one origin). A preflight from it to the admin API is
# answered with no data at all; one from another origin gets no CORS header, and neither does
# alice's answer to that origin, so a page elsewhere cannot read what her key sees.
async def test_cors_preflights_leak_nothing(kiosk: Kiosk) -> None:
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "GET"}
    reply = await raw(kiosk, "OPTIONS", "/admin/keys", preflight)
    assert (reply.status, reply.body) == (204, b"")
    evil = {"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    reply = await raw(kiosk, "OPTIONS", "/v1/models", evil)
    assert reply.status in (401, 405) and "access-control-allow-origin" not in reply.headers
    alice = {"Authorization": f"Bearer {kiosk.alice['key']}", "Origin": "https://evil.example"}
    reply = await raw(kiosk, "GET", "/v1/models", alice)
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers
    reply = await raw(kiosk, "GET", "/admin/keys", alice | {"Origin": ORIGIN})
    assert reply.status == 401 and not leaks(kiosk, reply.body.decode())
