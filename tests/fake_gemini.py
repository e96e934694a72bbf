"""An in-process fake of Google's Gemini API (Generative Language ``v1beta``) for gateway tests.

    fake = FakeGemini(api_key="AIza-test")      # optional: then `x-goog-api-key` must match
    server = await fake.start(aiohttp_server)   # or: await aiohttp_server(fake.make_app())
    provider = GeminiConfig(..., base_url=fake.base_url)  # the server root ("http://127.0.0.1:N")

``POST /v1beta/models/{model}:generateContent`` answers like Gemini: one candidate (or
``candidateCount``) with the text "echo: <last user text>"; a ``functionCall`` part (no ``id``,
``args`` sampled from the schema, a ``thoughtSignature`` on ``gemini-3*`` models) when functions are
declared and the mode is ANY, or AUTO and the last user turn has no ``functionResponse``; "tool
said: <json of the response values>" after function responses; JSON sampled from
``responseSchema``/``responseJsonSchema`` (else ``{"reply": <last user text>}``) for
``responseMimeType: application/json``; a thought part for ``thinkingConfig.includeThoughts``; a PNG
``inlineData`` part when ``responseModalities`` has IMAGE; ``stopSequences``/``maxOutputTokens`` cut
the text. ``:streamGenerateContent?alt=sse`` streams the same answer as ``data: <JSON>`` events
ended by CRLF CRLF: text word by word, calls whole, finishReason and the usage totals on the last
event, no [DONE] (``done_after`` adds one, as some proxies do). Without ``alt=sse`` it answers
400 (Google would stream a JSON array). ``:batchEmbedContents`` embeds text as Google does (see
``tests.fake_endpoints``).

Every request is checked the way Google checks it (``validate`` can be called directly): unknown
field names at any depth (camelCase or proto snake_case), scalar and enum types (enums
case-insensitive), Schema keywords, oneof parts, base64, function call/response pairing, Gemini 3
thought signatures on the current turn (valid: those this fake issued, kept in ``fake.signatures``,
and ``skip_thought_signature_validator``), generationConfig ranges, tools together with JSON output
(only Gemini 3 allows it). A bad request gets Google's 400 ``{"error": {"code": 400, "message":
..., "status": "INVALID_ARGUMENT"}}`` with Google's wording (parse errors add a BadRequest detail),
so a translation bug fails the test that caused it. Scripting (every knob is on ``Script``):

    fake.script(status=429, retry_delay="7s")  # the next generate request only (FIFO queue)
    fake.script(status=503, times=2)            # the next two
    fake.always(chunk_delay=0.05)               # every request without a queued script

Requests are recorded in ``fake.requests`` (``fake.generate_requests``: the generate calls only);
``request_seen`` and ``client_disconnected`` work as in ``tests.fakes.FakeOpenAI``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import random
import re
import string
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_endpoints import Refused, gemini_embeddings
from tests.fakes import RECORDED, Recorded, ScriptedFake

Json = dict[str, Any]
V1 = "type.googleapis.com/google.ai.generativelanguage.v1beta."
STRUCT = "type.googleapis.com/google.protobuf.Struct"
DUMMY_SIGNATURE = "skip_thought_signature_validator"
STATUS_TEXT = """
400: INVALID_ARGUMENT Request contains an invalid argument.
401: UNAUTHENTICATED Request had invalid authentication credentials.
403: PERMISSION_DENIED The caller does not have permission
404: NOT_FOUND models/{model} is not found for API version v1beta, or is not supported for
  generateContent. Call ListModels to see the list of available models and their supported methods.
429: RESOURCE_EXHAUSTED You exceeded your current quota, please check your plan and billing details.
  For more information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.
500: INTERNAL An internal error has occurred. Please retry or report in
  https://developers.generativeai.google/guide/troubleshooting
503: UNAVAILABLE The model is overloaded. Please try again later.
504: DEADLINE_EXCEEDED Deadline expired before operation could complete.
"""


def _table(text: str) -> dict[str, list[str]]:
    """Parse ``name: word word ...`` lines (indented lines continue the one above)."""
    return {k: v.split() for k, v in re.findall(r"^(\S+): (.*(?:\n  .*)*)", text, re.MULTILINE)}


# Scripted error statuses: code -> (status, message) as Google sends them.
STATUSES = {int(code): (w[0], " ".join(w[1:])) for code, w in _table(STATUS_TEXT).items()}
OVERLOADED = STATUSES[503][1]
MESSAGES_TEXT = """
call_turn: Please ensure that function call turn comes immediately after a user turn or after a
  function response turn.
response_turn: Please ensure that function response turn comes immediately after a function call
  turn.
pairs: Please ensure that the number of function response parts is equal to the number of function
  call parts of the function call turn.
signature: Function call is missing a thought_signature in functionCall parts. This is required for
  tools to work correctly, and missing thought_signature may lead to degraded model performance.
  Additional data, function call `default_api:{name}` , position {position}. Please refer to
  https://ai.google.dev/gemini-api/docs/thought-signatures for more details.
