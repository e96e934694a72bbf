"""The fake Gemini upstream answers and rejects requests like Gemini, and every knob works."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.pytest_plugin import AiohttpServer

from tests.conftest import NEVER_HANG
from tests.fake_gemini import DUMMY_SIGNATURE, FakeGemini

Json = dict[str, Any]
MODEL = "gemini-2.5-flash"
GEMINI_3 = "gemini-3-pro-preview"
USER: Json = {"role": "user", "parts": [{"text": "hello there"}]}
HELLO: Json = {"contents": [USER], "systemInstruction": {"parts": [{"text": "Be terse."}]}}
WEATHER: Json = {
    "name": "get_weather",
    "parameters": {
        "type": "OBJECT",
        "properties": {"city": {"type": "STRING"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
TOOLS: list[Json] = [{"functionDeclarations": [WEATHER, {"name": "get_time"}]}]
CALL: Json = {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
ANSWER: Json = {"functionResponse": {"name": "get_weather", "response": {"output": {"temp": 21}}}}


@pytest.fixture
async def fake(aiohttp_server: AiohttpServer) -> FakeGemini:
    fake = FakeGemini()
    await fake.start(aiohttp_server)
    return fake


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def url(fake: FakeGemini, model: str = MODEL, *, stream: bool = False) -> str:
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"{fake.base_url}/v1beta/models/{model}:{action}"


async def generate(
    fake: FakeGemini,
    session: aiohttp.ClientSession,
    body: Any = None,
    *,
    model: str = MODEL,
    stream: bool = False,
    **fields: Any,
) -> tuple[int, Any]:
    """POST a generate request (HELLO plus ``fields`` unless ``body``); (status, JSON or events)."""
    payload = HELLO | fields if body is None else body
    async with session.post(url(fake, model, stream=stream), json=payload) as response:
        if stream and response.status == 200:
            assert response.content_type == "text/event-stream"
            return 200, sse(await response.read())
        return response.status, await response.json()


def sse(body: bytes) -> list[Json]:
    """The JSON events of a Gemini SSE body, asserting Google's CRLF framing."""
    assert body.endswith(b"\r\n\r\n"), body[-100:]
    blocks = body.split(b"\r\n\r\n")[:-1]
    assert all(b.startswith(b"data: ") and b"\n" not in b for b in blocks), body[:300]
    return [json.loads(b[6:]) for b in blocks]


def parts_of(response: Json, index: int = 0) -> list[Json]:
    parts: list[Json] = response["candidates"][index]["content"]["parts"]
    return parts


def text_of(responses: list[Json]) -> str:
    return "".join(
        p.get("text", "") for r in responses for p in parts_of(r) if not p.get("thought")
    )


