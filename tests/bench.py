"""Gateway overhead: vs a bare aiohttp relay; Anthropic translation and key limits, in-process.

    make bench                                  # or: .venv/bin/python -m tests.bench
    .venv/bin/python -m tests.bench --quick     # 10x fewer requests, a smoke run
    .venv/bin/python -m tests.bench --requests 500 --json bench.json
    .venv/bin/python -m tests.bench --compare anthropic     # only the translation cells

Three subprocesses on 127.0.0.1: the fake upstream and the relay (`tests/bench_servers.py`) and
`gateway serve` with a temporary config and database holding real virtual keys. The upstream
answers OpenAI's `/v1/chat/completions` and Anthropic's `/v1/messages` from precomputed bytes, with
the same text and a similar number of stream events. The gateway serves model `bench` through an
`openai` provider (pass-through) and model `bench-anthropic` through an `anthropic` provider
(request, answer and SSE stream translated), and the key may use both. The load generator runs
here, with one aiohttp `ClientSession` per side and cell (connector limit = concurrency), and
sends the same OpenAI chat request to every side but for its model.

Three comparisons (`--compare`, default all), each over every (mode, concurrency) cell:

* relay: the relay against the gateway's `bench`, the gateway's whole overhead;
* anthropic: the gateway's `bench-anthropic` against its `bench`, same process, the cost of the
  Anthropic translation over the OpenAI pass-through;
* limits: a key with rate, token, concurrency and budget limits it never reaches against a key
  without any, same process and model, the cost of admission and settlement.

Every cell warms both sides up, then loads them in alternating rounds (A, B, B, A, ...) so drift
in machine load hits both alike. Stream latency is the whole response; time to first byte is
reported too, and so is each server process's CPU time per request (from /proc).

Targets (relay cells): gateway throughput >= 0.8 x relay in every cell, and gateway p50 at
concurrency 1 within 0.15 ms of the relay's. The relay runs on uvloop with no connection limit,
as the gateway does (`tests/bench_servers.py`), so the ratio is against the fastest floor.
The anthropic cells have no target: translation throughput >= 0.8 x pass-through is printed as
information; the limits cells are reported.
Missing a target still exits 0 (this is a measurement); a server that does not start, or any
request that errors (in any cell: JSON must be a `chat.completion`, a stream must end with
`data: [DONE]`), exits 1. The gateway's output goes to /dev/null (its per-request log line is
part of its cost) unless `--gateway-log FILE`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import itertools
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any, Literal

import aiohttp

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0
REQUEST_TIMEOUT = 30.0
MODEL = "bench"
ANTHROPIC_MODEL = "bench-anthropic"
# Spelled as vendors spell keys: one named after the model ("bench...") would make every
# event's `"model":"bench"` a string that ends with the key's start, which the cut-key
# redaction holds back and decodes (`providers/_secrets.py`), a cost no real stream pays.
UPSTREAM_KEY = "sk-bench-upstream-0123456789"
THROUGHPUT_TARGET = 0.8  # gateway rps / relay rps, every cell
P50_TARGET_MS = 0.15  # gateway p50 - relay p50 at concurrency 1 (issue #13)
TRANSLATION_INFO = 0.8  # anthropic rps / openai rps, every cell: information, not a target
DEFAULT_REQUESTS = {1: 10000, 32: 20000}
ROUNDS = 4  # each cell alternates its two sides this many times
MAX_ERRORS_SHOWN = 5

Mode = Literal["json", "stream"]
MODES: tuple[Mode, ...] = ("json", "stream")
Comparison = Literal["relay", "anthropic", "limits"]
COMPARISONS: tuple[Comparison, ...] = ("relay", "anthropic", "limits")
TITLES: dict[Comparison, str] = {
    "relay": "Gateway vs bare relay (same upstream)",
    "anthropic": "Anthropic translation vs OpenAI pass-through (same gateway)",
    "limits": "Key with rate limits and a budget vs key without (same gateway)",
}

_MESSAGES = [
    {"role": "system", "content": "You are a concise assistant. Answer in one sentence."},
    {"role": "user", "content": "In one sentence, what does an LLM API gateway do?"},
]


def request_body(mode: Mode, model: str = MODEL) -> bytes:
    body: dict[str, Any] = {"model": model, "messages": _MESSAGES, "max_tokens": 64}
    if mode == "stream":
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


class BenchError(Exception):
    """A server did not start, or the run cannot go on; exits 1."""


# --- subprocesses ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def cpu_seconds(self) -> float | None:
        """User + system CPU time the process has used so far (Linux /proc), or None."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Servers:
    """Owns every subprocess it starts; `stop_all()` ends them, however the run ends."""

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def start(
        self, name: str, argv: Sequence[str], *, cwd: Path, port: int, output: IO[bytes] | int
    ) -> Server:
        proc = subprocess.Popen(  # noqa: S603 - our own interpreter and entry points
            list(argv),
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=output,
            # Own process group: a terminal Ctrl-C reaches only us, and we stop them in order.
            start_new_session=True,
        )
        server = Server(name, port, proc)
        self._servers.append(server)
        return server

    def stop_all(self) -> None:
        for server in reversed(self._servers):
            if server.proc.poll() is None:
                server.proc.terminate()
        for server in reversed(self._servers):
            try:
                server.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(timeout=STOP_TIMEOUT)
        self._servers.clear()