function_name: Invalid function name. Must start with a letter or an underscore. Must be a-z, A-Z,
  0-9, or contain underscores (_), dots (.), colons (:), or dashes (-), with a maximum length of 64.
mimes: allowed mimetypes are `text/plain`, `application/json`, `application/xml`,
  `application/yaml` and `text/x.enum`.
schema_mime: response_mime_type must be one of ['application/json', 'text/x.enum'] when
  response_schema is set.
json_schema_mime: response_mime_type must be 'application/json' when response_json_schema is set.
both_schemas: response_schema and response_json_schema are mutually exclusive.
thinking: You can only set only one of thinking budget and thinking level.
"""
MESSAGES = {name: " ".join(words) for name, words in _table(MESSAGES_TEXT).items()}
RPC = "type.googleapis.com/google.rpc."
RATE_LIMITS = "https://ai.google.dev/gemini-api/docs/rate-limits"
KEY_MESSAGE = "API key not valid. Please pass a valid API key."
KEY_DETAILS: list[Json] = [
    {
        "@type": RPC + "ErrorInfo",
        "reason": "API_KEY_INVALID",
        "domain": "googleapis.com",
        "metadata": {"service": "generativelanguage.googleapis.com"},
    },
    {"@type": RPC + "LocalizedMessage", "locale": "en-US", "message": KEY_MESSAGE},
]


def google_error(
    status: int,
    message: str | None = None,
    *,
    model: str = "gemini",
    details: list[Json] | None = None,
) -> Json:
    """Google's error body ``{"error": {code, message, status[, details]}}`` for ``status``."""
    name, default = STATUSES.get(status, STATUSES[500])
    error = {"code": status, "message": message or default.format(model=model), "status": name}
    return {"error": error | ({"details": details} if details else {})}


def quota_details(model: str, retry_delay: str | None) -> list[Json]:
    """The ``details`` of Google's 429: QuotaFailure, Help and (given a delay) RetryInfo."""
    quota: Json = {
        "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests"
    }
    quota["quotaId"] = "GenerateRequestsPerMinutePerProjectPerModel-FreeTier"
    quota |= {"quotaDimensions": {"location": "global", "model": model}, "quotaValue": "10"}
    link = {"description": "Learn more about Gemini API quotas", "url": RATE_LIMITS}
    details: list[Json] = [{"@type": RPC + "QuotaFailure", "violations": [quota]}]
    details.append({"@type": RPC + "Help", "links": [link]})
    retry = [{"@type": RPC + "RetryInfo", "retryDelay": retry_delay}] if retry_delay else []
    return details + retry


@dataclass(kw_only=True)
class Script:
    """How the fake answers one generate request. Every knob defaults to "behave like Gemini"."""

    status: int = 200  # non-2xx: answer with ``error`` (default: google_error(status))
    error: Json | None = None
    headers: dict[str, str] = field(default_factory=dict)  # extra response headers
    delay_headers: float = 0.0  # seconds before anything is sent
    chunk_delay: float = 0.0  # seconds between stream events
    hold: asyncio.Event | None = None  # answer only once the test sets it (never: a hung upstream)
    hold_after: int | None = None  # stream: send N events first, then wait for ``hold``
    drop_before_response: bool = False  # close the connection without any response
    drop_after: int | None = None  # stream: abort the connection after N events
    error_after: int | None = None  # stream: after N events send `data: {"error": ...}` and end
    stream_error: Json = field(default_factory=lambda: google_error(503))
    # stream: an OpenAI-style `data: [DONE]` after N events, as some proxies add (Gemini never
    # sends it), then `after_done` (raw bytes); the remaining events follow
    done_after: int | None = None
    after_done: bytes = b""
    content: str | None = None  # reply text (default "echo: <last user text>"); split on spaces
    tool_call: bool | None = None  # None: call iff functions are declared and the mode asks
    arguments: Json | None = None  # functionCall.args (default: sampled from the schema)
    parallel: bool = False  # call the first two declared (or allowed) functions
    finish_reason: str | None = None  # default "STOP" ("MAX_TOKENS" when maxOutputTokens cut)
    blocked: bool = False  # no candidates; promptFeedback.blockReason "SAFETY"
    thoughts: str | None = None  # a leading thought part (default: iff includeThoughts)
    image: bool | None = None  # an image part (None: iff responseModalities has IMAGE)
    prompt_tokens: int | None = None  # usageMetadata overrides (default: counted words)
    candidates_tokens: int | None = None
    thoughts_tokens: int | None = None
    cached_tokens: int | None = None
    retry_delay: str | None = None  # 429: add RetryInfo{retryDelay}, e.g. "7s"


# -- the request, as Google's JSON parser reads it ----------------------------------------------

