"""What users of long LLM streams live with: the gateway against a bare relay, in one run.

    .venv/bin/python -m tests.bench_streams                 # part of `make bench`
    BENCH_QUICK=1 .venv/bin/python -m tests.bench_streams   # smaller and shorter
    .venv/bin/python -m tests.bench_streams --streams 2000 --seconds 30 --json out.json

Processes on 127.0.0.1: the fake upstream and the relay (`tests/bench_servers.py`, uvloop),
the slow upstream of the long streams (`tests/bench_slow.py`), `gateway serve` (uvloop, a real
key, auth, limits, routing, usage rows and its log line on), and the load client, in a process
of its own (`client` below, uvloop), so the load generator is not what is measured. The slow
upstream and the client's streams are raw asyncio protocols, the cheapest HTTP/1.1 we can
write: on this 2-core machine they share the cores with the server measured, where real
clients and upstreams would not. Each scenario runs against the relay, then against the gateway.

* streams: `--streams` concurrent streams (opened over `--ramp` seconds) of chunks 100 ms
  apart for `--seconds`, through `/slow/v1/chat/completions`. Reported: the server's CPU
  while every stream is open; each chunk's delay (the time it arrived minus the time the
  upstream wrote it, which the chunk carries); the latency of fresh non-streaming requests
  sent during the load; memory per open stream (RSS growth / streams); errors; the CPU of
  the load client and of the slow upstream.
* ttfb: 300 streams to one provider at once, default config: time to first byte.
* memory: `--requests` JSON requests at concurrency 32; the gateway's RSS after the first
  tenth and at the end.

Targets (issue #13) are printed with each figure; missing one still exits 0 (a measurement);
a server that does not start exits 1.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
from yarl import URL

from tests.bench import (
    HOST,
    KEY_LIMITS,
    MODEL,
    ROOT,
    Server,
    Servers,
    cpu_seconds,
    free_port,
    gateway_command,
    wait_http,
    wait_tcp,
)
from tests.bench_slow import Stream, StreamFigures

__all__ = ["main"]

QUICK = os.environ.get("BENCH_QUICK") == "1"
INTERVAL = 0.1
SLOW_MODEL = "bench-slow"
UPSTREAM_KEY = "sk-bench-upstream-0123456789"  # (as in tests/bench.py)


def _pct(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


# --- the load client (its own process) --------------------------------------------------------


def _body(stream: bool, model: str = MODEL) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    ).encode()


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    stream_urls = [url + args.stream_path for url in args.url]  # round robin over replicas
    fresh_urls = itertools.cycle([f"{url}/v1/chat/completions" for url in args.url])
    figures = StreamFigures()
    fresh: list[float] = []
    opened = asyncio.Event()  # every stream has opened, or failed to
    open_count = 0
    loop = asyncio.get_running_loop()

    def one_more() -> None:
        nonlocal open_count
        open_count += 1
        if open_count == args.streams:
            opened.set()

    async def one_stream(delay: float, stream_url: str) -> None:
        await asyncio.sleep(delay)
        url = URL(stream_url)
        host, port = url.host or HOST, url.port or 80
        body = _body(True, args.model)
        request = (
            f"POST {url.raw_path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {args.key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        stream = Stream(request, figures, one_more, time.monotonic())
        try:
            await loop.create_connection(lambda: stream, host, port)
        except OSError as exc:
            stream.fail(type(exc).__name__)
        await stream.done

    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def fresh_requests() -> None:
            await opened.wait()
            end = time.monotonic() + args.fresh_seconds
            while time.monotonic() < end:
                start = time.monotonic()
                try:
                    async with session.post(
                        next(fresh_urls), data=_body(False), headers=headers
                    ) as resp:
                        await resp.read()
                        if resp.status != 200:
                            figures.errors.append(f"fresh status {resp.status}")
                except (aiohttp.ClientError, OSError) as exc:
                    figures.errors.append(type(exc).__name__)
                fresh.append(time.monotonic() - start)
                await asyncio.sleep(0.05)

        streams = [
            one_stream(args.ramp * i / max(1, args.streams), stream_urls[i % len(stream_urls)])
            for i in range(args.streams)
        ]
        tasks = [*streams, fresh_requests()] if args.fresh_seconds > 0 else streams
        await asyncio.gather(*tasks)
    # The first chunks of each stream see the ramp's own load: count from the steady part.
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "delays_ms": [round(d * 1000, 3) for d in figures.delays],
        "ttfb_ms": [round(t * 1000, 3) for t in figures.ttfb],
        "fresh_ms": [round(f * 1000, 3) for f in fresh],
        "errors": figures.errors,
        "client_cpu_s": usage.ru_utime + usage.ru_stime,
    }


async def _flood(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {args.key}", "Content-Type": "application/json"}
    url = f"{args.url[0]}/v1/chat/completions"
    errors = 0
    left = args.requests
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def worker() -> None:
            nonlocal errors, left
            while left > 0:
                left -= 1
                async with session.post(url, data=_body(False), headers=headers) as resp:
                    await resp.read()
                    errors += resp.status != 200

        await asyncio.gather(*[worker() for _ in range(32)])
    return {"errors": errors}


def client_main(argv: Sequence[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_streams client")
    parser.add_argument("--url", required=True, action="append", help="repeat: round robin")
    parser.add_argument("--key", required=True)
    parser.add_argument("--streams", type=int, default=0)
    parser.add_argument("--ramp", type=float, default=0.0)
    parser.add_argument("--stream-path", default="/v1/chat/completions")
    parser.add_argument("--model", default=MODEL)
    parser.add_argument("--fresh-seconds", type=float, default=0.0)
    parser.add_argument("--requests", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="where the figures go (JSON)")
    args = parser.parse_args(argv)
    from tests.bench_servers import new_event_loop

    loop = new_event_loop()
    work = _flood(args) if args.requests else _client(args)
    result = loop.run_until_complete(work)
    loop.close()
    args.out.write_text(json.dumps(result))


# --- the orchestration -------------------------------------------------------------------------


class _Client:
    """A load client process; its figures come back in a file (they can be megabytes)."""

    def __init__(self, servers: Sequence[Server], key: str, *extra: str) -> None:
        fd, name = tempfile.mkstemp(suffix=".json")
        os.close(fd)
        self.out = Path(name)
        argv = [sys.executable, "-m", "tests.bench_streams", "client"]
        for server in servers:
            argv += ["--url", server.url]
        self.proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
            [*argv, "--key", key, "--out", str(self.out), *extra], cwd=ROOT
        )


def _run_client(server: Server | Sequence[Server], key: str, *extra: str) -> _Client:
    return _Client([server] if isinstance(server, Server) else server, key, *extra)


def _finish(client: _Client) -> dict[str, Any]:
    try:
        if client.proc.wait(timeout=600) != 0:
            raise RuntimeError(f"the load client exited with {client.proc.returncode}")
        result: dict[str, Any] = json.loads(client.out.read_text())
    finally:
        client.out.unlink(missing_ok=True)
    return result


def _slow(server: Server) -> list[str]:
    """How a side is asked for the slow upstream's streams (the relay by path, the gateway
    by model)."""
    if server.name == "relay":
        return ["--stream-path", "/slow/v1/chat/completions"]
    return ["--model", SLOW_MODEL]


def long_streams(
    server: Server,
    key: str,
    streams: int,
    seconds: float,
    more: Sequence[Server] = (),
    upstream: Server | None = None,
) -> dict[str, Any]:
    """One side's long-streams figures (see the module docstring); with `more` replicas the
    streams go round robin over all, and CPU and memory are their sums. With `upstream` (the
    slow one), its CPU over the same time is reported too."""
    sides = [server, *more]
    ramp = min(5.0, max(1.0, streams / 400))
    steady = seconds - ramp - 2.0  # every stream is open from ramp to `seconds`
    base_rss = sum(_rss_kib(side.proc.pid) for side in sides)
    proc = _run_client(
        sides, key, "--streams", str(streams), "--ramp", str(ramp), *_slow(server),
        "--fresh-seconds", str(max(1.0, steady - 1.0)),
    )  # fmt: skip
    time.sleep(ramp + 1.0)
    tools = [upstream] if upstream is not None else []
    cpu0, t0 = cpu_seconds(sides) or 0.0, time.monotonic()
    up0 = cpu_seconds(tools) or 0.0
    time.sleep(max(1.0, steady - 1.0))
    cpu1, t1 = cpu_seconds(sides) or 0.0, time.monotonic()
    up1 = cpu_seconds(tools) or 0.0
    rss = sum(_rss_kib(side.proc.pid) for side in sides)
    result = _finish(proc)
    # Chunks written during the ramp wait behind connection set-up: count the steady ones.
    delays = result["delays_ms"]
    skip = len(delays) * ramp / seconds
    steady_delays = delays[int(skip) :]
    return {
        "streams": streams,
        "cpu_percent": round((cpu1 - cpu0) / (t1 - t0) * 100, 1),
        "delay_p50_ms": _pct(steady_delays, 50),
        "delay_p99_ms": _pct(steady_delays, 99),
        "chunks": len(delays),
        "fresh_p50_ms": _pct(result["fresh_ms"], 50),
        "fresh_p99_ms": _pct(result["fresh_ms"], 99),
        "fresh_requests": len(result["fresh_ms"]),
        "kib_per_stream": round((rss - base_rss) / streams, 1),
        "errors": len(result["errors"]),
        "error_kinds": sorted(set(result["errors"]))[:5],
        "client_cpu_percent": round(result["client_cpu_s"] / seconds * 100, 1),
        "upstream_cpu_percent": round((up1 - up0) / (t1 - t0) * 100, 1) if tools else None,
    }


def first_bytes(server: Server, key: str, streams: int) -> dict[str, Any]:
    result = _finish(_run_client(server, key, "--streams", str(streams), *_slow(server)))
    return {
        "streams": streams,
        "ttfb_p50_ms": _pct(result["ttfb_ms"], 50),
        "ttfb_p99_ms": _pct(result["ttfb_ms"], 99),
        "errors": len(result["errors"]),
    }


def memory_flat(server: Server, key: str, requests: int) -> dict[str, Any]:
    tenth = max(1, requests // 10)
    first = _finish(_run_client(server, key, "--requests", str(tenth)))
    rss_a = _rss_kib(server.proc.pid)
    rest = _finish(_run_client(server, key, "--requests", str(requests - tenth)))
    rss_b = _rss_kib(server.proc.pid)
    return {
        "requests": requests,
        "rss_after_tenth_mib": round(rss_a / 1024, 1),
        "rss_at_end_mib": round(rss_b / 1024, 1),
        "growth_percent": round((rss_b - rss_a) / rss_a * 100, 1),
        "errors": first["errors"] + rest["errors"],
    }


def write_config(path: Path, upstream: Upstreams, database: str, *extra: str) -> Path:
    """A gateway config with the fast model and the slow one; `extra` lines go in [server]."""
    lines = "".join(f"{line}\n" for line in extra)
    path.write_text(
        f"""\