def _deadline_loop(server: Server, timeout: float) -> Iterator[None]:
    """Yields until `timeout`; raises if the process exits or the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code = server.proc.poll()
        if code is not None:
            raise BenchError(f"{server.name} exited with status {code} before it was ready")
        yield
        time.sleep(0.02)
    raise BenchError(f"{server.name} was not ready on port {server.port} within {timeout:.0f} s")


def wait_tcp(server: Server, timeout: float = START_TIMEOUT) -> None:
    for _ in _deadline_loop(server, timeout):
        with contextlib.suppress(OSError), socket.create_connection((HOST, server.port), 0.5):
            return


def wait_http(server: Server, path: str, timeout: float = START_TIMEOUT) -> None:
    for _ in _deadline_loop(server, timeout):
        conn = http.client.HTTPConnection(HOST, server.port, timeout=0.5)
        try:
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()


def gateway_command() -> list[str]:
    script = Path(sys.executable).with_name("gateway")
    return [str(script)] if script.exists() else [sys.executable, "-m", "gateway"]


def write_config(path: Path, upstream: Server, *, metrics: bool = True) -> None:
    path.write_text(
        f"""\
[server]
log_level = "info"
default_model = "{MODEL}"

[metrics]
enabled = {"true" if metrics else "false"}

[[providers]]
name = "up"
type = "openai"
base_url = "{upstream.url}/v1"
api_keys = ["{UPSTREAM_KEY}"]

[[providers]]
name = "ant"
type = "anthropic"
base_url = "{upstream.url}"
api_keys = ["{UPSTREAM_KEY}"]

[[models]]
name = "{MODEL}"
targets = [{{ provider = "up", model = "bench-model" }}]
input_price_per_mtok = 0.15  # a price: the limits key has a USD budget
output_price_per_mtok = 0.60

[[models]]
name = "{ANTHROPIC_MODEL}"
targets = [{{ provider = "ant", model = "claude-bench" }}]
input_price_per_mtok = 3.0
output_price_per_mtok = 15.0
"""
    )


# The "limits" comparison's key: limits and a budget far above what a run uses, so every
# request pays for admission (rate buckets, budget hold, settlement, x-ratelimit headers) but
# none is refused.
KEY_LIMITS: dict[str, Any] = {
    "rpm": 10**9,
    "tpm": 10**12,
    "max_concurrency": 10_000,
    "budget_tokens": 10**12,
    "budget_usd": 10.0**9,
    "budget_period": "month",
}


async def create_key(db: Path, limited: bool = False) -> str:
    """A real virtual key in the gateway's database; returns its secret."""
    from gateway.store import Store

    store = await Store.open(str(db))
    try:
        _record, secret = await store.create_key(
            name="bench", models=[MODEL, ANTHROPIC_MODEL], **(KEY_LIMITS if limited else {})
        )
    finally:
        await store.close()
    return secret


# --- load ------------------------------------------------------------------------------------


@dataclass
class Samples:
    latencies: list[float] = field(default_factory=list)
    ttfbs: list[float] = field(default_factory=list)
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)

    def error(self, message: str) -> None:
        self.errors += 1
        if len(self.error_examples) < MAX_ERRORS_SHOWN:
            self.error_examples.append(message)