# "Message: field:kind ..." (indented lines continue); a kind is a scalar (string bool float int
# bytes struct any), an enum or message named here, map<Message>, or [kind] for a repeated field.
PROTO = """
GenerateContentRequest: contents:[Content] systemInstruction:Content tools:[Tool]
  toolConfig:ToolConfig safetySettings:[SafetySetting] generationConfig:GenerationConfig
  cachedContent:string
Content: role:string parts:[Part]
Part: text:string inlineData:Blob fileData:FileData functionCall:FunctionCall
  functionResponse:FunctionResponse thought:bool thoughtSignature:bytes
  executableCode:ExecutableCode codeExecutionResult:CodeExecutionResult videoMetadata:struct
Blob: mimeType:string data:bytes
FileData: mimeType:string fileUri:string
FunctionCall: id:string name:string args:struct
FunctionResponse: id:string name:string response:struct
ExecutableCode: language:ExecutableCode.Language code:string
CodeExecutionResult: outcome:CodeExecutionResult.Outcome output:string
Tool: functionDeclarations:[FunctionDeclaration] googleSearch:struct codeExecution:struct
  urlContext:struct
FunctionDeclaration: name:string description:string parameters:Schema
  parametersJsonSchema:struct response:Schema responseJsonSchema:struct
Schema: type:Type format:string title:string description:string nullable:bool enum:[string]
  items:Schema properties:map<Schema> required:[string] minItems:int maxItems:int
  minLength:int maxLength:int pattern:string minimum:float maximum:float minProperties:int
  maxProperties:int anyOf:[Schema] propertyOrdering:[string] default:any example:any
ToolConfig: functionCallingConfig:FunctionCallingConfig retrievalConfig:struct
FunctionCallingConfig: mode:FunctionCallingConfig.Mode allowedFunctionNames:[string]
SafetySetting: category:HarmCategory threshold:SafetySetting.HarmBlockThreshold
GenerationConfig: temperature:float topP:float topK:int candidateCount:int
  maxOutputTokens:int stopSequences:[string] seed:int presencePenalty:float
  frequencyPenalty:float responseMimeType:string responseSchema:Schema
  responseJsonSchema:struct responseLogprobs:bool logprobs:int
  responseModalities:[GenerationConfig.Modality] speechConfig:struct imageConfig:struct
  mediaResolution:MediaResolution thinkingConfig:ThinkingConfig
ThinkingConfig: includeThoughts:bool thinkingBudget:int thinkingLevel:ThinkingConfig.ThinkingLevel
"""
ENUMS_TEXT = """
Type: TYPE_UNSPECIFIED STRING NUMBER INTEGER BOOLEAN ARRAY OBJECT NULL
FunctionCallingConfig.Mode: MODE_UNSPECIFIED AUTO ANY NONE VALIDATED
HarmCategory: HARM_CATEGORY_UNSPECIFIED HARM_CATEGORY_DEROGATORY HARM_CATEGORY_TOXICITY
  HARM_CATEGORY_VIOLENCE HARM_CATEGORY_SEXUAL HARM_CATEGORY_MEDICAL HARM_CATEGORY_DANGEROUS
  HARM_CATEGORY_HARASSMENT HARM_CATEGORY_HATE_SPEECH HARM_CATEGORY_SEXUALLY_EXPLICIT
  HARM_CATEGORY_DANGEROUS_CONTENT HARM_CATEGORY_CIVIC_INTEGRITY
SafetySetting.HarmBlockThreshold: HARM_BLOCK_THRESHOLD_UNSPECIFIED BLOCK_LOW_AND_ABOVE
  BLOCK_MEDIUM_AND_ABOVE BLOCK_ONLY_HIGH BLOCK_NONE OFF
GenerationConfig.Modality: MODALITY_UNSPECIFIED TEXT IMAGE AUDIO
MediaResolution: MEDIA_RESOLUTION_UNSPECIFIED MEDIA_RESOLUTION_LOW MEDIA_RESOLUTION_MEDIUM
  MEDIA_RESOLUTION_HIGH
ThinkingConfig.ThinkingLevel: THINKING_LEVEL_UNSPECIFIED MINIMAL LOW MEDIUM HIGH
ExecutableCode.Language: LANGUAGE_UNSPECIFIED PYTHON
CodeExecutionResult.Outcome: OUTCOME_UNSPECIFIED OUTCOME_OK OUTCOME_FAILED
  OUTCOME_DEADLINE_EXCEEDED
"""


FIELDS = {name: dict(w.split(":", 1) for w in words) for name, words in _table(PROTO).items()}
ENUMS = {name: frozenset(values) for name, values in _table(ENUMS_TEXT).items()}
SCALARS = {k: f"TYPE_{k.upper()}" for k in ("string", "bool", "float", "bytes")} | {
    "int": "TYPE_INT32"
}
METADATA = ("thought", "thoughtSignature", "videoMetadata")  # Part fields outside the `data` oneof
DATA_FIELDS = [f for f in FIELDS["Part"] if f not in METADATA]
FUNCTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:-]{0,63}")
REQUIRED = (("inlineData", "mimeType"), ("inlineData", "data"), ("fileData", "fileUri"))
RANGES = {"temperature": (0, 2), "topP": (0, 1), "candidateCount": (1, 8)}
MIMES = ("text/plain", "application/json", "application/xml", "application/yaml", "text/x.enum")


