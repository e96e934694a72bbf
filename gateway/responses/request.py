"""A Responses API request as the chat completions request every provider speaks.

`to_chat()` builds the same chat request the chat endpoint would receive, so limits, budgets,
usage rows and routing apply alike. A malformed request is refused at once (400 naming the
Responses field). What only an upstream serving `/v1/responses` itself can do (built-in tools,
stored state, uploaded files) is recorded as `Translation.refusal` instead: such a request may
only go to those upstreams, and is refused when its model has none.
"""

from __future__ import annotations

from msgspec import UNSET

from gateway.errors import InvalidRequest
from gateway.responses.items import ChatBuilder, missing
from gateway.responses.translation import Translation
from gateway.schemas.chat import (
    JSONObjectFormat,
    JSONSchemaFormat,
    JSONSchemaSpec,
    ResponseFormat,
    SystemMessage,
    UserMessage,
)
from gateway.schemas.codec import present
from gateway.schemas.responses import (
    ResponseCreateRequest,
    ResponseStreamOptions,
    TextFormatJSONObject,
    TextFormatJSONSchema,
    ToolChoiceObject,
)

__all__ = ["to_chat"]


def _response_format(req: ResponseCreateRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text else None
    if isinstance(fmt, TextFormatJSONObject):
        return JSONObjectFormat()
    if isinstance(fmt, TextFormatJSONSchema):
        spec = JSONSchemaSpec(
            name=fmt.name, description=fmt.description, schema=fmt.schema, strict=fmt.strict
        )
        return JSONSchemaFormat(json_schema=spec)
    return None  # plain text is what chat answers anyway


def to_chat(req: ResponseCreateRequest) -> Translation:
    """Translate a Responses request (see the module docstring for what is deferred).

    Raises:
        InvalidRequest: an input item or tool is malformed, `input` is missing or holds no
            message, `stream_options` without `stream`; `param` names the Responses field.
    """
    if isinstance(req.stream_options, ResponseStreamOptions) and not req.is_stream:
        raise InvalidRequest(
            "The 'stream_options' parameter is only allowed when 'stream' is true.",
            param="stream_options",
        )
    b = ChatBuilder()
    if req.instructions:
        b.add(SystemMessage(content=req.instructions), "instructions")
    head = len(b.messages)
    if isinstance(req.input, str):
        b.add(UserMessage(content=req.input), "input")
    elif isinstance(req.input, list):
        for i, raw in enumerate(req.input):
            b.item(raw, f"input[{i}]")
    no_input = len(b.messages) == head
    chat = b.out.chat
    chat.model = req.model
    chat.stream = req.stream
    if req.tools:
        chat.tools = b.tools(req.tools)
    if isinstance(req.tool_choice, ToolChoiceObject):
        chat.tool_choice = b.tool_choice(req.tool_choice)
    elif req.tool_choice is not UNSET:
        chat.tool_choice = req.tool_choice
    chat.parallel_tool_calls = req.parallel_tool_calls
    chat.response_format = _response_format(req) or UNSET
    if req.text and req.text.verbosity is not UNSET:
        chat.verbosity = req.text.verbosity
    if req.reasoning and req.reasoning.effort is not None:
        chat.reasoning_effort = req.reasoning.effort
    chat.max_completion_tokens = req.max_output_tokens
    chat.temperature = req.temperature
    chat.top_p = req.top_p
    chat.user = req.user
    chat.safety_identifier = req.safety_identifier
    chat.prompt_cache_key = req.prompt_cache_key
    chat.service_tier = req.service_tier
    _refuse_stateful(req, b)
    if no_input and b.out.refusal is None:
        # With a refusal, a pass-through upstream may still serve it (a stored prompt, say).
        if req.input is UNSET:
            raise missing("input")
        raise InvalidRequest("Invalid 'input': expected at least one input message.", param="input")
    return b.out


def _refuse_stateful(req: ResponseCreateRequest, b: ChatBuilder) -> None:
    """Features that live on OpenAI's side: stored state, prompts, background runs, logprobs."""
    if req.previous_response_id:
        b.refuse(
            "previous_response_id",
            "the gateway does not store responses; send the earlier turns in 'input' instead",
        )
    if present(req.conversation):
        b.refuse("conversation", "the gateway does not store conversations")
    if present(req.prompt):
        b.refuse("prompt", "stored prompts are only known to OpenAI")
    if req.background:
        b.refuse("background", "the gateway does not run responses in the background")
    if req.top_logprobs:
        b.refuse("top_logprobs", "log probabilities are not returned")
    # Encrypted reasoning is asked for by stateless clients; there is none to return here.
    for i, name in enumerate(req.include or ()):
        if name != "reasoning.encrypted_content":
            b.refuse(f"include[{i}]", f"'{name}' cannot be included")
