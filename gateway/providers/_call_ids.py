"""Tool-call ids within the limits of OpenAI-compatible upstreams, whoever minted them.

OpenAI refuses a chat tool-call id longer than 40 characters (a Responses `call_id` longer
than 64), yet ids minted elsewhere can be longer: the gateway's Gemini ids carry the call's
thought signature (`call_<hex>__thought__<signature>`, 80+ characters), and other gateways and
frameworks mint long ids of their own. Such an id is replaced, everywhere in the request (the
assistant's call and the tool result that answers it), by `call_` and 24 hex digits of its
SHA-256: the same id always becomes the same short one, so calls and results still match,
with no state kept. The client keeps the long id, so a signature still reaches Gemini when the
conversation goes back there; a Gemini target that gets no signature uses Google's documented
placeholder (`gemini.request`).
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from gateway.schemas.chat import AssistantMessage, ChatCompletionRequest, ToolMessage
from gateway.schemas.codec import encode

__all__ = ["CHAT_ID_LIMIT", "RESPONSES_ID_LIMIT", "short_ids", "short_input_ids", "shorten"]

CHAT_ID_LIMIT = 40  # OpenAI: messages[i].tool_calls[j].id
RESPONSES_ID_LIMIT = 64  # OpenAI: input[i].call_id

_RAW_LIST = msgspec.json.Decoder(list[dict[str, msgspec.Raw]])
_RAW_STR = msgspec.json.Decoder(str)
# Searched in the raw bytes in place (`re` reads any buffer; `bytes()` would copy them).
_CALL_ID_KEY = re.compile(rb'"call_id"')
_LIST = re.compile(rb"\s*\[")


def shorten(call_id: str, limit: int = CHAT_ID_LIMIT) -> str:
    """`call_id` if it fits in `limit`, else its stable short form (29 characters)."""
    if len(call_id) <= limit:
        return call_id
    return "call_" + hashlib.sha256(call_id.encode()).hexdigest()[:24]


def _too_long(req: ChatCompletionRequest) -> bool:
    for msg in req.messages:
        if isinstance(msg, ToolMessage) and len(msg.tool_call_id) > CHAT_ID_LIMIT:
            return True
        calls = msg.tool_calls if isinstance(msg, AssistantMessage) else None
        if calls and any(len(call.id) > CHAT_ID_LIMIT for call in calls):
            return True
    return False


def _short(raw: msgspec.Raw, limit: int) -> msgspec.Raw:
    try:
        call_id = _RAW_STR.decode(raw)
    except msgspec.MsgspecError:
        return raw  # not an id at all: the upstream's 400 will say so
    return raw if len(call_id) <= limit else msgspec.Raw(encode(shorten(call_id, limit)))


def short_ids(req: ChatCompletionRequest, messages: msgspec.Raw) -> msgspec.Raw | None:
    """The client's raw `messages` with every tool-call id over 40 characters shortened,
    other fields untouched; None when every id fits (the common case, decided on the
    decoded request without touching the raw JSON)."""
    if not _too_long(req):
        return None
    out = _RAW_LIST.decode(messages)
    for msg in out:
        if "tool_call_id" in msg:
            msg["tool_call_id"] = _short(msg["tool_call_id"], CHAT_ID_LIMIT)
        calls = msg.get("tool_calls")
        if calls is not None and _LIST.match(calls):
            listed = _RAW_LIST.decode(calls)
            for call in listed:
                if "id" in call:
                    call["id"] = _short(call["id"], CHAT_ID_LIMIT)
            msg["tool_calls"] = msgspec.Raw(encode(listed))
    return msgspec.Raw(encode(out))


def short_input_ids(items: msgspec.Raw) -> msgspec.Raw | None:
    """A Responses `input` list with every `call_id` over 64 characters shortened; None when
    it has none (or `input` is a string)."""
    if not _LIST.match(items) or not _CALL_ID_KEY.search(items):
        return None
    try:
        out = _RAW_LIST.decode(items)
    except msgspec.MsgspecError:
        return None  # items of another shape: nothing of ours to fix
    changed = False
    for item in out:
        raw = item.get("call_id")
        if raw is not None:
            short = _short(raw, RESPONSES_ID_LIMIT)
            changed = changed or short is not raw
            item["call_id"] = short
    return msgspec.Raw(encode(out)) if changed else None