class Invalid(Exception):
    """A request Google answers with 400 INVALID_ARGUMENT; the message is Google's. JSON parse
    errors carry the ``field`` Google names in its ``google.rpc.BadRequest`` detail."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field

    def body(self) -> Json:
        violation = ({"field": self.field} if self.field else {}) | {"description": str(self)}
        bad_request = {"@type": RPC + "BadRequest", "fieldViolations": [violation]}
        return google_error(400, str(self), details=None if self.field is None else [bad_request])


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", name).lower()


def _camel(name: str) -> str:
    return re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), name)


def _unknown(name: str, path: str, why: str) -> Invalid:
    at = f" at '{path}'" if path else ""
    return Invalid(f'Invalid JSON payload received. Unknown name "{name}"{at}: {why}', path)


def _invalid_value(path: str, kind: str, value: Any, prefix: str = "") -> Invalid:
    struct = kind in ("struct", "any") or kind.startswith("map<")
    name = SCALARS.get(kind) or (STRUCT if struct else V1 + kind)
    return Invalid(f"Invalid value at '{path}' ({name}), {prefix}{json.dumps(value)[:80]}", path)


def parse(obj: Any, kind: str, path: str = "", parent: str = "", key: str = "") -> Any:
    """Read the field ``key`` of kind ``kind`` like Google's JSON parser: return it normalised
    (camelCase names, upper-case enums, numbers as numbers) or raise ``Invalid``."""
    if kind.startswith("["):
        if not isinstance(obj, list):
            raise _invalid_value(path, kind[1:-1], obj)
        return [_value(item, kind[1:-1], f"{path}[{i}]") for i, item in enumerate(obj)]
    if isinstance(obj, list) and kind != "any":
        raise _unknown(key, parent, "Proto field is not repeating, cannot start list.")
    if isinstance(obj, dict) and kind in (*SCALARS, *ENUMS):
        raise _unknown(key, parent, "Starting an object on a scalar field.")
    return _value(obj, kind, path)


def _value(obj: Any, kind: str, path: str) -> Any:
    if kind == "any":
        return obj
    if kind in FIELDS or kind == "struct" or kind.startswith("map<"):
        if not isinstance(obj, dict):
            raise _invalid_value(path, kind, obj)
        if kind.startswith("map<"):
            return {
                k: _value(v, kind[4:-1], f"{path}[{i}].value")
                for i, (k, v) in enumerate(obj.items())
            }
        if kind == "struct":
            return obj
        out: Json = {}
        for name, value in obj.items():
            sub = _camel(name)
            if sub not in FIELDS[kind]:
                raise _unknown(name, path, "Cannot find field.")
            if value is not None or FIELDS[kind][sub] == "any":  # JSON null = not set
                where = f"{path}.{_snake(sub)}" if path else _snake(sub)
                out[sub] = parse(value, FIELDS[kind][sub], where, path, name)
        return out
    value = _scalar(obj, kind)
    if value is None:
        raise _invalid_value(path, kind, obj, "Base64 decoding failed for " * (kind == "bytes"))
    return value


def _scalar(obj: Any, kind: str) -> Any:
    """``obj`` as the scalar or enum ``kind`` (None if it is not one)."""
    if kind in ENUMS:
        return obj.upper() if isinstance(obj, str) and obj.upper() in ENUMS[kind] else None
    if kind in ("string", "bool"):
        return obj if isinstance(obj, str if kind == "string" else bool) else None
    if kind == "bytes":
        try:
            text = obj.replace("-", "+").replace("_", "/")
            base64.b64decode(text + "=" * (-len(text) % 4), validate=True)
        except (AttributeError, binascii.Error, ValueError):
            return None
        return obj
    try:
        number = float(obj) if isinstance(obj, str) else obj
    except ValueError:
        return None
    if isinstance(number, bool) or not isinstance(number, int | float):
        return None
    if kind == "int":
        return int(number) if float(number).is_integer() else None
    return number


def _problems(req: Json) -> list[str]:
    """Google's semantic checks: a ``<path>: <problem>`` line for each problem found."""
    out: list[str] = []
    if not req.get("contents"):
        out.append("contents: contents is not specified")
    for i, content in enumerate(req.get("contents") or []):
        _check_content(content, f"contents[{i}]", out)
    if "systemInstruction" in req:
        _check_content(req["systemInstruction"], "system_instruction", out)
        for j, part in enumerate(req["systemInstruction"].get("parts") or []):
            if any(k in part for k in DATA_FIELDS[1:]):
                out.append(f"system_instruction.parts[{j}]: only text parts are supported.")
    for i, tool in enumerate(req.get("tools") or []):
        for j, decl in enumerate(tool.get("functionDeclarations") or []):
            path = f"tools[{i}].function_declarations[{j}]"
            if not FUNCTION_NAME.fullmatch(decl.get("name", "")):
                out.append(f"{path}.name: {MESSAGES['function_name']}")
            if "parameters" in decl and "parametersJsonSchema" in decl:
                out.append(f"{path}: parameters and parameters_json_schema are mutually exclusive.")
            for key in ("parameters", "response"):
                if key in decl:
                    _check_schema(decl[key], f"{path}.{key}", out)
    calling = (req.get("toolConfig") or {}).get("functionCallingConfig") or {}
    path = "tool_config.function_calling_config.allowed_function_names"
    if calling.get("allowedFunctionNames") and calling.get("mode") != "ANY":
        out.append(f"{path}: allowed_function_names may only be set when mode is ANY.")
    declared = [d.get("name") for d in _declarations(req)]
    for i, name in enumerate(calling.get("allowedFunctionNames") or []):
        if name not in declared:
            out.append(f"{path}[{i}]: function `{name}` is not declared in tools.")
    _check_generation(req.get("generationConfig") or {}, out)
    return out


