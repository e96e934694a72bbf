"""Admission counts everything an upstream bills: message text, tools, response_format schemas,
images by size and detail, files and audio by size, and the output limit; and a burst of
concurrent requests never spends more than the budget plus one request's actual usage."""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import struct
import zlib
from typing import Any

import msgspec
import pytest
from aiohttp import web
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from aiohttp.test_utils import TestClient

from gateway.media import image_dimensions, image_tokens
from gateway.schemas.chat import ChatCompletionRequest
from gateway.settings import ModelConfig, OpenAIConfig, Target
from gateway.tokens import prompt_size
from tests.conftest import NEVER_HANG, MakeSettings, create_key, start_gateway, usage_rows
from tests.fakes import completion

CHAT = "/v1/chat/completions"


@pytest.fixture
def make_settings(make_settings: MakeSettings, limits_backend: dict[str, Any]) -> MakeSettings:
    """Every test here runs twice: limits in memory, and shared through a real Redis."""
    return functools.partial(make_settings, **limits_backend)


def png(width: int, height: int) -> str:
    """A data URL of a PNG's first bytes: what admission reads of an image (its header)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    data = b"\x89PNG\r\n\x1a\n" + chunk + b"\x00" * 64
    return "data:image/png;base64," + base64.b64encode(data).decode()


def request(**fields: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(json.dumps(body), type=ChatCompletionRequest)


def user(*parts: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": list(parts)}]


BIG_TOOL = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "x" * 200_000,
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}


def test_tools_schemas_and_predictions_count() -> None:
    plain = prompt_size(request())
    tools = prompt_size(request(tools=[BIG_TOOL]))
    assert tools.likely - plain.likely > 50_000 and tools.most - plain.most > 200_000
    schema = {"type": "object", "properties": {f"f{i}": {"type": "string"} for i in range(500)}}
    fmt = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    assert (
        prompt_size(request(response_format=fmt)).likely - plain.likely
        > len(json.dumps(schema)) // 5
    )
    legacy = prompt_size(request(functions=[BIG_TOOL["function"]]))
    assert legacy.likely - plain.likely > 50_000
    predicted = prompt_size(request(prediction={"type": "content", "content": "y" * 40_000}))
    assert predicted.likely - plain.likely > 10_000


def test_text_counts_likely_four_characters_at_most_one_byte_a_token() -> None:
    size = prompt_size(request(messages=[{"role": "user", "content": "日本語" * 1000}]))
    assert size.likely < 1000 and size.most >= 9000  # three bytes a character


def test_images_count_by_size_and_detail_as_each_provider_bills() -> None:
    wide = png(2048, 768)
    assert image_dimensions(wide) == (2048, 768)
    # OpenAI tiles: 4 x 2 tiles of 512 after scaling; low detail is the base alone.
    assert image_tokens("openai", "gpt-4o", wide, "high").likely == 85 + 170 * 8
    assert image_tokens("openai", "gpt-4o", wide, "low").likely == 85
    assert image_tokens("openai", "gpt-4o-mini", wide, "high").likely == 2833 + 5667 * 8
    assert image_tokens("openai", "gpt-4.1-mini", png(1024, 1024), None).likely == 1659
    assert image_tokens("anthropic", "claude-sonnet-4-5", png(1000, 1000), None).likely == 1334
    assert image_tokens("gemini", "gemini-2.5-flash", png(300, 300), None).likely == 258
    assert image_tokens("gemini", "gemini-2.5-flash", png(1536, 1536), None).likely == 258 * 4
    by_url = image_tokens("openai", "gpt-4o", "https://example.com/cat.png", "high")
    assert by_url.likely < by_url.most == 85 + 170 * 8
    # A flat 85 no longer: a high-detail image in a request counts its tiles.
    parts = [{"type": "image_url", "image_url": {"url": wide, "detail": "high"}}]
    assert prompt_size(request(messages=user(*parts))).likely > 1400


def test_files_and_audio_count_by_size() -> None:
    pdf = base64.b64encode(b"%PDF-1.7 " + b"x" * 600_000).decode()
    file_part = {"type": "file", "file": {"filename": "a.pdf", "file_data": pdf}}
    size = prompt_size(request(messages=user(file_part)))
    assert size.likely >= 150_000 and size.most >= 600_000
    by_id = prompt_size(request(messages=user({"type": "file", "file": {"file_id": "file-1"}})))
    assert by_id.likely >= 10_000
    audio = base64.b64encode(b"\x00" * 320_000).decode()  # 10 s of 16 kHz 16-bit WAV
    part = {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}
    assert 300 <= prompt_size(request(messages=user(part))).likely <= 400


# ---- end to end --------------------------------------------------------------------------------


class Billing:
    """An OpenAI-compatible upstream that bills as a provider would: a token per three bytes
    of the request (images at their tile price) and, as output, all of the limit it was sent.
    It holds every answer until `release` is set."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()
        self.seen: list[dict[str, Any]] = []

    @staticmethod
    def bill(body: dict[str, Any], raw: bytes) -> tuple[int, int]:
        images = [
            part["image_url"]["url"]
            for message in body["messages"]
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") == "image_url"
        ]
        prompt = (len(raw) - sum(len(url) for url in images)) // 3 + 765 * len(images)
        return prompt, body.get("max_tokens") or body.get("max_completion_tokens") or 16_384

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        self.seen.append(body)
        self.arrived.set()
        await self.release.wait()
        prompt, output = self.bill(body, raw)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": output,
            "total_tokens": prompt + output,
        }
        return web.json_response(completion(usage, body["model"]))


