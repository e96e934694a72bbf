"""What a demanding user of the official `openai` SDK meets through each translation.

Each test drives the gateway with the SDK (or reads its raw answer where the SDK would hide the
defect) in front of the in-process fakes, and checks what OpenAI's API itself guarantees and the
translated answer broke: e.g. embeddings of unit length when `dimensions` shortens them.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from aiohttp.pytest_plugin import AiohttpClient, AiohttpServer
from openai.types.chat import ChatCompletionMessage

from tests.conftest import MakeSettings, openai_client
from tests.rigs import fake_for, model_on, serve
from tests.test_contract import UPSTREAM_MODELS


@pytest.mark.parametrize("encoding", [{}, {"encoding_format": "float"}], ids=["sdk", "float"])
async def test_gemini_shortened_embeddings_have_unit_length(
    encoding: dict[str, Any],
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    """OpenAI's embeddings have length 1, `dimensions` or not, so clients rank by dot product.
    Gemini normalises only its full 3072-dimension vectors: a shortened one comes back as the
    first values of it, which the gateway must scale back to unit length."""
    model = model_on("emb", "up", "gemini-embedding-001", embeddings=True)
    gateway, key = await serve(
        "gemini", fake_for("gemini"), aiohttp_server, aiohttp_client, make_settings, model
    )
    async with openai_client(gateway, key) as client:
        reply = await client.embeddings.create(
            model="emb",
            input=["hello world", "goodbye"],
            dimensions=8,
            **encoding,  # none: the SDK asks for base64 and decodes it
        )
    for item in reply.data:
        assert len(item.embedding) == 8
        assert math.sqrt(sum(v * v for v in item.embedding)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_a_refusal_fed_back_stays_in_the_history(
    kind: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    """The SDK's usual loop appends the answer's message to the history; after a refusal that
    message has `content: null` and the text in `refusal`. Translated, the turn must keep that
    text: dropped, the model never sees it refused, and the two user turns run together."""
    fake = fake_for(kind)
    model = model_on("m", "up", UPSTREAM_MODELS[kind])
    gateway, key = await serve(kind, fake, aiohttp_server, aiohttp_client, make_settings, model)
    refused = ChatCompletionMessage(role="assistant", content=None, refusal="I can't help.")
    async with openai_client(gateway, key) as client:
        reply = await client.chat.completions.create(
            model="m",
            messages=[
                {"role": "user", "content": "Do the bad thing."},
                refused.model_dump(),  # type: ignore[list-item]
                {"role": "user", "content": "Something else then."},
            ],
        )
    assert reply.choices[0].message.content == "echo: Something else then."
    body = fake.requests[-1].json
    if kind == "anthropic":
        turns = [(m["role"], [b["text"] for b in m["content"]]) for m in body["messages"]]
    else:
        turns = [(c["role"], [p["text"] for p in c["parts"]]) for c in body["contents"]]
    assistant = "assistant" if kind == "anthropic" else "model"
    assert turns == [
        ("user", ["Do the bad thing."]),
        (assistant, ["I can't help."]),
        ("user", ["Something else then."]),
    ]


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


@pytest.mark.parametrize("kind", ["anthropic", "gemini"])
async def test_a_streamed_tool_call_answer_has_null_content(
    kind: str,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    make_settings: MakeSettings,
) -> None:
    """OpenAI opens a stream that starts with a tool call with `content: null`, so the SDK's
    `stream()` helper ends with `content None`, as `create()` gives. A role chunk sent ahead
    with `content: ""` made the streamed answer's text an empty string instead."""
    fake = fake_for(kind)
    model = model_on("m", "up", UPSTREAM_MODELS[kind])
    gateway, key = await serve(kind, fake, aiohttp_server, aiohttp_client, make_settings, model)
    request: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "Weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
    }
    async with openai_client(gateway, key) as client:
        whole = await client.chat.completions.create(**request)
        async with client.chat.completions.stream(**request) as stream:
            first = await anext(aiter(stream))
            streamed = await stream.get_final_completion()
    assert first.type == "chunk"
    delta = first.chunk.choices[0].delta
    assert delta.role == "assistant" and delta.tool_calls and delta.content is None
    assert whole.choices[0].message.content is None
    assert streamed.choices[0].message.content is None
    assert streamed.choices[0].message.tool_calls