def _check_content(content: Json, path: str, out: list[str]) -> None:
    if not content.get("parts"):
        out.append(f"{path}.parts: contents.parts must not be empty.")
    for j, part in enumerate(content.get("parts") or []):
        where = f"{path}.parts[{j}]"
        data = [k for k in DATA_FIELDS if k in part and part[k] != ""]  # "" is proto3's unset
        if len(data) > 1:
            raise Invalid(
                "Invalid JSON payload received. Oneof field 'data' is already set. "
                f"Cannot set '{data[1]}'"
            )
        if not data:
            out.append(f"{where}.data: required oneof field 'data' must have one initialized field")
        for key, sub in REQUIRED:
            if key in part and not part[key].get(sub):
                out.append(f"{where}.{_snake(key)}.{_snake(sub)}: {_snake(sub)} must be specified.")
        for key in ("functionCall", "functionResponse"):
            if key in part and not part[key].get("name"):
                out.append(f"{where}.{_snake(key)}.name: Name cannot be empty.")


def _check_schema(schema: Json, path: str, out: list[str]) -> None:
    if schema.get("type") == "ARRAY" and not schema.get("items"):
        out.append(f"{path}.items: missing field.")
    properties = schema.get("properties") or {}
    for i, name in enumerate(schema.get("required") or []):
        if name not in properties:
            out.append(f"{path}.required[{i}]: property is not defined")
    subs = [(f"properties[{name}]", sub) for name, sub in properties.items()]
    subs += [(f"any_of[{i}]", sub) for i, sub in enumerate(schema.get("anyOf") or [])]
    for name, sub in [*subs, *([("items", schema["items"])] if schema.get("items") else [])]:
        _check_schema(sub, f"{path}.{name}", out)


def _check_generation(config: Json, out: list[str]) -> None:
    path = "generation_config"
    for key, (low, high) in RANGES.items():
        if config.get(key) is not None and not low <= config[key] <= high:
            out.append(f"{path}.{_snake(key)}: must be in the range [{low}, {high}].")
    if config.get("maxOutputTokens") is not None and config["maxOutputTokens"] < 1:
        out.append(f"{path}.max_output_tokens: max_output_tokens must be positive.")
    if len(config.get("stopSequences") or []) > 5:
        out.append(f"{path}.stop_sequences: the number of stop_sequences must not exceed 5.")
    mime = config.get("responseMimeType")
    if mime is not None and mime not in MIMES:
        out.append(f"{path}.response_mime_type: {MESSAGES['mimes']}")
    if "responseSchema" in config and "responseJsonSchema" in config:
        out.append(f"{path}.response_json_schema: {MESSAGES['both_schemas']}")
    if "responseSchema" in config:
        _check_schema(config["responseSchema"], f"{path}.response_schema", out)
    if "responseSchema" in config and mime not in ("application/json", "text/x.enum"):
        out.append(f"{path}.response_mime_type: {MESSAGES['schema_mime']}")
    if "responseJsonSchema" in config and mime != "application/json":
        out.append(f"{path}.response_mime_type: {MESSAGES['json_schema_mime']}")
    if {"thinkingBudget", "thinkingLevel"} <= set(config.get("thinkingConfig") or {}):
        out.append(f"{path}.thinking_config: {MESSAGES['thinking']}")


def _role(content: Json) -> str:
    return str(content.get("role") or "user")