[server]
database = "{database}"
log_level = "info"
{lines}
[[providers]]
name = "up"
type = "openai"
base_url = "{upstream.fast.url}/v1"
api_keys = ["{UPSTREAM_KEY}"]

[[providers]]
name = "slow"
type = "openai"
base_url = "{upstream.slow.url}/slow/v1"
api_keys = ["{UPSTREAM_KEY}"]

[[models]]
name = "{MODEL}"
targets = [{{ provider = "up", model = "bench-model" }}]
input_price_per_mtok = 0.15
output_price_per_mtok = 0.60

[[models]]
name = "{SLOW_MODEL}"
targets = [{{ provider = "slow", model = "bench-model" }}]
input_price_per_mtok = 0.15
output_price_per_mtok = 0.60
"""
    )
    return path


class Upstreams(NamedTuple):
    """The fast upstream (`tests/bench_servers.py`) and the slow one (`tests/bench_slow.py`)."""

    fast: Server
    slow: Server


def start_upstream(servers: Servers, log: Any, slow_chunks: int) -> Upstreams:
    """The fake upstreams, the slow one's streams `slow_chunks` chunks long."""
    python = [sys.executable, "-m", "tests.bench_servers"]
    up_port, slow_port = free_port(), free_port()
    fast = servers.start(
        "upstream", [*python, "upstream", "--port", str(up_port)],
        cwd=ROOT, port=up_port, output=log,
    )  # fmt: skip
    slow = servers.start(
        "slow",
        [*python, "slow", "--port", str(slow_port), "--slow-chunks", str(slow_chunks),
         "--slow-interval", str(INTERVAL)],
        cwd=ROOT, port=slow_port, output=log,
    )  # fmt: skip
    wait_tcp(fast)
    wait_tcp(slow)
    return Upstreams(fast, slow)


