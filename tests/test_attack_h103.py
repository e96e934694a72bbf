"""Attack on a0a19e3 (StreamCheck: with n > 1 a close without [DONE] is the end once every
choice index has finished) and 376d244 (a reload's `pricing` error names the config file
first) (helper-103).

Raw TCP upstreams (tests/raw_upstream) sending OpenAI-compatible streams with n > 1, the
openai SDK consuming them through the gateway, and real `gateway serve` processes reloaded
by SIGHUP. Failing tests say what is wrong and what should happen; passing ones (`# SOUND:`)
pin what was checked and found right.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import openai
import pytest

from tests import test_attack_accounting3
from tests.conftest import cli_key, create_key, free_port, openai_client
from tests.raw_upstream import STREAM_HEAD, RawUpstream, sse
from tests.test_attack_accounting3 import Build
from tests.test_attack_accounting8 import DONE, chat_body, gateway, ousage, post, usage_only
from tests.test_attack_accounting9 import nchunk
from tests.test_lifecycle import _log_event

build = test_attack_accounting3.build  # the fixture: a gateway over raw TCP upstreams

CUT = b"before the answer was complete"


def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
    """A chat chunk of raw choice objects (any `index` shape)."""
    return sse(
        {
            "id": "c1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m-1",
            "choices": choices,
        }
        | extra
    )


def fin(index: Any = "absent", reason: Any = "stop", content: str | None = None) -> dict[str, Any]:
    """One choice: its finish (`reason`), its `index` unless "absent"."""
    choice: dict[str, Any] = {
        "delta": {"content": content} if content is not None else {},
        "finish_reason": reason,
    }
    if index != "absent":
        choice["index"] = index
    return choice


def text(index: Any = "absent") -> dict[str, Any]:
    return fin(index, None, "hi")


class Paced(RawUpstream):
    """Writes each of `pieces` in its own write, a pause between (each its own read at the
    gateway, mostly: the `see` / `_relay` path rather than one `see_run` of them all), then
    closes."""

    def __init__(self, pieces: list[bytes]) -> None:
        super().__init__(b"", hold=False)
        self.pieces = pieces

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            self.seen.set()
            for piece in self.pieces:
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.02)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.closed.set()
            writer.close()


async def paced_gateway(build: Build, pieces: list[bytes]) -> tuple[Any, str]:
    gw = await build([("openai", Paced(pieces), {})])
    return gw, await create_key(gw, budget_tokens=1_000_000)


async def stream_both_ways(build: Build, n: int, events: list[bytes]) -> list[bytes]:
    """The client's body for `events` (after the 200 head, the upstream then closing), sent
    in one write and one write an event: both, for the caller to check alike."""
    body = chat_body(n=n)
    del body["stream_options"]
    gw, secret, _ = await gateway(build, "openai", STREAM_HEAD + b"".join(events))
    whole = await post(gw, secret, "/v1/chat/completions", body)
    gw2, secret2 = await paced_gateway(build, [STREAM_HEAD, *events])
    paced = await post(gw2, secret2, "/v1/chat/completions", body)
    return [whole, paced]


def completions_body(**extra: Any) -> dict[str, Any]:
    return {"model": "m", "prompt": "hi", "max_tokens": 50, "stream": True} | extra


def tchunk(choices: list[tuple[int, str | None, str | None]]) -> bytes:
    return nchunk(choices, "text")


# --- 1. n > 1: what is complete ---------------------------------------------------------------


# SOUND: n = 3, each choice finishing in its own chunk (in one read, and read by read), the
# upstream closing without [DONE]: complete, no error event.
async def test_n3_every_index_finished_is_complete(build: Build) -> None:
    events = [
        nchunk([(0, "a", None), (1, "b", None), (2, "c", None)]),
        nchunk([(2, None, "stop")]),
        nchunk([(0, None, "length")]),
        nchunk([(1, None, "stop")]),
    ]
    for data in await stream_both_ways(build, 3, events):
        assert b'"error"' not in data, data[-300:]
        assert data.count(b'"finish_reason":"') + data.count(b'"finish_reason": "') == 3


# SOUND: n = 3, choices 0 and 2 finished, choice 0's finish repeated (and a duplicate index in
# one chunk), choice 1 never: cut, an error event, in one read and read by read.
async def test_n3_repeated_and_duplicate_finishes_are_not_the_end(build: Build) -> None:
    events = [
        nchunk([(0, "a", None), (1, "b", None), (2, "c", None)]),
        chunk([fin(0), fin(0)]),
        nchunk([(2, None, "stop")]),
        nchunk([(0, None, "stop")]),
    ]
    for data in await stream_both_ways(build, 3, events):
        assert CUT in data, data[-300:]


# SOUND: with [DONE] the stream is complete whatever the finishes (one of two, none): the
# client gets no error event.
async def test_done_ends_the_stream_whatever_the_finishes(build: Build) -> None:
    for finishes in ([nchunk([(0, None, "stop")])], []):
        events = [nchunk([(0, "a", None), (1, "b", None)]), *finishes, DONE]
        for data in await stream_both_ways(build, 2, events):
            assert b'"error"' not in data, data[-300:]
            assert data.endswith(DONE), data[-100:]


# SOUND: choices without an index (or with a null one), both finishing in one chunk:
# complete. Finishes without an index cannot be told apart, so each counts: two in chunks of
# their own complete n = 2 too (one choice a chunk, as n > 1 streams send them; see
# test_indexless_one_choice_a_chunk_complete_is_not_an_error), and one does not.
async def test_indexless_choices_in_one_chunk_are_known_by_place(build: Build) -> None:
    for first, second in (("absent", "absent"), (None, None)):
        events = [chunk([text(first), text(second)]), chunk([fin(first), fin(second)])]
        for data in await stream_both_ways(build, 2, events):
            assert b'"error"' not in data, data[-300:]
    events = [chunk([text(), text()]), chunk([fin()])]
    for data in await stream_both_ways(build, 2, events):
        assert CUT in data, data[-300:]


# SOUND: odd index shapes (a string, a bool, a float, 1e400, an object) neither crash the check
# nor a read: no 500, no "not a JSON object"; a stream of them that never finishes every
# place is cut, and one index out of float range makes the chunk no finish at all.
async def test_odd_index_shapes_do_not_crash(build: Build) -> None:
    for odd in ("1", True, 1.0, {"i": 1}, [1]):
        events = [chunk([text(0), text(odd)]), chunk([fin(0)]), chunk([fin(odd)])]
        for data in await stream_both_ways(build, 2, events):
            assert b"not a JSON object" not in data, data[-300:]
            # 0 by its index, the odd one as a finish without an index: two choices.
            assert b'"error"' not in data, (odd, data[-300:])
    huge = b'data: {"choices":[{"index":1e400,"delta":{},"finish_reason":"stop"}]}\n\n'
    for data in await stream_both_ways(build, 2, [chunk([fin(0)]), huge]):
        assert CUT in data, data[-300:]
        assert b"not a JSON object" not in data


# SOUND: the usage chunk may carry the last finish (several servers put usage on the finishing
# chunk): with choice 0 finished before, choice 1's finish there completes the answer, and
# the usage is charged exactly.
async def test_finish_on_the_usage_chunk_counts(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + nchunk([(0, "a", None), (1, "b", None)])
        + nchunk([(0, None, "stop")])
        + chunk([fin(1)], usage=ousage(30, 4))
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body(n=2))
    assert b'"error"' not in data, data[-300:]
    # And a finish only on the usage chunk, repeated for choice 0: cut.
    reply = (
        STREAM_HEAD
        + nchunk([(0, "a", None), (1, "b", None)])
        + nchunk([(0, None, "stop")])
        + chunk([fin(0)], usage=ousage(30, 4))
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/chat/completions", chat_body(n=2))
    assert CUT in data, data[-300:]


# SOUND: n = 1 is as before: any finish ends it (whatever its index: 0, 7, none, repeated),
# and a close with no finish is cut.
async def test_n1_any_finish_is_the_end(build: Build) -> None:
    for index in (0, 7, "absent", None, "0"):
        events = [chunk([text(index)]), chunk([fin(index)])]
        for data in await stream_both_ways(build, 1, events):
            assert b'"error"' not in data, (index, data[-300:])
    for data in await stream_both_ways(build, 1, [chunk([text(0)])]):
        assert CUT in data, data[-300:]


# SOUND: a legacy /v1/completions stream with n = 2 and one prompt: both finished, no [DONE],
# complete; choice 0's finish repeated, cut.
async def test_completions_n2_one_prompt(build: Build) -> None:
    good = STREAM_HEAD + tchunk([(0, "x", None), (1, "y", None)]) + tchunk([(1, "", "stop")])
    for tail, cut in ((tchunk([(0, "", "stop")]), False), (tchunk([(1, "", "stop")]), True)):
        gw, secret, _ = await gateway(build, "openai", good + tail)
        data = await post(gw, secret, "/v1/completions", completions_body(n=2))
        assert (CUT in data) is cut, data[-300:]


# SOUND: the openai SDK reads an n = 2 stream closed without [DONE] through the gateway: all
# chunks of both choices when complete; an APIError (the error event) when cut.
async def test_sdk_reads_n2_streams(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + nchunk([(0, "a", None), (1, "b", None)])
        + nchunk([(1, None, "stop")])
        + nchunk([(0, None, "stop")])
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    client = openai_client(gw, secret)
    finishes = {}
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], n=2, stream=True
    )
    async for part in stream:
        for choice in part.choices:
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert finishes == {0: "stop", 1: "stop"}
    await client.close()

    cut = STREAM_HEAD + nchunk([(0, "a", None), (1, "b", None)]) + chunk([fin(0), fin(0)])
    gw, secret, _ = await gateway(build, "openai", cut)
    client = openai_client(gw, secret)
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], n=2, stream=True
    )
    with pytest.raises(openai.APIError, match="before the answer was complete"):
        async for _ in stream:
            pass
    await client.close()


# --- 1. n > 1: findings -----------------------------------------------------------------------


# WRONG (medium, realistic: vLLM and OpenAI's legacy completions take a list of prompts, and
# stream choice `index` = prompt * n + j): `/v1/completions` with `prompt: ["a", "b"]` streams
# 2 choices, but the check counts only `n` (1 here: any finish ends it). The upstream finishes
# prompt 0's choice and is cut (the connection closes, no [DONE]) while prompt 1's is still
# streaming: the client gets a clean end of a half answer. Right: the choices expected are
# n (best_of: n returned) times the number of prompts, so the cut ends with the error event.
async def test_completions_prompt_list_cut_after_first_prompt_is_an_error(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + tchunk([(0, "x", None), (1, "y", None)])
        + tchunk([(0, "", "stop")])
        + tchunk([(1, " more", None)])
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/completions", completions_body(prompt=["a", "b"]))
    assert CUT in data, data[-300:]


# WRONG (medium, the same realistic case with n = 2): 2 prompts x n = 2 are 4 choices (index
# 0..3); choices 0 and 1 (prompt "a") finish, 2 and 3 (prompt "b") are cut: clean end.
async def test_completions_prompt_list_n2_cut_is_an_error(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + tchunk([(0, "x", None), (1, "y", None), (2, "z", None), (3, "w", None)])
        + tchunk([(0, "", "stop"), (1, "", "stop")])
        + tchunk([(2, " more", None)])
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    data = await post(gw, secret, "/v1/completions", completions_body(prompt=["a", "b"], n=2))
    assert CUT in data, data[-300:]


# SOUND (the other half of the above): a complete 2-prompt x n = 2 stream, every index 0..3
# finished without [DONE], is not an error.
async def test_completions_prompt_list_complete_is_clean(build: Build) -> None:
    reply = (
        STREAM_HEAD
        + tchunk([(0, "x", None), (1, "y", None), (2, "z", None), (3, "w", None)])
        + tchunk([(0, "", "stop"), (1, "", "stop")])
        + tchunk([(2, "", "stop"), (3, "", "length")])
        + usage_only(ousage(10, 8))
    )
    gw, secret, _ = await gateway(build, "openai", reply)
    body = completions_body(prompt=["a", "b"], n=2, stream_options={"include_usage": True})
    data = await post(gw, secret, "/v1/completions", body)
    assert b'"error"' not in data, data[-300:]


# WRONG (low; a hostile or broken upstream only for chat): n = 2, choice 0 finishes and then a
# finish for an index that is no choice of the answer (5, -1, a huge one) arrives; choice 1
# never finished and the stream is cut. Each distinct index counts toward n, so the cut looks
# complete. Right: only indexes 0..n-1 count (an index outside them is no choice the client
# asked for), so the client gets the error event.
@pytest.mark.parametrize("stray", [5, -1, 10**30])
async def test_finish_of_an_index_beyond_n_does_not_complete(build: Build, stray: int) -> None:
    events = [
        nchunk([(0, "a", None), (1, "b", None)]),
        nchunk([(0, None, "stop")]),
        chunk([fin(stray)]),
    ]
    for data in await stream_both_ways(build, 2, events):
        assert CUT in data, (stray, data[-300:])


# WRONG (low, a regression of a0a19e3; no mainstream server omits `index`, but the docs make
# every other form of a choice checkable): an upstream that omits `index` and sends each
# choice in its own chunk (one choice a chunk, as every n > 1 stream does) finishes both
# and closes without [DONE]: every finish is at place 0, counted once, and the complete
# answer ends with the error event. Before a0a19e3 (finishes counted) it was complete.
# Right: either complete, or at most what it was (no regression for index-less upstreams).
async def test_indexless_one_choice_a_chunk_complete_is_not_an_error(build: Build) -> None:
    events = [chunk([text()]), chunk([text()]), chunk([fin()]), chunk([fin()])]
    for data in await stream_both_ways(build, 2, events):
        assert CUT not in data, data[-300:]


# --- 2. a reload's pricing error names the config file -----------------------------------------

PRICED = '[[providers]]\nname = "p"\ntype = "demo"\npricing = "nowhere"\n'


async def _serve(
    tmp_path: Path, argv: list[str], env: dict[str, str] | None = None, workers: int = 1
) -> asyncio.subprocess.Process:
    args = [sys.executable, "-m", "gateway", "serve", *argv]
    if workers > 1:
        args += ["--workers", str(workers)]
    return await asyncio.create_subprocess_exec(
        *args,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def _reload_error(proc: asyncio.subprocess.Process, write: Any, ready: int = 1) -> str:
    """Wait for the server to listen, `write()` the bad config, SIGHUP: the logged error."""
    assert proc.stdout is not None and proc.stderr is not None
    try:
        async with asyncio.timeout(60):
            if ready > 1:
                for _ in range(ready):
                    await _log_event(proc.stdout, "worker_started")
            line = await proc.stderr.readline()
            assert b"listening" in line, line + await proc.stderr.read()
            write()
            proc.send_signal(signal.SIGHUP)
            return str((await _log_event(proc.stdout, "config_reload_failed"))["error"])
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await proc.wait()


# SOUND: the config named by $GATEWAY_CONFIG (a relative path, the server started in its
# directory): the reload's pricing error starts with that path, as `load_settings` names it.
async def test_reload_pricing_error_names_gateway_config_env(tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "keys.db"
    await cli_key(db, capsys)
    (tmp_path / "conf").mkdir()
    config = tmp_path / "conf" / "g.toml"
    head = f'[server]\ndatabase = "{db}"\n'
    config.write_text(head)
    proc = await _serve(
        tmp_path, ["--port", str(free_port())], env={"GATEWAY_CONFIG": "conf/g.toml"}
    )
    error = await _reload_error(proc, lambda: config.write_text(head + PRICED))
    assert error.startswith("conf/g.toml: providers.p.pricing: 'nowhere'"), error


# SOUND: a relative --config path: named as given.
async def test_reload_pricing_error_names_relative_config(tmp_path: Path, capsys: Any) -> None:
    db = tmp_path / "keys.db"
    await cli_key(db, capsys)
    config = tmp_path / "my.toml"
    head = f'[server]\ndatabase = "{db}"\n'
    config.write_text(head)
    proc = await _serve(tmp_path, ["--config", "my.toml", "--port", str(free_port())])
    error = await _reload_error(proc, lambda: config.write_text(head + PRICED))
    assert error.startswith("my.toml: providers.p.pricing: 'nowhere'"), error


# SOUND: `serve --workers 2`: each worker's reload error names the file too.
async def test_reload_pricing_error_names_config_in_workers(
    tmp_path: Path, capsys: Any, redis_url: str
) -> None:
    db = tmp_path / "keys.db"
    await cli_key(db, capsys)
    config = tmp_path / "w.toml"
    head = f'[server]\ndatabase = "{db}"\nredis_url = "{redis_url}"\n'
    config.write_text(head)
    proc = await _serve(tmp_path, ["--config", str(config), "--port", str(free_port())], workers=2)
    assert proc.stdout is not None
    error = await _reload_error(proc, lambda: config.write_text(head + PRICED), ready=2)
    assert error.startswith(f"{config}: providers.p.pricing: 'nowhere'"), error


# WRONG (low): started on the embedded default (no --config, no $GATEWAY_CONFIG, no
# ./gateway.toml), `Reloader.source` is None for good, but every reload looks for the file
# again (`load_settings(None, environ)` finds a ./gateway.toml written since). An operator
# who then writes ./gateway.toml and sends SIGHUP gets a pricing error with no file name
# (the other errors of that same reload do name ./gateway.toml). Right: the file the reload
# read named first ("gateway.toml: providers.p.pricing: ..."), not None and not nothing.
async def test_reload_pricing_error_names_a_gateway_toml_made_after_start(
    tmp_path: Path, capsys: Any
) -> None:
    db = tmp_path / "keys.db"
    await cli_key(db, capsys)
    head = f'[server]\ndatabase = "{db}"\n'
    proc = await _serve(tmp_path, ["--db", str(db), "--port", str(free_port())])
    error = await _reload_error(proc, lambda: (tmp_path / "gateway.toml").write_text(head + PRICED))
    assert not error.startswith("None"), error
    assert error.startswith("gateway.toml: providers.p.pricing: 'nowhere'"), error


# SOUND: the same start, a syntactically bad ./gateway.toml written after it: load_settings
# itself names the file (the contrast with the pricing error above).
async def test_reload_toml_error_names_a_gateway_toml_made_after_start(
    tmp_path: Path, capsys: Any
) -> None:
    db = tmp_path / "keys.db"
    await cli_key(db, capsys)
    proc = await _serve(tmp_path, ["--db", str(db), "--port", str(free_port())])
    error = await _reload_error(
        proc, lambda: (tmp_path / "gateway.toml").write_text("[[models]]\nname = 1\n")
    )
    assert error.startswith("gateway.toml: "), error