def _check_turns(req: Json, model: str, signatures: Collection[str]) -> None:
    """The conversation rules: roles, function call/response pairing, Gemini 3 signatures."""
    contents: list[Json] = req["contents"]
    if any(_role(c) not in ("user", "model") for c in contents):
        raise Invalid("Please use a valid role: user, model.")
    calls = [[p["functionCall"] for p in c["parts"] if "functionCall" in p] for c in contents]
    answers = [
        [p["functionResponse"] for p in c["parts"] if "functionResponse" in p] for c in contents
    ]
    for i in range(len(contents)):
        if calls[i] and (i == 0 or _role(contents[i - 1]) != "user"):
            raise Invalid(MESSAGES["call_turn"])
        if answers[i] and (i == 0 or not calls[i - 1]):
            raise Invalid(MESSAGES["response_turn"])
        following = answers[i + 1] if i + 1 < len(contents) else None
        names = sorted(c["name"] for c in calls[i])
        if calls[i] and following is not None and names != sorted(a["name"] for a in following):
            raise Invalid(MESSAGES["pairs"])
    if not model.startswith("gemini-3"):
        return
    known = {None, DUMMY_SIGNATURE, *signatures}
    if any(p.get("thoughtSignature") not in known for c in contents for p in c["parts"]):
        raise Invalid("Corrupted thought signature.")
    # Only the current turn (since the last user turn that is not function responses) counts.
    starts = [i for i, c in enumerate(contents) if _role(c) == "user" and not answers[i]]
    for i in range(starts[-1] + 1 if starts else 0, len(contents)):
        first = next((p for p in contents[i]["parts"] if "functionCall" in p), None)
        if first is not None and not first.get("thoughtSignature"):
            name = first["functionCall"]["name"]
            raise Invalid(MESSAGES["signature"].format(name=name, position=i + 1))


def _declarations(req: Json) -> list[Json]:
    return [d for t in req.get("tools") or [] for d in t.get("functionDeclarations") or []]


def validate(body: Any, model: str, signatures: Collection[str] = ()) -> Json:
    """The normalised request, or ``Invalid`` with Google's message for what is wrong with it."""
    if isinstance(body, str):  # the recorder keeps a body that is not JSON as text
        raise Invalid("Invalid JSON payload received. Unexpected token.")
    if not isinstance(body, dict | None):
        raise _unknown("", "", "Root element must be a message.")
    req: Json = parse(body or {}, "GenerateContentRequest")
    if problems := _problems(req):
        raise Invalid("".join(f"* GenerateContentRequest.{p}\n" for p in problems))
    mime = (req.get("generationConfig") or {}).get("responseMimeType")
    if _declarations(req) and mime == "application/json" and not model.startswith("gemini-3"):
        raise Invalid("Tool use with a response mime type: 'application/json' is unsupported")
    _check_turns(req, model, signatures)
    return req


# -- answers -------------------------------------------------------------------------------------


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGOQKn4BAAIgAXZmNuK1AAAAAElFTkSuQmCC"
SAFETY_RATINGS = [
    {"category": f"HARM_CATEGORY_{c}", "probability": "NEGLIGIBLE"}
    for c in ("HATE_SPEECH", "DANGEROUS_CONTENT", "HARASSMENT", "SEXUALLY_EXPLICIT")
]
BLOCKED = {
    "blockReason": "SAFETY",
    "safetyRatings": [
        {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True}
    ],
}
SAMPLES: dict[str, Any] = {"string": "Paris", "integer": 1, "number": 1.5, "boolean": True}


def sample(schema: Any, root: Json | None = None) -> Any:
    """A plausible value for a Gemini Schema or a JSON Schema (what the model would fill in)."""
    if not isinstance(schema, dict):
        return None
    root = schema if root is None else root
    if isinstance(ref := schema.get("$ref"), str):
        target: Any = root
        for step in ref.removeprefix("#/").split("/"):
            target = target.get(step) if isinstance(target, dict) else None
        return sample(target, root)
    if "const" in schema or schema.get("enum"):
        return schema["const"] if "const" in schema else schema["enum"][0]
    options = [s for s in schema.get("anyOf") or schema.get("oneOf") or [] if isinstance(s, dict)]
    if options := [s for s in options if str(s.get("type")).lower() != "null"]:
        return sample(options[0], root)
    kind = schema.get("type")
    kind = str(next((k for k in kind if k != "null"), "") if isinstance(kind, list) else kind)
    if kind.lower() == "object" or "properties" in schema:
        props = schema.get("properties") or {}
        order = dict.fromkeys([*(schema.get("propertyOrdering") or []), *props])
        wanted = schema.get("required", list(props))
        return {k: sample(props[k], root) for k in order if k in props and k in wanted}
    if kind.lower() == "array":
        return [sample(schema["items"], root)] if isinstance(schema.get("items"), dict) else []
    return SAMPLES.get(kind.lower())


def _texts(content: Json) -> list[str]:
    return [p["text"] for p in content["parts"] if "text" in p and not p.get("thought")]


def _words(text: str | None) -> int:
    return len((text or "").split())


@dataclass
class Answer:
    """What the model says: the parts of each candidate, the finishReason and usageMetadata."""

    parts: list[Json]
    finish: str
    usage: Json
    candidates: int = 1
    blocked: bool = False


