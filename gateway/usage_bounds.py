"""The most usage a request can have used: bounds on what an upstream reports.

An upstream's usage is what a key's limits and budget are charged, so a hostile or broken
upstream could drain a budget with one answer (each count is read up to 2**40). The bounds
here are generous, to catch only the absurd, never a real request:

- **Prompt**: the request's bytes, plus the most its images, files and audio can cost
  (`tokens.prompt_size`, on whichever provider type prices them highest), plus
  `PROMPT_SLACK` for what an upstream adds on its own (Anthropic's tool-use system prompt,
  chat templates). Cache reads and writes count within it. A request whose prompt the
  gateway cannot see has no bound: one translated from the Responses or Messages API (which
  may point at stored conversations or server-side tools), a file sent by id, or web search.
- **Completion**: the output limit sent upstream (the request's `max_tokens` /
  `max_completion_tokens`, or the model's default, or the one admission set) times the
  choices asked for; for a reasoning model, plus its thinking budget (what Anthropic adds
  on top, or `THINKING_ALLOWANCE`, or the request's own `thinking.budget_tokens`); plus a
  predicted output's bytes (rejected predictions are billed as output); and never below
  `OUTPUT_FLOOR`. Without any limit, none.

`pipeline._account` tests the common case with two comparisons (prompt and cache within the
request's bytes, completion within `OUTPUT_FLOOR`), so an answer costs no more to account
than before; `bound()` runs only past them. A count past its bound is lowered to it, logged
(`upstream_usage_implausible`, counts only, no content) and the usage row is marked
`estimated`. The client's answer is relayed as it came.
"""

from __future__ import annotations

from typing import cast

import msgspec
import structlog
from msgspec import UNSET

from gateway.media import FILE_BY_ID, Estimate, file_tokens, image_tokens
from gateway.providers.base import UNBOUNDED, Call, ChatCall, OutputOnTop, has_capability
from gateway.schemas.chat import ChatCompletionRequest, FileContentPart
from gateway.tokens import ImageCost, prompt_size
from gateway.tool_fees import MOST_SEARCHES, UNCAPPED_SEARCHES
from gateway.trace import RequestTrace

__all__ = [
    "MOST_SEARCHES",
    "OUTPUT_FLOOR",
    "PROMPT_SLACK",
    "THINKING_ALLOWANCE",
    "UNCAPPED_SEARCHES",
    "bound",
    "completion_bound",
    "completion_charged",
    "output_sent",
    "prompt_bound",
    "steps_charged",
]

log = structlog.get_logger(__name__)

PROMPT_SLACK = 4096
# Completion tokens never doubted: the common answer is checked with one comparison, and an
# answer to a request with a smaller output limit is charged at most this much.
OUTPUT_FLOOR = 1024
# Gemini 2.5 Pro's largest thinking budget: a reasoning model may think this much beyond the
# output limit on upstreams that do not count thinking within it.
THINKING_ALLOWANCE = 32_768
_KINDS = ("openai", "anthropic", "gemini")


class _Thinking(msgspec.Struct):
    budget_tokens: int | None = None


def _image_cost(model: str) -> ImageCost:
    def cost(url: str, detail: str | None) -> Estimate:
        costs = [image_tokens(kind, model, url, detail) for kind in _KINDS]
        return Estimate(max(c.likely for c in costs), max(c.most for c in costs))

    return cost


def _unseen(req: ChatCompletionRequest) -> bool:
    """Whether the prompt holds what the gateway cannot size: a file by id, web search."""
    if req.web_search_options is not UNSET:
        return True
    for msg in req.messages:
        content = getattr(msg, "content", None)
        if isinstance(content, list):
            for part in content:
                if isinstance(part, FileContentPart) and file_tokens(part.file) is FILE_BY_ID:
                    return True
    return False


def prompt_bound(call: Call) -> int | None:
    """The most prompt tokens `call` can have used (None: the gateway cannot tell)."""
    body = call.body
    if body is None:
        return None
    if isinstance(call, ChatCall):
        if _unseen(call.request):
            return None
        most = prompt_size(call.request, _image_cost(call.upstream_model)).most
        return len(body) + most + PROMPT_SLACK
    return len(body) + PROMPT_SLACK


