"""The cost of scaling out (issue #16): replicas on PostgreSQL and Redis against one on SQLite.

    make bench                                        # runs this last (BENCH_SCALING=0: not)
    .venv/bin/python -m tests.bench_scaling           # only this
    .venv/bin/python -m tests.bench_scaling --quick   # smaller and shorter, a smoke run
    .venv/bin/python -m tests.bench_scaling --only replicas streams --json out.json

It needs PostgreSQL (initdb, pg_ctl) and redis-server installed; without them it prints why
and exits 0. Processes on 127.0.0.1: a throw-away PostgreSQL and Redis (temporary directories,
free ports, as the tests start them), the fake upstream of `tests/bench_servers.py`, and
`gateway serve` processes. Every gateway key has rate, token, concurrency and budget limits it
never reaches, so every request pays for admission and settlement (where they live is what is
measured), except in `workers`. Four comparisons (`--only`, default all):

* replicas: the throughput cells of `tests/bench.py` against ONE replica on SQLite with limits
  in memory and TWO replicas (two processes, two ports) sharing one PostgreSQL and one Redis,
  the load client sending requests round robin over both;
* streams: the long-streams scenario of `tests/bench_streams.py` (`--streams` streams of
  chunks 100 ms apart for `--seconds`, its load client in a process of its own) against the
  same two sides, the streams split over the two replicas;
* limits: one process, one SQLite file, limits in memory against limits in Redis: the cost
  per request of sharing them, without PostgreSQL or a second process in the figures;
* workers: a key without limits on one `gateway serve` process against `--workers 2` (both
  with Redis): the throughput two processes get (the machine's cores are shared with the
  load generator and the upstream, so this is a floor).

* gate: the limits alone, in this process: a limited request's admit, hold, settle and leave
  through the in-memory gate and through the Redis-shared one, one at a time and 32 at once.
  Its CPU per request is the least noisy figure of the cost of sharing limits.

CPU per request is the sum over a side's gateway processes (not Redis's or PostgreSQL's);
for `--workers 2` the work is in its children, which /proc does not count in the parent until
they exit, so it is not shown. Exits 1 if a server does not start or a request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tests.bench import (
    BenchError,
    Figures,
    Mode,
    Server,
    Servers,
    Side,
    _sigterm,
    create_key as create_open_key,
    measure_cell,
    print_table,
    wait_http,
)
from tests.bench_gate import gate_cost
from tests.bench_streams import (
    INTERVAL,
    create_key,
    long_streams,
    start_gateway,
    start_upstream,
    write_config,
)

__all__ = ["main"]

COMPARISONS = ("gate", "replicas", "streams", "limits", "workers")
TITLES = {
    "replicas": "Two replicas on PostgreSQL + Redis vs one on SQLite (limits in memory)",
    "limits": "Limits shared through Redis vs in memory (one process, same key, same limits)",
    "workers": "gateway serve --workers 2 vs one process (limits in Redis, a key without)",
}
NOTES = {
    "replicas": (
        "(latencies in ms; the same limits on both sides; cpu/req = CPU of the side's gateway",
        " processes per request, summed over the two replicas; Redis and PostgreSQL not counted)",
    ),
    "limits": ("(latencies in ms; the same limited key; cpu/req = gateway CPU per request)",),
    "workers": ("(latencies in ms; cpu/req of `two` is its idle parent's, so not shown)",),
}
CELLS: list[tuple[Mode, int]] = [("json", 1), ("json", 32), ("stream", 32)]


def missing_servers() -> str | None:
    """Why this bench cannot run here, or None."""
    from tests.pg import find_pg_bin
    from tests.redis_server import REDIS_SERVER

    if REDIS_SERVER is None:
        return "redis-server is not installed (apt-get install redis-server)"
    if find_pg_bin() is None:
        return "PostgreSQL is not installed (no initdb/pg_ctl; apt-get install postgresql)"
    return None


def _backends(stack: contextlib.ExitStack, tmp: Path) -> tuple[str, str]:
    """A throw-away Redis and PostgreSQL, stopped and deleted when `stack` closes: their URLs."""
    from tests.bench import free_port
    from tests.pg import PgServer, find_pg_bin
    from tests.redis_server import RedisServer

    bin_dir = find_pg_bin()
    assert bin_dir is not None
    redis = RedisServer(tmp, free_port())
    stack.callback(redis.stop)
    redis.start()
    pg = PgServer(bin_dir)
    stack.callback(pg.destroy)
    pg.start()
    return redis.url, pg.admin_url  # the server is ours alone: its default database will do


GATE_REQUESTS = 5000


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    quick = os.environ.get("BENCH_QUICK") == "1"
    parser = argparse.ArgumentParser(prog="python -m tests.bench_scaling")
    parser.add_argument("--quick", action="store_true", default=quick, help="a smoke run")
    parser.add_argument("--requests", type=int, metavar="N", help="per side and cell (4000)")
    parser.add_argument("--streams", type=int, metavar="N", help="long streams (1000)")
    parser.add_argument("--seconds", type=float, metavar="S", help="stream length (12)")
    parser.add_argument("--only", nargs="+", choices=COMPARISONS, default=list(COMPARISONS))
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the figures here")
    args = parser.parse_args(argv)
    args.requests = args.requests or (400 if args.quick else 4000)
    args.streams = args.streams or (200 if args.quick else 1000)
    args.seconds = args.seconds or (6.0 if args.quick else 12.0)
    return args


def _shared(redis_url: str) -> str:
    return f'redis_url = "{redis_url}"'


def run(args: argparse.Namespace, tmp: Path, servers: Servers) -> dict[str, Any]:
    """Start what the comparisons need, run them, return their figures."""
    only = set(args.only)
    with contextlib.ExitStack() as stack:
        redis_url, pg = _backends(stack, tmp)
        stack.callback(servers.stop_all)  # the gateways stop before Redis and PostgreSQL
        upstream = start_upstream(servers, subprocess.DEVNULL, round(args.seconds / INTERVAL))
        sqlite = str(tmp / "keys.db")
        redis = _shared(redis_url)
        memory_toml = write_config(tmp / "memory.toml", upstream, sqlite)
        redis_toml = write_config(tmp / "redis.toml", upstream, sqlite, redis)
        pg_toml = write_config(tmp / "pg.toml", upstream, pg, redis)
        key = asyncio.run(create_key(sqlite))
        open_key = asyncio.run(create_open_key(Path(sqlite)))
        pg_key = asyncio.run(create_key(pg))
        single = start_gateway(servers, "sqlite", memory_toml, tmp)
        started: list[Server] = [single]
        if only & {"replicas", "streams"}:
            a = start_gateway(servers, "pg-a", pg_toml, tmp)
            b = start_gateway(servers, "pg-b", pg_toml, tmp)
            started += [a, b]
        if only & {"limits", "workers"}:
            one = start_gateway(servers, "redis", redis_toml, tmp)
            started.append(one)
        if "workers" in only:
            two = start_gateway(servers, "workers", redis_toml, tmp, "--workers", "2")
            started.append(two)
        for server in started:
            wait_http(server, "/healthz")
        figures: dict[str, Any] = {}
        if "gate" in only:
            print("The limits alone (in memory, in Redis):", flush=True)
            requests = GATE_REQUESTS // 10 if args.quick else GATE_REQUESTS
            figures["gate"] = asyncio.run(gate_cost(str(tmp / "gate.db"), redis_url, requests))
        comparisons: dict[str, tuple[Side, Side]] = {}
        if "replicas" in only:
            comparisons["replicas"] = (
                Side("1 sqlite", single, key=key),
                Side("2 pg", a, key=pg_key, more=(b,)),
            )
        if "limits" in only:
            comparisons["limits"] = (Side("memory", single, key=key), Side("redis", one, key=key))
        if "workers" in only:
            comparisons["workers"] = (Side("1 proc", one), Side("2 workers", two))

        async def cells() -> None:
            for name, (base, subject) in comparisons.items():
                print(f"{TITLES[name]}:", flush=True)
                figures[name] = [
                    await measure_cell(base, subject, open_key, mode, c, args.requests)
                    for mode, c in CELLS
                ]

        asyncio.run(cells())
        if "streams" in only:
            print(f"Long streams: {args.streams} x {args.seconds:g} s, one replica, then two:")
            figures["streams"] = {
                "1 sqlite": long_streams(single, key, args.streams, args.seconds),
                "2 pg": long_streams(a, pg_key, args.streams, args.seconds, more=(b,)),
            }
    return figures


def report(figures: dict[str, Any]) -> int:
    """Print the tables; the number of failed requests."""
    errors = 0
    for name in ("replicas", "limits", "workers"):
        if name in figures:
            pairs: list[tuple[Figures, Figures]] = figures[name]
            if name == "workers":
                for _, two in pairs:
                    two.server_cpu_us_per_req = None  # its parent's only (see the docstring)
            heads = {"replicas": ("one", "two"), "limits": ("mem", "redis")}
            print_table(pairs, TITLES[name], heads.get(name, ("one", "two")), NOTES[name])
            errors += sum(f.errors for pair in pairs for f in pair)
    gate = figures.get("gate")
    if gate:
        print("\nThe limits alone: a limited request's admit, hold, settle, leave (this process)")
        for cell, row in gate.items():
            print(f"  {cell:<12} {row['cpu_us']:8.1f} us CPU/request   p50 {row['p50_ms']:.3f} ms")
    streams = figures.get("streams")
    if streams:
        print(f"\nLong streams ({next(iter(streams.values()))['streams']} streams, chunks 100 ms)")
        fields = ("cpu_percent", "delay_p50_ms", "delay_p99_ms", "fresh_p50_ms", "fresh_p99_ms",
                  "kib_per_stream", "errors")  # fmt: skip
        print(f"{'side':<9}" + "".join(f"{f:>15}" for f in fields))
        for side, row in streams.items():
            print(f"{side:<9}" + "".join(f"{row[f]!s:>15}" for f in fields))
            errors += row["errors"]
        print("(cpu_percent: the side's gateway processes while every stream is open, summed)")
    return errors


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    missing = missing_servers()
    if missing is not None:
        print(f"bench_scaling: skipped: {missing}", file=sys.stderr)
        return 0
    signal.signal(signal.SIGTERM, _sigterm)
    servers = Servers()
    started = time.monotonic()
    load = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory(prefix="kiosk-bench-scaling-") as name:
            try:
                figures = run(args, Path(name), servers)
            finally:
                servers.stop_all()
    except BenchError as exc:
        print(f"bench_scaling: {exc}", file=sys.stderr)
        return 1
    errors = report(figures)
    print(
        f"\n{errors} request errors; {time.monotonic() - started:.1f} s; load average "
        f"{load:.2f} before, {os.getloadavg()[0]:.2f} after ({os.cpu_count()} cores)"
    )
    if args.json:
        raw = {
            name: [[asdict(x), asdict(y)] for x, y in value] if name in TITLES else value
            for name, value in figures.items()
        }
        args.json.write_text(json.dumps(raw, indent=1))
    return 1 if errors else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