def _answer(req: Json, model: str, plan: Script, signatures: set[str]) -> Answer:
    """The answer to the (valid) request ``req``; thought signatures issued go to ``signatures``."""
    contents: list[Json] = req["contents"]
    users = [c for c in contents if _role(c) == "user"] or [{"parts": []}]
    answers = [p["functionResponse"] for p in users[-1]["parts"] if "functionResponse" in p]
    user_text = next((" ".join(_texts(c)) for c in reversed(users) if _texts(c)), "")
    config: Json = req.get("generationConfig") or {}
    calling = (req.get("toolConfig") or {}).get("functionCallingConfig") or {}
    mode, allowed = calling.get("mode", "AUTO"), calling.get("allowedFunctionNames") or []
    declared = [d for d in _declarations(req) if not allowed or d.get("name") in allowed]
    parts: list[Json] = []
    thought = plan.thoughts
    if thought is None and (config.get("thinkingConfig") or {}).get("includeThoughts"):
        thought = "Thinking it over."
    if thought is not None:
        parts.append({"text": thought, "thought": True})
    calls: list[Json] = []
    wanted = mode == "ANY" or (mode in ("AUTO", "VALIDATED") and not answers)
    if plan.tool_call or (plan.tool_call is None and declared and wanted):
        for decl in (declared or [{"name": "tool"}])[: 2 if plan.parallel else 1]:
            schema = decl.get("parameters") or decl.get("parametersJsonSchema")
            args = plan.arguments if plan.arguments is not None else sample(schema) or {}
            calls.append({"functionCall": {"name": decl["name"], "args": args}})
        if model.startswith("gemini-3"):  # the real API signs the first call of the turn
            calls[0]["thoughtSignature"] = base64.b64encode(random.randbytes(48)).decode()
            signatures.add(calls[0]["thoughtSignature"])
    finish, text, mime = "STOP", plan.content, config.get("responseMimeType")
    schema = config.get("responseJsonSchema") or config.get("responseSchema")
    if text is None and not calls:
        values = [v for a in answers for v in (a.get("response") or {}).values()]
        if answers:
            text = "tool said: " + json.dumps(values[0] if len(values) == 1 else values)
        elif mime == "application/json":
            text = json.dumps(sample(schema) if schema else {"reply": user_text})
        else:
            text = str(sample(schema)) if mime == "text/x.enum" else f"echo: {user_text}"
    if text is not None:
        for stop in config.get("stopSequences") or []:
            text = text.split(stop)[0] if stop else text
        limit = config.get("maxOutputTokens")
        if limit is not None and _words(text) > limit:
            text, finish = " ".join(text.split()[:limit]), "MAX_TOKENS"
        parts.append({"text": text})
    image = "IMAGE" in config.get("responseModalities", []) if plan.image is None else plan.image
    if image:
        parts.append({"inlineData": {"mimeType": "image/png", "data": PNG}})
    parts += calls
    system = req.get("systemInstruction") or {"parts": []}
    prompt = sum(_words(t) + 3 for c in [system, *contents] for t in _texts(c)) + 1
    prompt = prompt if plan.prompt_tokens is None else plan.prompt_tokens
    count = config.get("candidateCount", 1)
    made = count * (_words(text) + 6 * len(calls) + 1290 * image)
    made = made if plan.candidates_tokens is None else plan.candidates_tokens
    thinking = _words(thought) * count if plan.thoughts_tokens is None else plan.thoughts_tokens
    usage: Json = {"promptTokenCount": prompt}
    if not plan.blocked:
        usage |= {"candidatesTokenCount": made, "totalTokenCount": prompt + made + thinking}
    usage.setdefault("totalTokenCount", prompt)
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    usage |= {"thoughtsTokenCount": thinking} if thinking and not plan.blocked else {}
    if plan.cached_tokens:
        usage["cachedContentTokenCount"] = plan.cached_tokens
        usage["cacheTokensDetails"] = [{"modality": "TEXT", "tokenCount": plan.cached_tokens}]
    return Answer(parts, plan.finish_reason or finish, usage, count, plan.blocked)


def _response(model: str, answer: Answer, response_id: str, parts: list[Json], last: bool) -> Json:
    """A GenerateContentResponse with ``parts`` in every candidate (``last``: with totals)."""
    tail = {"modelVersion": model, "responseId": response_id}
    if answer.blocked:
        return {"promptFeedback": BLOCKED, "usageMetadata": answer.usage} | tail
    end = {"finishReason": answer.finish} if last else {}
    safety = {"safetyRatings": SAFETY_RATINGS} if last else {}
    candidates = [
        {"content": {"parts": parts, "role": "model"}} | end | {"index": i} | safety
        for i in range(answer.candidates)
    ]
    usage = answer.usage
    if not last:  # early stream events only know the prompt
        known = ("promptTokenCount", "promptTokensDetails")
        usage = {k: usage[k] for k in known} | {"totalTokenCount": usage["promptTokenCount"]}
    return {"candidates": candidates, "usageMetadata": usage} | tail