# The most output tokens the sampling steps beyond an answer's own are charged (a compaction's
# summary, an advisor's advice: a few thousand each), whatever an upstream reports.
STEPS_OUTPUT_MOST = 65_536


def steps_charged(call: Call) -> tuple[int, int, int, int, int]:
    """`Call.steps` within bounds: their input reads the request's context, a few times at
    most (eight times its prompt bound, where it has one: not on a pass-through, whose body
    may name documents by URL, and whose top-level counts are not bounded either), their
    output `STEPS_OUTPUT_MOST` in all."""
    given, read, written, hour, made = call.steps
    most = prompt_bound(call)
    if most is not None:
        given, read = min(given, 8 * most), min(read, 8 * most)
        written, hour = min(written, 8 * most), min(hour, 8 * most)
    return given, read, written, hour, min(made, STEPS_OUTPUT_MOST)


def completion_bound(call: Call, provider: object) -> int:
    """The most completion tokens `call` can have used (`UNBOUNDED`: no limit was sent)."""
    most = call.output_ceiling()
    if most >= UNBOUNDED or not isinstance(call, ChatCall):
        return most
    req = call.request
    choices = req.n if isinstance(req.n, int) and req.n > 0 else 1
    if call.model.reasoning:
        thinking = THINKING_ALLOWANCE
        if has_capability(provider, OutputOnTop):
            thinking = max(thinking, cast(OutputOnTop, provider).output_on_top(call))
        if req.thinking is not UNSET:
            try:
                budget = msgspec.json.decode(req.thinking, type=_Thinking).budget_tokens
            except msgspec.MsgspecError:
                budget = None
            thinking = max(thinking, budget or 0)
        most += thinking * choices
    if req.prediction is not UNSET:
        most += len(req.prediction) * choices
    return most


def output_sent(call: Call, provider: object) -> int:
    """The output limit `call` was sent to `provider` (`UNBOUNDED`: none): its own, and a
    reasoning model's thinking budget where the provider adds one on top (Anthropic), as
    admission holds it."""
    most = call.output_ceiling()
    if most < UNBOUNDED and isinstance(call, ChatCall) and has_capability(provider, OutputOnTop):
        most += cast(OutputOnTop, provider).output_on_top(call)
    return most


def completion_charged(call: Call, provider: object) -> int:
    """The most completion tokens `call` is charged, reported or estimated: its bound, and
    never below `OUTPUT_FLOOR`."""
    return max(completion_bound(call, provider), OUTPUT_FLOOR)


def bound(call: Call, provider: object, provider_name: str, trace: RequestTrace) -> None:
    """Lower the counts in `trace` past what `call` can have used; log and mark it if so.

    Each bound is worked out only when its count is past what `pipeline._account` lets
    through unchecked (the request's bytes, `OUTPUT_FLOOR`)."""
    prompt, completion = trace.prompt_tokens, trace.completion_tokens
    cache_read, cache_write = trace.cache_read_tokens, trace.cache_write_tokens
    body = call.body
    prompt_most: int | None = None
    if body is None or prompt + cache_read + cache_write > len(body):
        prompt_most = prompt_bound(call)
        if prompt_most is not None:
            trace.prompt_tokens = min(prompt, prompt_most)
            trace.cache_read_tokens = min(cache_read, prompt_most)
            trace.cache_write_tokens = min(cache_write, prompt_most - trace.cache_read_tokens)
    completion_most: int | None = None
    if completion > OUTPUT_FLOOR:
        completion_most = completion_charged(call, provider)
        trace.completion_tokens = min(completion, completion_most)
    if (prompt, completion, cache_read, cache_write) == (
        trace.prompt_tokens,
        trace.completion_tokens,
        trace.cache_read_tokens,
        trace.cache_write_tokens,
    ):
        return
    trace.estimated = True
    log.warning(
        "upstream_usage_implausible",
        provider=provider_name,
        upstream_model=call.upstream_model,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        prompt_bound=prompt_most,
        completion_bound=completion_most,
    )
