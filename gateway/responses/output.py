"""Chat answers as Responses API `response` objects.

`shell()` holds what every `response` of one request shares (its id and the echoed request
settings); `from_completion()` turns a whole `chat.completion` into the finished object: text
and refusal as one `message` item, each tool call as a `function_call` item whose `call_id` is
the chat tool-call id (so the next request's `function_call_output` maps back to it on any
provider), thinking text as a `reasoning` item, and usage in Responses terms.
"""

from __future__ import annotations

import os
import time
from typing import Literal

import msgspec
from msgspec import UNSET

from gateway.providers._translate import completion_usage, read_completion
from gateway.responses.translation import Translation
from gateway.schemas.codec import encode
from gateway.schemas.common import Usage
from gateway.schemas.response_output import (
    IncompleteDetails,
    OutputFunctionCall,
    OutputItem,
    OutputMessage,
    OutputReasoning,
    OutputRefusal,
    OutputText,
    ReasoningTextContent,
    Response,
    ResponseUsage,
)
from gateway.schemas.responses import (
    ReasoningConfig,
    ResponseCreateRequest,
    TextConfig,
    ToolChoiceObject,
)

__all__ = ["finished", "from_completion", "incomplete", "item_status", "new_id", "shell"]

_INCOMPLETE = {
    "length": IncompleteDetails(reason="max_output_tokens"),
    "content_filter": IncompleteDetails(reason="content_filter"),
}


def incomplete(finish_reason: str | None) -> IncompleteDetails | None:
    """Why an answer that ended with this chat `finish_reason` is incomplete (cut by the
    output limit or a content filter); None when it is complete."""
    return _INCOMPLETE.get(finish_reason or "")


def item_status(finish_reason: str | None) -> Literal["completed", "incomplete"]:
    """The status of the output items (and the response) of such an answer."""
    return "completed" if incomplete(finish_reason) is None else "incomplete"


def new_id(prefix: str) -> str:
    """An object id in OpenAI's style: `resp_`, `msg_`, `fc_`, `rs_` plus random hex."""
    return f"{prefix}_{os.urandom(24).hex()}"


def shell(req: ResponseCreateRequest, translation: Translation) -> Response:
    """The `response` of `req` before any output: new id, echoed settings, `in_progress`.

    `store` is always false: the gateway keeps no conversation content.
    """
    return Response(
        id=new_id("resp"),
        created_at=int(time.time()),
        status="in_progress",
        model=req.model if isinstance(req.model, str) else "",
        instructions=req.instructions or None,
        max_output_tokens=req.max_output_tokens if isinstance(req.max_output_tokens, int) else None,
        parallel_tool_calls=req.parallel_tool_calls is not False,
        reasoning=req.reasoning
        if isinstance(req.reasoning, ReasoningConfig)
        else ReasoningConfig(),
        temperature=req.temperature if isinstance(req.temperature, float | int) else None,
        text=req.text if isinstance(req.text, TextConfig) else TextConfig(),
        tool_choice=req.tool_choice
        if isinstance(req.tool_choice, str | ToolChoiceObject)
        else "auto",
        tools=translation.tools,
        top_p=req.top_p if isinstance(req.top_p, float | int) else None,
        user=req.user if isinstance(req.user, str) else UNSET,
        metadata=req.metadata or {},
    )


def finished(
    base: Response,
    output: list[OutputItem],
    finish_reason: str | None,
    usage: Usage | None,
) -> Response:
    """`base` completed (or incomplete, when the answer was cut) with its output and usage."""
    details = incomplete(finish_reason)
    return msgspec.structs.replace(
        base,
        status="completed" if details is None else "incomplete",
        completed_at=int(time.time()) if details is None else None,
        incomplete_details=details,
        output=output,
        usage=ResponseUsage.from_usage(usage) if usage is not None else UNSET,
    )


def from_completion(body: bytes, base: Response, usage: Usage | None) -> bytes:
    """A whole `chat.completion` (JSON) as the finished `response` (JSON).

    Raises:
        UpstreamError: the completion is not one.
    """
    completion = read_completion(body)
    choice = completion.choices[0]
    message = choice.message
    status = item_status(choice.finish_reason)
    output: list[OutputItem] = []
    if message.reasoning_content:
        thought = [ReasoningTextContent(text=message.reasoning_content)]
        output.append(OutputReasoning(id=new_id("rs"), content=thought, status="completed"))
    parts: list[OutputText | OutputRefusal] = []
    if message.content:
        parts.append(OutputText(text=message.content))
    if message.refusal:
        parts.append(OutputRefusal(refusal=message.refusal))
    if parts:
        output.append(OutputMessage(id=new_id("msg"), status=status, content=parts))
    for call in message.tool_calls or ():
        output.append(
            OutputFunctionCall(
                id=new_id("fc"),
                call_id=call.id,
                name=call.function.name,
                arguments=call.function.arguments,
                status=status,
            )
        )
    usage = completion_usage(completion) or usage
    response = finished(base, output, choice.finish_reason, usage)
    response.created_at = completion.created
    response.model = completion.model
    return encode(response)