def start_gateway(servers: Servers, name: str, config: Path, cwd: Path, *extra: str) -> Server:
    port = free_port()
    return servers.start(
        name,
        [*gateway_command(), "serve", "--config", str(config), "--port", str(port), *extra],
        cwd=cwd, port=port, output=subprocess.DEVNULL,
    )  # fmt: skip


def _start(
    servers: Servers, tmp: Path, log: Any, slow_chunks: int
) -> tuple[Upstreams, Server, Server, str]:
    upstream = start_upstream(servers, log, slow_chunks)
    relay_port = free_port()
    relay = servers.start(
        "relay",
        [sys.executable, "-m", "tests.bench_servers", "relay", "--port", str(relay_port),
         "--upstream", upstream.fast.url, "--slow-upstream", upstream.slow.url],
        cwd=ROOT, port=relay_port, output=log,
    )  # fmt: skip
    wait_tcp(relay)
    config = write_config(tmp / "gateway.toml", upstream, str(tmp / "keys.db"))
    key = asyncio.run(create_key(str(tmp / "keys.db")))
    gateway = start_gateway(servers, "gateway", config, tmp)
    wait_http(gateway, "/healthz")
    return upstream, relay, gateway, key


async def create_key(database: str) -> str:
    """A key with limits and a budget it never reaches: admission runs on every request.
    `database`: a SQLite path or a PostgreSQL URL."""
    from gateway.database import opened_database

    async with opened_database(database) as store:
        _record, secret = await store.create_key(
            name="bench", models=[MODEL, SLOW_MODEL], **KEY_LIMITS
        )
    return secret


