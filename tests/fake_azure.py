"""An in-process fake of Azure OpenAI's chat API, checking requests the way Azure does.

    fake = FakeAzure(api_key="azure-key", deployments=("gpt4o-prod",))
    await fake.start(aiohttp_server)
    provider = AzureConfig(..., base_url=fake.base_url, api_version="2024-10-21")

Only `POST /openai/deployments/{deployment}/chat/completions?api-version=...` (and its
`/embeddings` and `/completions`, answered as `FakeOpenAI` does) exists, as on a resource: an
unknown path or a missing or unsupported `api-version` is a 404 "Resource not found"; the key
must come in `api-key` (a key sent as `Authorization: Bearer` is taken for an
Entra ID token and refused with 401); an unknown deployment is Azure's `DeploymentNotFound`.
Answers are OpenAI's (`FakeOpenAI` writes them) with Azure's additions: the content filter's
`prompt_filter_results` (in streams, a first chunk with empty `choices` and blank ids) and
`content_filter_results` on each choice. Scripts as for `FakeOpenAI`, plus
`content_filter="prompt"` (a 400 `content_filter` error, as for a filtered prompt) or
`"completion"` (the answer is cut with `finish_reason: "content_filter"`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from tests.fakes import FakeOpenAI, Json, Script

API_VERSIONS = ("2024-06-01", "2024-10-21", "2025-04-01-preview")

_SAFE = {"filtered": False, "severity": "safe"}
FILTER_RESULTS: Json = {k: _SAFE for k in ("hate", "self_harm", "sexual", "violence")}


def prompt_filter_chunk(results: Json) -> Json:
    """Azure's first stream chunk: the prompt's filter results, no choice, blank fields."""
    return {
        "choices": [],
        "created": 0,
        "id": "",
        "model": "",
        "object": "",
        "prompt_filter_results": results,
    }


def azure_error(http_status: int, code: str, message: str, **extra: Any) -> web.Response:
    body = {"error": {"code": code, "message": message, **extra}}
    return web.json_response(body, status=http_status)


NOT_FOUND = ("404", "Resource not found")
DENIED = (
    "401",
    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to "
    "provide a valid key for an active subscription and use a correct regional API endpoint "
    "for your resource.",
)
TOKEN_REFUSED = (
    "401",
    "Unauthorized. Access token is missing, invalid, audience is incorrect "
    "(https://cognitiveservices.azure.com), or have expired.",
)
PROMPT_FILTERED = (
    "The response was filtered due to the prompt triggering Azure OpenAI's content "
    "management policy. Please modify your prompt and retry. To learn more about our content "
    "filtering policies please read our documentation: https://go.microsoft.com/fwlink/?linkid=2198766"
)


@dataclass(kw_only=True)
class AzureScript(Script):
    content_filter: str | None = None  # "prompt" or "completion"


class FakeAzure(FakeOpenAI):
    """A scriptable fake Azure OpenAI resource. See the module docstring."""

    script_type = AzureScript  # type: ignore[assignment]
    root = ""

    def __init__(
        self, *, api_key: str | None = None, deployments: tuple[str, ...] = ("gpt-4o-mini",)
    ) -> None:
        super().__init__(api_key=api_key)  # checked in `api-key`, not as a Bearer token
        self.deployments = deployments

    @property
    def chat_requests(self) -> list[Any]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    def make_app(self) -> web.Application:
        app = web.Application(middlewares=[self._check], client_max_size=64 * 1024**2)
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._azure_chat)
        app.router.add_post("/openai/deployments/{deployment}/embeddings", self._azure_embeddings)
        app.router.add_post("/openai/deployments/{deployment}/completions", self._azure_completions)
        return app

    def _unknown(self, request: web.Request) -> web.Response | None:
        if request.match_info["deployment"] in self.deployments:
            return None
        return azure_error(
            404,
            "DeploymentNotFound",
            "The API deployment for this resource does not exist. If you created the "
            "deployment within the last 5 minutes, please wait a moment and try again.",
        )

    async def _azure_embeddings(self, request: web.Request) -> web.StreamResponse:
        """Embeddings of the deployment's model (the deployment name stands for it)."""
        missing = self._unknown(request)
        return missing or await self._embeddings(request, request.match_info["deployment"])

    async def _azure_completions(self, request: web.Request) -> web.StreamResponse:
        missing = self._unknown(request)
        return missing or await self._completions(request, request.match_info["deployment"])

    @web.middleware
    async def _check(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.record(request, await request.read())
        if request.query.get("api-version") not in API_VERSIONS:
            return azure_error(404, *NOT_FOUND)
        if self.api_key is not None and request.headers.get("api-key") != self.api_key:
            if "api-key" not in request.headers and "authorization" in request.headers:
                return azure_error(401, *TOKEN_REFUSED)
            return azure_error(401, *DENIED)
        try:
            response: web.StreamResponse = await handler(request)
        except web.HTTPNotFound:
            return azure_error(404, *NOT_FOUND)
        return response

    async def _azure_chat(self, request: web.Request) -> web.StreamResponse:
        missing = self._unknown(request)
        if missing is not None:
            return missing
        plan = self.queue[0] if self.queue else self.default
        if isinstance(plan, AzureScript) and plan.content_filter == "prompt":
            self.next_plan()
            return azure_error(
                400,
                "content_filter",
                PROMPT_FILTERED,
                param="prompt",
                type=None,
                status=400,
                innererror={
                    "code": "ResponsibleAIPolicyViolation",
                    "content_filter_result": FILTER_RESULTS
                    | {"violence": {"filtered": True, "severity": "medium"}},
                },
            )
        return await self._chat(request)

    def _reply(self, body: Json, plan: Script) -> Json:
        reply = super()._reply(body, plan)
        reply["prompt_filter_results"] = [
            {"prompt_index": 0, "content_filter_results": FILTER_RESULTS}
        ]
        for choice in reply["choices"]:
            choice["content_filter_results"] = FILTER_RESULTS
            if isinstance(plan, AzureScript) and plan.content_filter == "completion":
                choice["message"]["content"] = choice["message"]["content"].split(" ")[0]
                choice["finish_reason"] = "content_filter"
                choice["content_filter_results"] = FILTER_RESULTS | {
                    "violence": {"filtered": True, "severity": "high"}
                }
        return reply

    def _chunks(self, body: Json, reply: Json) -> list[Json]:
        chunks = super()._chunks(body, reply)
        first = prompt_filter_chunk(reply["prompt_filter_results"])
        for chunk in chunks:
            chunk.pop("obfuscation", None)  # OpenAI's, not Azure's
            for choice in chunk["choices"]:
                choice["content_filter_results"] = reply["choices"][0]["content_filter_results"]
        return [first, *chunks]