async def one_request(
    session: aiohttp.ClientSession, url: str, body: bytes, mode: Mode, samples: Samples
) -> None:
    start = time.perf_counter()
    try:
        async with session.post(url, data=body) as resp:
            if mode == "json":
                data = await resp.read()
                ok = b'"chat.completion"' in data
            else:
                ttfb: float | None = None
                tail = b""
                async for chunk in resp.content.iter_any():
                    if ttfb is None:
                        ttfb = time.perf_counter() - start
                    tail = (tail + chunk)[-32:]
                data = tail
                ok = tail.endswith(b"data: [DONE]\n\n")
                if ttfb is not None:
                    samples.ttfbs.append(ttfb)
            elapsed = time.perf_counter() - start
            if resp.status != 200:
                samples.error(f"HTTP {resp.status}: {data[:300]!r}")
            elif not ok:
                samples.error(f"incomplete body: ...{data[-200:]!r}")
            else:
                samples.latencies.append(elapsed)
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        samples.error(f"{type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Side:
    """One side of a comparison: its name in the report, the server, and the model it asks for."""

    label: str
    server: Server
    model: str = MODEL
    key: str | None = None  # the comparison's own virtual key, else the run's
    more: tuple[Server, ...] = ()  # further replicas: requests go round robin over all

    @property
    def servers(self) -> tuple[Server, ...]:
        return (self.server, *self.more)


class Client:
    """One side of a cell: a session (connector limit = concurrency) and its samples."""

    def __init__(self, side: Side, key: str, mode: Mode, concurrency: int) -> None:
        self.label = side.label
        self.servers = side.servers
        self.mode = mode
        self.concurrency = concurrency
        self.urls = itertools.cycle([f"{s.url}/v1/chat/completions" for s in self.servers])
        self.body = request_body(mode, side.model)
        self.samples = Samples()
        self.wall = 0.0
        self.cpu: float | None = 0.0
        secret = side.key or key
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            headers={"Authorization": f"Bearer {secret}", "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )

    async def warm_up(self, requests: int) -> None:
        """Unmeasured requests, `concurrency` at a time: opens the pool, warms both processes."""
        warm = Samples()
        for _ in range(max(1, requests // self.concurrency)):
            await asyncio.gather(
                *(
                    one_request(self.session, next(self.urls), self.body, self.mode, warm)
                    for _ in range(self.concurrency)
                )
            )
        self.samples.errors += warm.errors
        self.samples.error_examples += warm.error_examples

    async def run(self, requests: int) -> None:
        """`requests` measured requests from `concurrency` workers; adds wall and CPU time."""
        remaining = requests

        async def worker() -> None:
            nonlocal remaining
            while remaining > 0:
                remaining -= 1
                url = next(self.urls)
                await one_request(self.session, url, self.body, self.mode, self.samples)

        cpu_before = cpu_seconds(self.servers)
        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        self.wall += time.perf_counter() - start
        cpu_after = cpu_seconds(self.servers)
        if self.cpu is not None and cpu_before is not None and cpu_after is not None:
            self.cpu += cpu_after - cpu_before
        else:
            self.cpu = None

    def figures(self) -> Figures:
        return Figures.of(
            self.label, self.mode, self.concurrency, self.samples, self.wall, self.cpu
        )

    async def close(self) -> None:
        await self.session.close()


def cpu_seconds(servers: Sequence[Server]) -> float | None:
    """The CPU time every one of `servers` has used so far, or None if one cannot tell."""
    times = [server.cpu_seconds() for server in servers]
    return None if None in times else sum(t for t in times if t is not None)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values; nan when empty."""
    if not sorted_values:
        return float("nan")
    rank = math.ceil(q / 100 * len(sorted_values)) - 1
    return sorted_values[max(0, min(len(sorted_values) - 1, rank))]


@dataclass
class Figures:
    server: str  # the side's label: relay, gateway (relay cells), openai, anthropic
    mode: Mode
    concurrency: int
    requests: int
    ok: int
    errors: int
    seconds: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    ttfb_p50_ms: float | None
    ttfb_p99_ms: float | None
    server_cpu_us_per_req: float | None
    error_examples: list[str]

    @classmethod
    def of(
        cls,
        server: str,
        mode: Mode,
        concurrency: int,
        samples: Samples,
        wall: float,
        cpu: float | None,
    ) -> Figures:
        lat = sorted(samples.latencies)
        ttfb = sorted(samples.ttfbs)
        done = len(lat) + samples.errors

        def ms(q: float, values: Sequence[float] = lat) -> float:
            return percentile(values, q) * 1000

        return cls(
            server=server,
            mode=mode,
            concurrency=concurrency,
            requests=done,
            ok=len(lat),
            errors=samples.errors,
            seconds=wall,
            rps=len(lat) / wall if wall > 0 else 0.0,
            p50_ms=ms(50),
            p90_ms=ms(90),
            p99_ms=ms(99),
            max_ms=lat[-1] * 1000 if lat else float("nan"),
            mean_ms=sum(lat) / len(lat) * 1000 if lat else float("nan"),
            ttfb_p50_ms=ms(50, ttfb) if mode == "stream" else None,
            ttfb_p99_ms=ms(99, ttfb) if mode == "stream" else None,
            server_cpu_us_per_req=cpu / len(lat) * 1e6 if cpu is not None and lat else None,
            error_examples=samples.error_examples,
        )


async def measure_cell(
    base: Side, subject: Side, key: str, mode: Mode, concurrency: int, requests: int
) -> tuple[Figures, Figures]:
    """Both sides in alternating rounds (base, subject, subject, base, ...) so drift in machine
    load hits both alike; each gets its own warm pool for the whole cell."""
    clients = [Client(s, key, mode, concurrency) for s in (base, subject)]
    try:
        warmup = min(max(requests // 10, concurrency), 200)
        for client in clients:
            await client.warm_up(warmup)
        for i in range(ROUNDS):
            share = requests // ROUNDS + (1 if i < requests % ROUNDS else 0)
            for client in clients if i % 2 == 0 else reversed(clients):
                await client.run(share)
    finally:
        for client in clients:
            await client.close()
    pair = (clients[0].figures(), clients[1].figures())
    for f in pair:
        print(
            f"  {f.server:<9} {mode:<6} c={concurrency:<3} {f.ok:>6} ok {f.errors:>4} err "
            f"{f.rps:8.0f} rps  p50 {f.p50_ms:6.2f} ms  p99 {f.p99_ms:6.2f} ms",
            flush=True,
        )
    return pair


# --- report ----------------------------------------------------------------------------------


def print_table(
    pairs: list[tuple[Figures, Figures]],
    title: str,
    names: tuple[str, str] = ("relay", "gw"),
    notes: Sequence[str] = (
        "(latencies in ms; Δp50 = gateway - relay; cpu/req = server process CPU per request)",
    ),
) -> None:
    """One row per cell: base and subject side by side (`names` head their columns)."""
    a, b = names

    def cols(*heads: str) -> str:
        return " ".join(h.rjust(max(len(h), 8)) for h in heads)

    def col(head: str, value: float | None, spec: str = ".2f", unit: str = "") -> str:
        text = f"{value:{spec}}{unit}" if value is not None else "-"
        return text.rjust(max(len(head), 8))

    header = (
        f"{'mode':<6} {'conc':>4} | {cols(f'{a} rps', f'{b} rps')} {'ratio':>6} | "
        f"{cols(f'{a} p50', f'{a} p99', f'{b} p50', f'{b} p99')} {'Δp50':>7} | "
        f"{cols(f'{a} ttfb50', f'{b} ttfb50')} | {cols(f'{a} cpu/req', f'{b} cpu/req')}"
    )
    print()
    print(title)
    print(header)
    print("-" * len(header))
    for x, y in pairs:
        ratio = y.rps / x.rps if x.rps else float("nan")
        print(
            f"{x.mode:<6} {x.concurrency:>4} | {col(f'{a} rps', x.rps, '.0f')} "
            f"{col(f'{b} rps', y.rps, '.0f')} {ratio:6.2f} | {col(f'{a} p50', x.p50_ms)} "
            f"{col(f'{a} p99', x.p99_ms)} {col(f'{b} p50', y.p50_ms)} "
            f"{col(f'{b} p99', y.p99_ms)} {y.p50_ms - x.p50_ms:+7.2f} | "
            f"{col(f'{a} ttfb50', x.ttfb_p50_ms)} {col(f'{b} ttfb50', y.ttfb_p50_ms)} | "
            f"{col(f'{a} cpu/req', x.server_cpu_us_per_req, unit='us')} "
            f"{col(f'{b} cpu/req', y.server_cpu_us_per_req, unit='us')}"
        )
    for note in notes:
        print(note)


def evaluate_targets(pairs: list[tuple[Figures, Figures]]) -> list[dict[str, Any]]:
    targets: list[dict[str, Any]] = []
    for relay, gw in pairs:
        ratio = gw.rps / relay.rps if relay.rps else 0.0
        targets.append(
            {
                "target": f"throughput {relay.mode} c={relay.concurrency}: "
                f"gateway >= {THROUGHPUT_TARGET} x relay",
                "value": f"{ratio:.3f} x",
                "pass": ratio >= THROUGHPUT_TARGET,
            }
        )
    for relay, gw in pairs:
        if relay.concurrency == 1:
            diff = gw.p50_ms - relay.p50_ms
            targets.append(
                {
                    "target": f"p50 {relay.mode} c=1: gateway within {P50_TARGET_MS} ms of relay",
                    "value": f"{diff:+.3f} ms",
                    "pass": diff <= P50_TARGET_MS,
                }
            )
    print()
    print("Targets:")
    for t in targets:
        print(f"  {'PASS' if t['pass'] else 'FAIL'}  {t['target']}  ({t['value']})")
    return targets


def translation_info(pairs: list[tuple[Figures, Figures]]) -> list[dict[str, Any]]:
    """Anthropic vs OpenAI throughput per cell, against a soft bar that fails nothing."""
    info: list[dict[str, Any]] = []
    for oai, ant in pairs:
        ratio = ant.rps / oai.rps if oai.rps else 0.0
        info.append(
            {
                "target": f"throughput {oai.mode} c={oai.concurrency}: "
                f"anthropic >= {TRANSLATION_INFO} x openai pass-through",
                "value": f"{ratio:.3f} x",
                "met": ratio >= TRANSLATION_INFO,
            }
        )
    print()
    print("Anthropic translation (information, not a target):")
    for t in info:
        print(f"  {'ok ' if t['met'] else 'LOW'}  {t['target']}  ({t['value']})")
    return info


# --- main ------------------------------------------------------------------------------------


async def bench(
    comparisons: dict[Comparison, tuple[Side, Side]], key: str, plan: list[tuple[Mode, int, int]]
) -> dict[Comparison, list[tuple[Figures, Figures]]]:
    """Every cell of the plan for each comparison in turn; (base, subject) figures per cell."""
    results: dict[Comparison, list[tuple[Figures, Figures]]] = {}
    for name, (base, subject) in comparisons.items():
        print(f"{TITLES[name]}:", flush=True)
        results[name] = [
            await measure_cell(base, subject, key, mode, concurrency, requests)
            for mode, concurrency, requests in plan
        ]
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="10x fewer requests (smoke run)")
    parser.add_argument("--requests", type=int, metavar="N", help="requests per cell (all cells)")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 32], metavar="C", help="default: 1 32"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--compare",
        nargs="+",
        choices=COMPARISONS,
        default=list(COMPARISONS),
        help="relay: gateway vs relay; anthropic: Anthropic translation vs OpenAI pass-through; "
        "limits: a limited key vs an unlimited one (default: all)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write the raw figures here")
    parser.add_argument(
        "--metrics",
        choices=("on", "off"),
        default="on",
        help="the gateway's Prometheus metrics (default: on, as `gateway serve` runs)",
    )
    parser.add_argument(
        "--gateway-log", type=Path, metavar="FILE", help="keep the gateway's stdout/stderr here"
    )
    args = parser.parse_args(argv)
    if args.requests is not None and args.requests < 1:
        parser.error("--requests must be at least 1")
    if any(c < 1 for c in args.concurrency):
        parser.error("--concurrency must be at least 1")
    return args


def make_plan(args: argparse.Namespace) -> list[tuple[Mode, int, int]]:
    plan: list[tuple[Mode, int, int]] = []
    for mode in args.modes:
        for c in args.concurrency:
            n = args.requests or DEFAULT_REQUESTS.get(c, 4000)
            if args.quick:
                n = max(c, n // 10)
            plan.append((mode, c, n))
    return plan


def _sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    plan = make_plan(args)
    signal.signal(signal.SIGTERM, _sigterm)
    servers = Servers()
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kiosk-bench-")))
        log: IO[bytes] | int = subprocess.DEVNULL
        if args.gateway_log:
            log = stack.enter_context(args.gateway_log.open("wb"))
        try:
            py = [sys.executable, "-m", "tests.bench_servers"]
            port = free_port()
            upstream = servers.start(
                "upstream",
                [*py, "upstream", "--port", str(port)],
                cwd=ROOT,
                port=port,
                output=subprocess.DEVNULL,
            )
            relay: Server | None = None
            if "relay" in args.compare:
                port = free_port()
                relay = servers.start(
                    "relay",
                    [*py, "relay", "--port", str(port), "--upstream", upstream.url],
                    cwd=ROOT,
                    port=port,
                    output=subprocess.DEVNULL,
                )
            config, db = tmp / "gateway.toml", tmp / "keys.db"
            write_config(config, upstream, metrics=args.metrics == "on")
            key = asyncio.run(create_key(db))
            limited_key = asyncio.run(create_key(db, limited=True))
            port = free_port()
            gateway = servers.start(
                "gateway",
                [
                    *gateway_command(),
                    "serve",
                    "--config",
                    str(config),
                    "--db",
                    str(db),
                    "--host",
                    HOST,
                    "--port",
                    str(port),
                ],
                cwd=tmp,
                port=port,
                output=log,
            )
            wait_tcp(upstream)
            if relay is not None:
                wait_tcp(relay)
            try:
                wait_http(gateway, "/healthz")
            except BenchError as exc:
                hint = "" if args.gateway_log else " (rerun with --gateway-log FILE to see why)"
                raise BenchError(f"{exc}{hint}") from None
            print(
                f"servers ready in {time.monotonic() - started:.1f} s: upstream {upstream.url}, "
                + (f"relay {relay.url}, " if relay is not None else "")
                + f"gateway {gateway.url}",
                flush=True,
            )
            comparisons: dict[Comparison, tuple[Side, Side]] = {}
            if relay is not None:
                comparisons["relay"] = (Side("relay", relay), Side("gateway", gateway))
            if "anthropic" in args.compare:
                comparisons["anthropic"] = (
                    Side("openai", gateway),
                    Side("anthropic", gateway, ANTHROPIC_MODEL),
                )
            if "limits" in args.compare:
                comparisons["limits"] = (
                    Side("open", gateway),
                    Side("limited", gateway, key=limited_key),
                )
            results = asyncio.run(bench(comparisons, key, plan))
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130
        finally:
            servers.stop_all()

    pairs = results.get("relay", [])
    translated = results.get("anthropic", [])
    limited = results.get("limits", [])
    if pairs:
        print_table(pairs, TITLES["relay"])
    if translated:
        print_table(
            translated,
            TITLES["anthropic"],
            ("oai", "ant"),
            (
                f"(latencies in ms; oai = model {MODEL}, OpenAI pass-through; ant = model "
                f"{ANTHROPIC_MODEL}, Anthropic translation;",
                " Δp50 = ant - oai; cpu/req = gateway process CPU per request)",
            ),
        )
    if limited:
        print_table(
            limited,
            TITLES["limits"],
            ("open", "lim"),
            (
                "(latencies in ms; open = a key without limits; lim = a key with rpm, tpm,",
                " concurrency and budget limits it never reaches; cpu/req = gateway CPU/request)",
            ),
        )
    targets = evaluate_targets(pairs) if pairs else []
    info = translation_info(translated) if translated else []
    errors = sum(f.errors for cells in results.values() for pair in cells for f in pair)
    print(f"\n{errors} request errors; total time {time.monotonic() - started:.1f} s")
    for cells in results.values():
        for pair in cells:
            for f in pair:
                for example in f.error_examples:
                    print(f"  {f.server} {f.mode} c={f.concurrency}: {example}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "plan": [list(p) for p in plan],
                    "cells": [[asdict(r), asdict(g)] for r, g in pairs],
                    "targets": targets,
                    "anthropic": {
                        "cells": [[asdict(o), asdict(a)] for o, a in translated],
                        "info": info,
                    },
                    "limits": {"cells": [[asdict(o), asdict(x)] for o, x in limited]},
                    "errors": errors,
                },
                indent=2,
            )
        )
        print(f"raw figures written to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