def _chunks(model: str, answer: Answer) -> list[Json]:
    """The events Gemini streams for ``answer``: text word by word, other parts whole."""
    pieces: list[list[Json]] = []
    for part in answer.parts:
        if "text" in part and not part.get("thought"):
            words = part["text"].split(" ")
            pieces += [[{"text": w if i == 0 else " " + w}] for i, w in enumerate(words)]
        elif "functionCall" in part and pieces and "functionCall" in pieces[-1][0]:
            pieces[-1].append(part)  # parallel calls arrive together
        else:
            pieces.append([part])
    response_id = _response_id()
    if answer.blocked or not pieces:
        return [_response(model, answer, response_id, [], True)]
    last = len(pieces) - 1
    return [_response(model, answer, response_id, p, i == last) for i, p in enumerate(pieces)]


class FakeGemini(ScriptedFake[Script]):
    """A scriptable fake of the Gemini API. See the module docstring."""

    script_type = Script

    def __init__(self, *, api_key: str | None = None) -> None:
        # api_key: when set, requests must carry `x-goog-api-key: <api_key>`
        super().__init__(api_key=api_key)
        self.signatures: set[str] = set()  # thought signatures issued; replaying them is valid

    @property
    def embed_requests(self) -> list[Recorded]:
        return [r for r in self.requests if r.path.endswith(":batchEmbedContents")]

    @property
    def generate_requests(self) -> list[Recorded]:
        actions = (":generateContent", ":streamGenerateContent")
        return [r for r in self.requests if r.path.endswith(actions)]

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=64 * 1024**2)
        app.router.add_post("/v1beta/models/{model_action}", self._generate)
        return app

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        headers = self.record(request, await request.read()).headers
        if self.api_key is not None and headers.get("x-goog-api-key") != self.api_key:
            return web.json_response(
                google_error(400, KEY_MESSAGE, details=KEY_DETAILS), status=400
            )
        response: web.StreamResponse = await handler(request)
        return response

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["model_action"].rpartition(":")
        if action == "batchEmbedContents" and model:
            return await self._embed(request, model)
        if action not in ("generateContent", "streamGenerateContent") or not model:
            return web.json_response(google_error(404, "Method not found."), status=404)
        plan = self.next_plan()
        try:
            await self.pause(plan)
            if plan.drop_before_response:
                return self._drop(request, web.Response())
            stream = action == "streamGenerateContent"
            try:
                if stream and request.query.get("alt") != "sse":
                    raise Invalid(
                        "This fake streams only with ?alt=sse (else Google sends an array)."
                    )
                req = validate(request[RECORDED].json, model, self.signatures)
            except Invalid as invalid:
                return web.json_response(invalid.body(), status=400)
            if plan.status >= 400:
                details = quota_details(model, plan.retry_delay) if plan.status == 429 else None
                error = plan.error or google_error(plan.status, model=model, details=details)
                return web.json_response(error, status=plan.status, headers=self._headers(plan))
            answer = _answer(req, model, plan, self.signatures)
            if stream:
                return await self._stream(request, plan, _chunks(model, answer))
            body = _response(model, answer, _response_id(), answer.parts, True)
            return web.json_response(body, headers=self._headers(plan))
        except asyncio.CancelledError:
            self.client_disconnected.set()
            raise

    async def _embed(self, request: web.Request, model: str) -> web.Response:
        """``:batchEmbedContents`` (see ``tests.fake_endpoints``); scripts apply as for chat."""
        plan = self.next_plan()
        await self.pause(plan)
        if plan.status >= 400:
            details = quota_details(model, plan.retry_delay) if plan.status == 429 else None
            error = plan.error or google_error(plan.status, model=model, details=details)
            return web.json_response(error, status=plan.status, headers=self._headers(plan))
        try:
            answer = gemini_embeddings(request[RECORDED].json, model)
        except Refused as exc:
            return web.json_response(google_error(400, str(exc)), status=400)
        return web.json_response(answer, headers=self._headers(plan))

    def _headers(self, plan: Script) -> dict[str, str]:
        timing = f"gfet4t7; dur={random.randint(200, 900)}"
        return {"x-content-type-options": "nosniff", "server-timing": timing} | plan.headers

    async def _stream(
        self, request: web.Request, plan: Script, chunks: list[Json]
    ) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream"} | self._headers(plan)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
        frames = [_sse(chunk) for chunk in chunks]
        if plan.done_after is not None:
            frames.insert(plan.done_after, b"data: [DONE]\r\n\r\n" + plan.after_done)
        return await self.play(request, response, frames, plan, lambda _: _sse(plan.stream_error))


def _response_id() -> str:
    return "".join(random.choices(string.ascii_letters + string.digits, k=22))


def _sse(obj: Json) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\r\n\r\n"


__all__ = ["FakeGemini", "Invalid", "Recorded", "Script", "google_error", "sample", "validate"]
