"""`POST /v1/embeddings` attacked by a hostile upstream (a raw socket, `test_attack_upstream`'s
rig) and driven as a client would: what a 200 that is no embeddings list becomes, the usage an
answer carries (read in the same decode as its vectors), the order and length of the vectors,
and answers large enough to stall the event loop. Vector counts, NaN and base64 lengths are
`test_attack_upstream2`'s.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.settings import RoutingSettings
from tests.conftest import openai_client, usage_rows
from tests.test_attack_upstream import Build, build, sends, whole

__all__ = ["build"]  # the fixture, used here by name

INPUTS = ["a", "b", "c"]
VECTORS = [[0.5, -1.25], [2.0, 0.0], [1.0, 3.5]]


def answer(
    vectors: list[Any] | None = None, usage: Any = "default", order: list[int] | None = None
) -> dict[str, Any]:
    vectors = VECTORS if vectors is None else vectors
    data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
    if order is not None:
        data = [data[i] for i in order]
    body: dict[str, Any] = {"object": "list", "data": data, "model": "m-1"}
    if usage == "default":
        usage = {"prompt_tokens": 3, "total_tokens": 3}
    if usage is not None:
        body["usage"] = usage
    return body


def raw(body: Any) -> bytes:
    return whole(json.dumps(body).encode())


# --- A 200 that is no embeddings list (classified as for chat) ---------------------------------

NOT_A_LIST: dict[str, tuple[Any, int, str]] = {
    "rate-limit-error": (
        {"error": {"type": "rate_limit_exceeded", "message": "slow down"}},
        429,
        "rate_limit_exceeded",
    ),
    "request-error": (
        {"error": {"type": "invalid_request_error", "message": "input too long"}},
        400,
        "input too long",
    ),
    "server-error": ({"error": {"message": "boom"}}, 502, "answered HTTP 200 with an error"),
    "null": (None, 502, "not a embeddings list"),
    "array": ([1, 2], 502, "not a embeddings list"),
    "no-data": ({"object": "list", "model": "m-1"}, 502, "not a embeddings list"),
    "data-not-a-list": ({"object": "list", "data": "x"}, 502, "not a embeddings list"),
    "items-not-vectors": ({"object": "list", "data": [1, 2, 3]}, 502, "not vectors of finite"),
}


@pytest.mark.parametrize("case", list(NOT_A_LIST))
async def test_a_200_that_is_no_embeddings_list_is_classified(build: Build, case: str) -> None:
    body, status, words = NOT_A_LIST[case]
    rig = await build("openai", sends(raw(body)))
    got, out = await rig.post("/v1/embeddings", {"model": "m", "input": INPUTS})
    assert got == status, out
    error = json.loads(out)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert words in error["message"] or words == error["code"], error


async def test_an_unreadable_usage_costs_no_vectors_and_is_estimated(build: Build) -> None:
    body = answer(usage={"prompt_tokens": -5, "total_tokens": "many"})
    rig = await build("openai", sends(raw(body)))
    async with openai_client(rig.gateway, rig.key) as client:
        reply = await client.embeddings.create(model="m", input=INPUTS, encoding_format="float")
    assert [d.embedding for d in reply.data] == VECTORS
    [row] = await usage_rows(rig.gateway)
    assert row["status"] == 200 and row["estimated"] and row["prompt_tokens"] > 0


async def test_the_usage_of_an_answer_with_bad_vectors_is_still_counted(build: Build) -> None:
    # The upstream answered (and billed) the input: its usage is the row's, though the client
    # gets a 502 for its vectors.
    body = answer(vectors=[[0.1], [0.2]], usage={"prompt_tokens": 77, "total_tokens": 77})
    rig = await build(
        "openai", sends(raw(body)), server={"routing": RoutingSettings(max_attempts=1)}
    )
    got, _ = await rig.post("/v1/embeddings", {"model": "m", "input": INPUTS})
    assert got == 502
    [row] = await usage_rows(rig.gateway)
    assert (row["status"], row["prompt_tokens"], row["estimated"]) == (502, 77, False)