async def test_plain_answer_and_recording(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    assert not fake.request_seen.is_set()
    async with session.post(url(fake), json=HELLO) as response:
        assert response.status == 200
        assert response.headers["x-content-type-options"] == "nosniff"
        body = await response.json()
    [candidate] = body["candidates"]
    assert candidate["content"] == {"parts": [{"text": "echo: hello there"}], "role": "model"}
    assert (candidate["finishReason"], candidate["index"]) == ("STOP", 0)
    assert {r["probability"] for r in candidate["safetyRatings"]} == {"NEGLIGIBLE"}
    usage = body["usageMetadata"]
    assert usage["totalTokenCount"] == usage["promptTokenCount"] + usage["candidatesTokenCount"]
    assert usage["promptTokensDetails"] == [
        {"modality": "TEXT", "tokenCount": usage["promptTokenCount"]}
    ]
    assert "thoughtsTokenCount" not in usage and "cachedContentTokenCount" not in usage
    assert body["modelVersion"] == MODEL and len(body["responseId"]) > 10
    assert fake.request_seen.is_set()
    [recorded] = fake.requests
    assert recorded.path == f"/v1beta/models/{MODEL}:generateContent"
    assert recorded.json == HELLO and fake.generate_requests == [recorded]

    _, body = await generate(fake, session, generationConfig={"candidateCount": 2})
    assert [c["index"] for c in body["candidates"]] == [0, 1]
    assert text_of([body]) == "echo: hello there"


async def test_snake_case_nulls_and_usage_knobs(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    fake.always(prompt_tokens=7, candidates_tokens=5, thoughts_tokens=3, cached_tokens=4)
    snake = {"max_output_tokens": "100", "response_modalities": ["text"]}
    body = {
        "contents": [USER],
        "system_instruction": USER,
        "tools": None,
        "generation_config": snake,
    }
    status, answer = await generate(fake, session, body)
    assert status == 200, answer
    assert answer["usageMetadata"] | {"promptTokensDetails": None, "cacheTokensDetails": None} == {
        "promptTokenCount": 7, "candidatesTokenCount": 5, "thoughtsTokenCount": 3,
        "totalTokenCount": 15, "cachedContentTokenCount": 4, "promptTokensDetails": None,
        "cacheTokensDetails": None,
    }  # fmt: skip


async def test_stream(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.always(content="The sky is blue today.")
    _, unary = await generate(fake, session)
    _, events = await generate(fake, session, stream=True)
    assert len(events) == 5
    assert text_of(events) == text_of([unary]) == "The sky is blue today."
    assert [parts_of(e) for e in events[:2]] == [[{"text": "The"}], [{"text": " sky"}]]
    *early, last = events
    assert last["candidates"][0]["finishReason"] == "STOP"
    assert last["usageMetadata"] == unary["usageMetadata"]
    for event in early:
        assert "finishReason" not in event["candidates"][0]
        usage = event["usageMetadata"]
        assert usage["totalTokenCount"] == usage["promptTokenCount"]
        assert "candidatesTokenCount" not in usage
    assert {(e["modelVersion"], e["responseId"]) for e in events} == {(MODEL, last["responseId"])}
    assert fake.generate_requests[-1].path.endswith(":streamGenerateContent")


async def test_stream_needs_alt_sse(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    target = url(fake).replace(":generateContent", ":streamGenerateContent")
    async with session.post(target, json=HELLO) as response:
        assert response.status == 400
        assert "alt=sse" in (await response.json())["error"]["message"]


async def test_function_call(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    _, body = await generate(fake, session, tools=TOOLS)
    assert parts_of(body) == [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    assert body["candidates"][0]["finishReason"] == "STOP"

    config = {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_time"]}}
    _, body = await generate(fake, session, tools=TOOLS, toolConfig=config)
    assert parts_of(body) == [{"functionCall": {"name": "get_time", "args": {}}}]
    none = {"functionCallingConfig": {"mode": "NONE"}}
    _, body = await generate(fake, session, tools=TOOLS, toolConfig=none)
    assert parts_of(body) == [{"text": "echo: hello there"}]

    fake.script(parallel=True, arguments={"city": "Rome"})
    _, body = await generate(fake, session, tools=TOOLS)
    assert [p["functionCall"]["name"] for p in parts_of(body)] == ["get_weather", "get_time"]
    assert all(p["functionCall"]["args"] == {"city": "Rome"} for p in parts_of(body))
    fake.script(tool_call=False)
    assert text_of([(await generate(fake, session, tools=TOOLS))[1]]) == "echo: hello there"


async def test_function_call_streamed(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.always(parallel=True)
    _, events = await generate(fake, session, stream=True, tools=TOOLS)
    [event] = events  # calls arrive whole, together, in the final event
    assert [p["functionCall"]["name"] for p in parts_of(event)] == ["get_weather", "get_time"]
    assert event["candidates"][0]["finishReason"] == "STOP"
    assert event["usageMetadata"]["candidatesTokenCount"] > 0


async def test_function_response_turn(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    contents = [USER, {"role": "model", "parts": [CALL]}, {"role": "user", "parts": [ANSWER]}]
    _, body = await generate(fake, session, contents=contents, tools=TOOLS)
    assert parts_of(body) == [{"text": 'tool said: {"temp": 21}'}]
    calls = [CALL, {"functionCall": {"name": "get_time", "args": {}}}]
    answers = [ANSWER, {"functionResponse": {"name": "get_time", "response": {"content": "9am"}}}]
    contents = [USER, {"role": "model", "parts": calls}, {"role": "user", "parts": answers}]
    _, body = await generate(fake, session, contents=contents)
    assert text_of([body]) == 'tool said: [{"temp": 21}, "9am"]'


async def test_gemini_3_thought_signatures(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    _, body = await generate(fake, session, model=GEMINI_3, tools=TOOLS)
    [call] = parts_of(body)
    signature = call["thoughtSignature"]
    assert base64.b64decode(signature) and signature in fake.signatures
    assert "id" not in call["functionCall"]

    def history(part: Json) -> Json:
        turns = [USER, {"role": "model", "parts": [part]}, {"role": "user", "parts": [ANSWER]}]
        return {"contents": turns, "tools": TOOLS}

    status, error = await generate(fake, session, history(CALL), model=GEMINI_3)
    assert status == 400
    assert error["error"]["message"].startswith(
        "Function call is missing a thought_signature in functionCall parts. This is required "
        "for tools to work correctly, and missing thought_signature may lead to degraded model "
        "performance. Additional data, function call `default_api:get_weather` , position 2."
    )
    for good in (signature, DUMMY_SIGNATURE):
        status, body = await generate(
            fake, session, history(CALL | {"thoughtSignature": good}), model=GEMINI_3
        )
        assert (status, text_of([body])) == (200, 'tool said: {"temp": 21}')
    status, error = await generate(
        fake, session, history(CALL | {"thoughtSignature": "QUJD"}), model=GEMINI_3
    )
    assert (status, error["error"]["message"]) == (400, "Corrupted thought signature.")
    old_turn = history(CALL)  # a finished turn (a user prompt follows) is not checked
    old_turn["contents"] += [{"role": "model", "parts": [{"text": "21"}]}, USER]
    assert (await generate(fake, session, old_turn, model=GEMINI_3))[0] == 200
    assert (await generate(fake, session, history(CALL)))[0] == 200  # Gemini 2.5 does not check


async def test_json_output(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    schema = {
        "type": "OBJECT",
        "properties": {
            "tags": {"type": "ARRAY", "items": {"type": "STRING", "enum": ["a", "b"]}},
            "name": {"type": "STRING", "nullable": True},
            "size": {"type": "number", "minimum": 0},
        },
        "propertyOrdering": ["size", "name", "tags"],
    }
    config = {"responseMimeType": "application/json", "responseSchema": schema}
    _, body = await generate(fake, session, generationConfig=config)
    assert text_of([body]) == '{"size": 1.5, "name": "Paris", "tags": ["a"]}'
    json_schema = {
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}}},
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/Point"},
            "note": {"anyOf": [{"type": "null"}, {"type": "string"}]},
            "ok": {"type": ["boolean", "null"]},
        },
        "required": ["at", "note", "ok"],
        "additionalProperties": False,
    }
    config = {"responseMimeType": "application/json", "responseJsonSchema": json_schema}
    _, body = await generate(fake, session, generationConfig=config)
    assert json.loads(text_of([body])) == {"at": {"x": 1}, "note": "Paris", "ok": True}
    config = {"responseMimeType": "application/json"}
    _, events = await generate(fake, session, stream=True, generationConfig=config)
    assert json.loads(text_of(events)) == {"reply": "hello there"}


async def test_image_output_and_thoughts(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    config = {"responseModalities": ["TEXT", "IMAGE"], "thinkingConfig": {"includeThoughts": True}}
    _, body = await generate(fake, session, model="gemini-2.5-flash-image", generationConfig=config)
    thought, text, image = parts_of(body)
    assert thought == {"text": "Thinking it over.", "thought": True}
    assert text == {"text": "echo: hello there"}
    assert image["inlineData"]["mimeType"] == "image/png"
    png = base64.b64decode(image["inlineData"]["data"], validate=True)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    pos = 8
    while pos < len(png):  # every chunk's CRC is right: a real, decodable PNG
        (size,) = struct.unpack(">I", png[pos : pos + 4])
        kind_data, crc = png[pos + 4 : pos + 8 + size], png[pos + 8 + size : pos + 12 + size]
        assert struct.unpack(">I", crc)[0] == zlib.crc32(kind_data)
        pos += 12 + size
    usage = body["usageMetadata"]
    assert usage["thoughtsTokenCount"] == 3
    total = usage["promptTokenCount"] + usage["candidatesTokenCount"] + 3
    assert usage["totalTokenCount"] == total
    _, events = await generate(fake, session, stream=True, generationConfig=config)
    assert [list(parts_of(e)[0]) for e in events] == [
        ["text", "thought"],
        *[["text"]] * 3,
        ["inlineData"],
    ]
    fake.script(image=False, thoughts="Hmm.")
    _, body = await generate(fake, session, generationConfig=config)
    assert parts_of(body) == [{"text": "Hmm.", "thought": True}, {"text": "echo: hello there"}]


async def test_stop_sequences_and_max_tokens(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    fake.always(content="one two three END four")
    _, body = await generate(fake, session, generationConfig={"stopSequences": ["END"]})
    assert (text_of([body]), body["candidates"][0]["finishReason"]) == ("one two three ", "STOP")
    _, body = await generate(fake, session, generationConfig={"maxOutputTokens": 2})
    assert (text_of([body]), body["candidates"][0]["finishReason"]) == ("one two", "MAX_TOKENS")
    fake.script(finish_reason="SAFETY")
    _, body = await generate(fake, session)
    assert body["candidates"][0]["finishReason"] == "SAFETY"


async def test_blocked_prompt(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.always(blocked=True)
    _, body = await generate(fake, session)
    assert "candidates" not in body
    assert body["promptFeedback"]["blockReason"] == "SAFETY"
    assert body["usageMetadata"]["totalTokenCount"] == body["usageMetadata"]["promptTokenCount"]
    _, events = await generate(fake, session, stream=True)
    assert [e["promptFeedback"]["blockReason"] for e in events] == ["SAFETY"]


def req(*contents: Json, **fields: Any) -> Json:
    return {"contents": list(contents) or [USER]} | fields


def parts(*items: Json, role: str = "user") -> Json:
    return {"role": role, "parts": list(items)}


def config(**fields: Any) -> Json:
    return req(generationConfig=fields)


def declare(parameters: Any = None, **fields: Any) -> Json:
    declaration = {"name": "get_weather"} | fields
    declaration |= {"parameters": parameters} if parameters is not None else {}
    return req(tools=[{"functionDeclarations": [declaration]}])


def schema(**fields: Any) -> Json:
    return config(responseMimeType="application/json", responseSchema=fields)


UNKNOWN = "Invalid JSON payload received. Unknown name \"{}\" at '{}': Cannot find field."
NOT_REPEATING = "Proto field is not repeating, cannot start list."
V1 = "(type.googleapis.com/google.ai.generativelanguage.v1beta."
STRUCT = "(type.googleapis.com/google.protobuf.Struct)"
ONEOF = "required oneof field 'data' must have one initialized field"
PAIRS = "the number of function response parts is equal to the number of function call parts"
CALLED = parts(CALL, role="model")
FN = "tools[0].function_declarations[0]"
PROPS = {"type": "OBJECT", "properties": {"city": {"type": "STRING"}}}
PNG_PART = {"inlineData": {"mimeType": "image/png", "data": "QUJD"}}
JSON_MIME = "application/json"
REJECTED: list[tuple[str, Any, str]] = [
    # unknown field names, at every depth
    ("top-level", HELLO | {"model": MODEL}, 'Unknown name "model": Cannot find field.'),
    (
        "part",
        req(parts({"type": "text", "text": "hi"})),
        UNKNOWN.format("type", "contents[0].parts[0]"),
    ),
    ("content", req(USER | {"name": "bob"}), UNKNOWN.format("name", "contents[0]")),
    ("config", config(max_tokens=5), UNKNOWN.format("max_tokens", "generation_config")),
    (
        "thinking",
        config(thinkingConfig={"effort": "low"}),
        "\"effort\" at 'generation_config.thinking_config'",
    ),
    ("tool", req(tools=[{"type": "function"}]), UNKNOWN.format("type", "tools[0]")),
    ("declaration", declare(strict=True), UNKNOWN.format("strict", FN)),
    # Schema keywords Google's Schema proto lacks, and type unions
    (
        "additionalProperties",
        declare(PROPS | {"additionalProperties": False}),
        f"\"additionalProperties\" at '{FN}.parameters'",
    ),
    (
        "nested-$schema",
        declare({"type": "OBJECT", "properties": {"a": {"$schema": "x"}}}),
        f"\"$schema\" at '{FN}.parameters.properties[0].value'",
    ),
    (
        "const",
        schema(type="STRING", const="a"),
        UNKNOWN.format("const", "generation_config.response_schema"),
    ),
    (
        "exclusiveMinimum",
        schema(type="NUMBER", exclusiveMinimum=0),
        'Unknown name "exclusiveMinimum"',
    ),
    ("$ref", schema(type="OBJECT", properties={"a": {"$ref": "#/$defs/A"}}), 'Unknown name "$ref"'),
    ("$defs", schema(type="OBJECT", **{"$defs": {}}), 'Unknown name "$defs"'),
    (
        "type-list",
        declare({"type": "OBJECT", "properties": {"a": {"type": ["string", "null"]}}}),
        f"Unknown name \"type\" at '{FN}.parameters.properties[0].value': {NOT_REPEATING}",
    ),
    (
        "type-name",
        schema(type="str"),
        f"Invalid value at 'generation_config.response_schema.type' {V1}Type), \"str\"",
    ),
    (
        "enum-number",
        schema(type="INTEGER", enum=[1, 2]),
        "at 'generation_config.response_schema.enum[0]' (TYPE_STRING), 1",
    ),
    (
        "array-items",
        declare({"type": "OBJECT", "properties": {"tags": {"type": "ARRAY"}}}),
        f"* GenerateContentRequest.{FN}.parameters.properties[tags].items: missing field.\n",
    ),
    (
        "required",
        declare(PROPS | {"required": ["town"]}),
        f"{FN}.parameters.required[0]: property is not defined",
    ),
    # contents and parts
    ("no-contents", {}, "* GenerateContentRequest.contents: contents is not specified\n"),
    ("empty-contents", req(contents=[]), "contents: contents is not specified"),
    ("contents-object", req(contents=USER), f"Invalid value at 'contents' {V1}Content)"),
    ("role", req(USER | {"role": "assistant"}), "Please use a valid role: user, model."),
    ("system-role", req(USER | {"role": "system"}), "Please use a valid role: user, model."),
    (
        "no-parts",
        req(parts()),
        "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty.",
    ),
    ("empty-part", req(parts({})), f"* GenerateContentRequest.contents[0].parts[0].data: {ONEOF}"),
    ("empty-text", req(parts({"text": ""})), ONEOF),
    (
        "two-data",
        req(parts({"text": "a", "fileData": {"fileUri": "x"}})),
        "Oneof field 'data' is already set.",
    ),
    (
        "text-object",
        req(parts({"text": {"value": "a"}})),
        "\"text\" at 'contents[0].parts[0]': Starting an object on a scalar field.",
    ),
    (
        "mime-type",
        req(parts({"inlineData": {"data": "QUJD"}})),
        "parts[0].inline_data.mime_type: mime_type must be specified.",
    ),
    (
        "data-url",
        req(parts({"inlineData": {"mimeType": "image/png", "data": "data:image/png;base64,QUJD"}})),
        "'contents[0].parts[0].inline_data.data' (TYPE_BYTES), Base64 decoding failed for \"data:",
    ),
    (
        "file-uri",
        req(parts({"fileData": {"mimeType": "application/pdf"}})),
        "parts[0].file_data.file_uri: file_uri must be specified.",
    ),
    # function calls and responses
    (
        "args-string",
        req(USER, parts({"functionCall": {"name": "f", "args": '{"a": 1}'}}, role="model")),
        f"Invalid value at 'contents[1].parts[0].function_call.args' {STRUCT}, \"{{",
    ),
    (
        "response-string",
        req(USER, CALLED, parts({"functionResponse": {"name": "get_weather", "response": "21"}})),
        f"'contents[2].parts[0].function_response.response' {STRUCT}, \"21\"",
    ),
    (
        "response-name",
        req(USER, CALLED, parts({"functionResponse": {"response": {}}})),
        "contents[2].parts[0].function_response.name: Name cannot be empty.",
    ),
    (
        "response-count",
        req(USER, parts(CALL, CALL, role="model"), parts(ANSWER)),
        f"Please ensure that {PAIRS} of the function call turn.",
    ),
    (
        "response-name-mismatch",
        req(USER, CALLED, parts({"functionResponse": {"name": "other", "response": {}}})),
        PAIRS,
    ),
    ("no-response", req(USER, CALLED, USER), PAIRS),
    (
        "response-first",
        req(parts(ANSWER)),
        "Please ensure that function response turn comes immediately after a function call turn.",
    ),
    (
        "call-first",
        req(CALLED, parts(ANSWER)),
        "Please ensure that function call turn comes immediately after a user turn or after a "
        "function response turn.",
    ),
    # tools and toolConfig
    (
        "mode",
        req(toolConfig={"functionCallingConfig": {"mode": "SOMETIMES"}}),
        f"'tool_config.function_calling_config.mode' {V1}FunctionCallingConfig.Mode), \"SOMETIMES",
    ),
    (
        "allowed-auto",
        req(
            tools=TOOLS,
            toolConfig={
                "functionCallingConfig": {"mode": "AUTO", "allowedFunctionNames": ["get_time"]}
            },
        ),
        "allowed_function_names may only be set when mode is ANY",
    ),
    (
        "allowed-unknown",
        req(
            tools=TOOLS,
            toolConfig={"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["nope"]}},
        ),
        "allowed_function_names[0]: function `nope` is not declared",
    ),
    (
        "function-name",
        req(tools=[{"functionDeclarations": [{"name": "1 bad"}]}]),
        f"{FN}.name: Invalid function name. Must start with a letter or an underscore.",
    ),
    (
        "tools-and-json",
        req(tools=TOOLS, generationConfig={"responseMimeType": JSON_MIME}),
        "Tool use with a response mime type: 'application/json' is unsupported",
    ),
    # generationConfig
    (
        "temperature",
        config(temperature=2.5),
        "generation_config.temperature: must be in the range [0, 2].",
    ),
    ("top-p", config(topP=1.5), "generation_config.top_p: must be in the range [0, 1]."),
    (
        "candidate-count",
        config(candidateCount=0),
        "generation_config.candidate_count: must be in the range",
    ),
    (
        "max-tokens",
        config(maxOutputTokens=0),
        "max_output_tokens: max_output_tokens must be positive.",
    ),
    (
        "max-tokens-float",
        config(maxOutputTokens=1.5),
        "at 'generation_config.max_output_tokens' (TYPE_INT32), 1.5",
    ),
    (
        "stop-sequences",
        config(stopSequences=list("abcdef")),
        "stop_sequences: the number of stop_sequences must not exceed 5.",
    ),
    (
        "modality",
        config(responseModalities=["VIDEO"]),
        f"'generation_config.response_modalities[0]' {V1}GenerationConfig.Modality), \"VIDEO\"",
    ),
    (
        "thinking-level",
        config(thinkingConfig={"thinkingLevel": "extreme"}),
        "Invalid value at 'generation_config.thinking_config.thinking_level'",
    ),
    (
        "thinking-budget",
        config(thinkingConfig={"thinkingBudget": "lots"}),
        "'generation_config.thinking_config.thinking_budget' (TYPE_INT32), \"lots\"",
    ),
    (
        "thinking-both",
        config(thinkingConfig={"thinkingBudget": 0, "thinkingLevel": "low"}),
        "You can only set only one of thinking budget and thinking level.",
    ),
    (
        "both-schemas",
        config(
            responseMimeType=JSON_MIME, responseSchema={"type": "STRING"}, responseJsonSchema={}
        ),
        "response_schema and response_json_schema are mutually exclusive",
    ),
    (
        "schema-no-mime",
        config(responseSchema={"type": "STRING"}),
        "response_mime_type must be one of ['application/json', 'text/x.enum'] when response_sch",
    ),
    (
        "json-schema-no-mime",
        config(responseMimeType="text/plain", responseJsonSchema={}),
        "response_mime_type must be 'application/json' when response_json_schema",
    ),
    (
        "mime",
        config(responseMimeType="text/html"),
        "response_mime_type: allowed mimetypes are `text/plain`, `application/json`",
    ),
    # systemInstruction and the body itself
    (
        "system-string",
        HELLO | {"systemInstruction": "Be terse."},
        f"Invalid value at 'system_instruction' {V1}Content), \"Be terse.\"",
    ),
    (
        "system-image",
        HELLO | {"systemInstruction": {"parts": [PNG_PART]}},
        "system_instruction.parts[0]: only text parts are supported.",
    ),
    (
        "root-list",
        [HELLO],
        'Invalid JSON payload received. Unknown name "": Root element must be a message.',
    ),
]


@pytest.mark.parametrize(
    ("body", "message"), [r[1:] for r in REJECTED], ids=[r[0] for r in REJECTED]
)
async def test_rejects_what_google_rejects(
    fake: FakeGemini, session: aiohttp.ClientSession, body: Any, message: str
) -> None:
    status, error = await generate(fake, session, body)
    assert status == 400, error
    assert set(error) == {"error"} and set(error["error"]) <= {
        "code",
        "message",
        "status",
        "details",
    }
    assert (error["error"]["code"], error["error"]["status"]) == (400, "INVALID_ARGUMENT")
    assert message in error["error"]["message"]
    if "details" in error["error"]:  # JSON parse errors name the field, as Google's do
        [detail] = error["error"]["details"]
        assert detail["@type"] == "type.googleapis.com/google.rpc.BadRequest"
        assert detail["fieldViolations"][0]["description"] == error["error"]["message"]
        assert error["error"]["message"].startswith(("Invalid JSON payload", "Invalid value at"))


async def test_accepts_what_google_accepts(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    contents = [USER, CALLED, parts(ANSWER), parts({"text": "ok"}, role="model"), USER]
    json_schema = {"type": "object", "additionalProperties": False, "$defs": {}}
    name = "a.b:c-d"
    tools = [
        {"functionDeclarations": [{"name": name, "parametersJsonSchema": json_schema}]},
        {"googleSearch": {}},
        {"codeExecution": {}},
    ]
    body = {
        "contents": contents,
        "systemInstruction": {"role": "system", "parts": [{"text": "Be terse."}]},
        "tools": tools,
        "toolConfig": {"function_calling_config": {"mode": "any", "allowedFunctionNames": [name]}},
        "safetySettings": [{"category": "HARM_CATEGORY_HARASSMENT", "threshold": "BLOCK_NONE"}],
        "generationConfig": {"temperature": 0, "topP": 1, "seed": 1, "stopSequences": ["x"] * 5,
                             "thinkingConfig": {"thinkingLevel": "low", "includeThoughts": False},
                             "responseModalities": ["Text"], "responseLogprobs": True},
    }  # fmt: skip
    status, answer = await generate(fake, session, body)
    assert status == 200, answer
    assert parts_of(answer) == [{"functionCall": {"name": "a.b:c-d", "args": {}}}]


STATUSES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}
STATUSES |= {
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}


@pytest.mark.parametrize("status", STATUSES)
async def test_scripted_errors(
    fake: FakeGemini, session: aiohttp.ClientSession, status: int
) -> None:
    fake.script(status=status, headers={"x-extra": "1"}, times=2)
    for stream in (False, True):
        async with session.post(url(fake, stream=stream), json=HELLO) as response:
            assert (response.status, response.headers["x-extra"]) == (status, "1")
            error = (await response.json())["error"]
        assert (error["code"], error["status"]) == (status, STATUSES[status])
        assert "RetryInfo" not in json.dumps(error)  # only with retry_delay
        if status == 404:
            assert error["message"].startswith(f"models/{MODEL} is not found for API version")
        if status == 503:
            assert error["message"] == "The model is overloaded. Please try again later."
    assert (await generate(fake, session))[0] == 200  # the queue is used up


async def test_retry_info_custom_error_and_api_key(
    aiohttp_server: AiohttpServer, session: aiohttp.ClientSession
) -> None:
    fake = FakeGemini(api_key="AIza-test")
    await fake.start(aiohttp_server)
    async with session.post(url(fake), json=HELLO) as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["status"] == "INVALID_ARGUMENT"
        assert error["details"][0]["reason"] == "API_KEY_INVALID"
    key = {"x-goog-api-key": "AIza-test"}
    fake.script(status=429, retry_delay="7s")
    async with session.post(url(fake), json=HELLO, headers=key) as response:
        details = (await response.json())["error"]["details"]
        retry = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.RetryInfo"]
        assert (response.status, retry) == (429, [retry[0] | {"retryDelay": "7s"}])
    custom = {"error": {"code": 400, "message": "custom", "status": "FAILED_PRECONDITION"}}
    fake.script(status=400, error=custom)
    async with session.post(url(fake), json=HELLO, headers=key) as response:
        assert (response.status, await response.json()) == (400, custom)
    async with session.post(url(fake), json=HELLO, headers=key) as response:
        assert response.status == 200
    assert fake.requests[-1].headers["x-goog-api-key"] == "AIza-test"


async def test_drop_after(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.script(drop_after=1)
    async with session.post(url(fake, stream=True), json=HELLO) as response:
        assert response.status == 200
        first = await response.content.readuntil(b"\r\n\r\n")
        assert parts_of(json.loads(first[6:])) == [{"text": "echo:"}]
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()


async def test_error_after(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.script(error_after=2)
    _, events = await generate(fake, session, stream=True)
    assert text_of(events[:2]) == "echo: hello"
    assert events[2] == {"error": {"code": 503, "message": "The model is overloaded. Please "
                                   "try again later.", "status": "UNAVAILABLE"}}  # fmt: skip
    assert len(events) == 3


async def test_drop_before_response(fake: FakeGemini, session: aiohttp.ClientSession) -> None:
    fake.script(drop_before_response=True)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await generate(fake, session)
    assert (await generate(fake, session))[0] == 200


async def test_client_disconnect_is_noticed(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    # The stream stops after one event.
    fake.always(content="a b c d e f g h", hold=asyncio.Event(), hold_after=1)
    response = await session.post(url(fake, stream=True), json=HELLO)
    await response.content.readuntil(b"\r\n\r\n")
    assert not fake.client_disconnected.is_set()
    response.close()  # hang up mid-stream
    async with asyncio.timeout(NEVER_HANG):
        await fake.client_disconnected.wait()


async def test_client_timeout_before_headers_is_noticed(
    fake: FakeGemini, session: aiohttp.ClientSession
) -> None:
    fake.always(hold=asyncio.Event())  # never answers
    with pytest.raises(asyncio.TimeoutError):
        await session.post(url(fake), json=HELLO, timeout=aiohttp.ClientTimeout(total=0.1))
    async with asyncio.timeout(NEVER_HANG):
        await fake.client_disconnected.wait()