TARGETS = {
    "cpu_ratio": 1.5,
    "delay_p50_ms": 1.0,
    "delay_p99_ms": 30.0,
    "fresh_p99_ms": 30.0,
    "kib_per_stream": 40.0,
    "ttfb_p99_over_relay_ms": 50.0,
    "memory_growth_percent": 10.0,
}


def verdicts(figures: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    """(what, gateway figure, target, met) for each of issue #13's targets measured here."""
    out: list[tuple[str, str, str, bool]] = []
    streams = figures.get("streams")
    if streams:
        relay, gw = streams["relay"], streams["gateway"]
        ratio = gw["cpu_percent"] / max(relay["cpu_percent"], 0.1)
        out.append(("CPU vs relay", f"{ratio:.2f}x", "<= 1.5x", ratio <= TARGETS["cpu_ratio"]))
        for name, label in (
            ("delay_p50_ms", "added chunk delay p50"),
            ("delay_p99_ms", "added chunk delay p99"),
            ("fresh_p99_ms", "fresh request p99 under load"),
            ("kib_per_stream", "memory per open stream (KiB)"),
        ):
            value = gw[name]
            ok = value is not None and value <= TARGETS[name]
            out.append((label, f"{value}", f"<= {TARGETS[name]:g}", ok))
        out.append(("errors during long streams", str(gw["errors"]), "0", gw["errors"] == 0))
    ttfb = figures.get("ttfb")
    if ttfb:
        over = (ttfb["gateway"]["ttfb_p99_ms"] or 0) - (ttfb["relay"]["ttfb_p99_ms"] or 0)
        limit = TARGETS["ttfb_p99_over_relay_ms"]
        out.append(
            ("300 streams: TTFB p99 over relay (ms)", f"{over:.1f}", f"<= {limit:g}", over <= limit)
        )
    memory = figures.get("memory")
    if memory:
        growth = memory["growth_percent"]
        limit = TARGETS["memory_growth_percent"]
        out.append(
            (
                f"RSS growth over {memory['requests']} requests (%)",
                f"{growth}",
                f"<= {limit:g}",
                growth <= limit,
            )
        )
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_streams")
    parser.add_argument("--streams", type=int, default=200 if QUICK else 1000)
    parser.add_argument("--seconds", type=float, default=6.0 if QUICK else 12.0)
    parser.add_argument("--ttfb-streams", type=int, default=100 if QUICK else 300)
    parser.add_argument("--requests", type=int, default=10_000 if QUICK else 100_000)
    parser.add_argument(
        "--only", choices=("streams", "ttfb", "memory"), action="append",
        help="run only these scenarios (repeatable)",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["client"]:
        client_main(argv[1:])
        return 0
    args = parse_args(argv)
    only = set(args.only or ("streams", "ttfb", "memory"))
    servers = Servers()
    figures: dict[str, Any] = {"cores": os.cpu_count(), "load_before": os.getloadavg()[0]}
    slow_chunks = round(args.seconds / INTERVAL)
    try:
        with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "wb") as log:
            upstream, relay, gateway, key = _start(servers, Path(tmp), log, slow_chunks)
            sides = (relay, gateway)
            if "streams" in only:
                figures["streams"] = {
                    side.name: long_streams(
                        side, key, args.streams, args.seconds, upstream=upstream.slow
                    )
                    for side in sides
                }
            if "ttfb" in only:
                figures["ttfb"] = {
                    side.name: first_bytes(side, key, args.ttfb_streams) for side in sides
                }
            if "memory" in only:
                figures["memory"] = memory_flat(gateway, key, args.requests)
    finally:
        servers.stop_all()
    figures["load_after"] = os.getloadavg()[0]
    print(json.dumps({k: v for k, v in figures.items()}, indent=1))
    print("\nTargets (issue #13):")
    for what, value, target, ok in verdicts(figures):
        print(f"  {'met ' if ok else 'MISS'}  {what:44s} {value:>10s}  (target {target})")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