@pytest.fixture
async def billed(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, make_settings: MakeSettings
) -> tuple[Billing, TestClient[Any, Any]]:
    upstream = Billing()
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", upstream.handle)
    server = await aiohttp_server(app)
    provider = OpenAIConfig(name="up", base_url=str(server.make_url("/v1")))
    model = ModelConfig(name="m", targets=(Target(provider="up", model="gpt-4o"),))
    gateway = await start_gateway(
        aiohttp_client, make_settings(providers=(provider,), models=(model,))
    )
    return upstream, gateway


async def test_a_huge_tool_description_cannot_spend_past_a_small_budget(
    billed: tuple[Billing, TestClient[Any, Any]],
) -> None:
    upstream, gw = billed
    upstream.release.set()
    secret = await create_key(gw, budget_tokens=200, budget_period="total")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [BIG_TOOL],
            "max_tokens": 10}  # fmt: skip
    async with gw.post(CHAT, json=body, headers={"Authorization": f"Bearer {secret}"}) as resp:
        assert resp.status == 429
        assert (await resp.json())["error"]["code"] == "insufficient_quota"
    tpm = await create_key(gw, tpm=1000)
    async with gw.post(CHAT, json=body, headers={"Authorization": f"Bearer {tpm}"}) as resp:
        assert resp.status == 429
        assert resp.headers["x-should-retry"] == "false"  # larger than the whole minute
    assert upstream.seen == []


async def test_keys_with_budgets_get_an_output_limit_sent_upstream(
    billed: tuple[Billing, TestClient[Any, Any]],
) -> None:
    upstream, gw = billed
    upstream.release.set()
    secret = await create_key(gw, budget_tokens=100_000, budget_period="day")
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with gw.post(CHAT, json=body, headers={"Authorization": f"Bearer {secret}"}) as resp:
        assert resp.status == 200
    assert upstream.seen[-1]["max_tokens"] == 4096  # the provider's default_max_tokens
    free = await create_key(gw)
    async with gw.post(CHAT, json=body, headers={"Authorization": f"Bearer {free}"}) as resp:
        assert resp.status == 200
    assert "max_tokens" not in upstream.seen[-1]  # keys without limits: as the client sent it


def burst_bodies() -> list[dict[str, Any]]:
    """100 requests of every kind: plain text, large tools, files, images, no output limit."""
    pdf = base64.b64encode(b"%PDF-1.7 " + b"x" * 30_000).decode()
    tool = {**BIG_TOOL, "function": {**BIG_TOOL["function"], "description": "d" * 30_000}}
    kinds: list[dict[str, Any]] = [
        {"messages": [{"role": "user", "content": "hello " * 50}], "max_tokens": 200},
        {"messages": [{"role": "user", "content": "use it"}], "tools": [tool], "max_tokens": 100},
        {"messages": user({"type": "file", "file": {"filename": "a.pdf", "file_data": pdf}}),
         "max_tokens": 300},
        {"messages": user({"type": "text", "text": "what is it?"},
                          {"type": "image_url", "image_url": {"url": png(1024, 1024)}}),
         "max_tokens": 50},
        {"messages": [{"role": "user", "content": "no limit"}]},
    ]  # fmt: skip
    return [{"model": "m", **kinds[i % len(kinds)]} for i in range(100)]


async def test_a_hundred_concurrent_requests_spend_at_most_the_budget_and_one_request(
    billed: tuple[Billing, TestClient[Any, Any]],
) -> None:
    upstream, gw = billed
    budget = 60_000
    secret = await create_key(gw, budget_tokens=budget, budget_period="total")
    headers = {"Authorization": f"Bearer {secret}"}

    async def one(body: dict[str, Any]) -> int:
        async with gw.post(CHAT, json=body, headers=headers) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(one(body)) for body in burst_bodies()]
    async with asyncio.timeout(NEVER_HANG):
        # Every request is decided (refused, or held at the upstream) before any finishes.
        while sum(t.done() for t in tasks) + len(upstream.seen) < len(tasks):
            upstream.arrived.clear()
            arrived = asyncio.create_task(upstream.arrived.wait())
            await asyncio.wait([arrived, *[t for t in tasks if not t.done()]],
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
            arrived.cancel()
        upstream.release.set()
        statuses = await asyncio.gather(*tasks)
    admitted = [row for row in await usage_rows(gw) if row["status"] == 200]
    assert statuses.count(200) == len(admitted) >= 2
    assert statuses.count(429) == 100 - len(admitted) > 50
    spent = sum(row["total_tokens"] for row in admitted)
    largest = max(row["total_tokens"] for row in admitted)
    assert spent <= budget + largest
