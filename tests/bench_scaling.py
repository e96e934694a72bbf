"""The cost of scaling out: Redis-shared limits vs in-memory, and `--workers 2` vs one process.

    BENCH_SCALING=1 make bench                       # after the default bench
    .venv/bin/python -m tests.bench_scaling          # only this
    .venv/bin/python -m tests.bench_scaling --quick  # 10x fewer requests, a smoke run

Processes on 127.0.0.1, as in `tests/bench.py` (whose load generator, cells and report this
reuses): the fake upstream, a throw-away `redis-server` (skipped with a message when it is not
installed), and gateways on one temporary database:

* limits: the same key with rate, token, concurrency and budget limits it never reaches, on a
  gateway with in-memory limits against a gateway whose limits live in Redis: the cost per
  request of sharing them (two Redis round trips before the upstream call, one after);
* workers: a key without limits on one `gateway serve` process against `--workers 2` (both on
  Redis): the throughput two processes get from two cores (the machine's cores are shared with
  the load generator and the upstream, so this is a floor).

CPU per request is the gateway process's own; for `--workers 2` it is not measured (the work
is in the children). Exits 1 if a server does not start or a request fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from tests.bench import (
    HOST,
    ROOT,
    BenchError,
    Figures,
    Mode,
    Server,
    Servers,
    Side,
    _sigterm,
    create_key,
    free_port,
    gateway_command,
    measure_cell,
    print_table,
    wait_http,
    wait_tcp,
    write_config,
)
from tests.redis_server import REDIS_SERVER, RedisServer

__all__ = ["main"]

TITLES = {
    "limits": "Limits shared through Redis vs in memory (same key, same limits)",
    "workers": "gateway serve --workers 2 vs one process (limits in Redis)",
}


def _gateway(servers: Servers, tmp: Path, name: str, config: Path, db: Path, *extra: str) -> Server:
    port = free_port()
    argv = [*gateway_command(), "serve", "--config", str(config), "--db", str(db)]
    argv += ["--host", HOST, "--port", str(port), *extra]
    return servers.start(name, argv, cwd=tmp, port=port, output=subprocess.DEVNULL)


def _with_redis(config: Path, redis_url: str) -> Path:
    text = config.read_text().replace("[server]\n", f'[server]\nredis_url = "{redis_url}"\n', 1)
    shared = config.with_name("shared.toml")
    shared.write_text(text)
    return shared


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_scaling")
    parser.add_argument("--quick", action="store_true", help="10x fewer requests (smoke run)")
    parser.add_argument("--requests", type=int, default=4000, metavar="N", help="per cell")
    args = parser.parse_args(argv)
    if REDIS_SERVER is None:
        print("bench_scaling: redis-server is not installed; skipped", file=sys.stderr)
        return 0
    requests = max(32, args.requests // 10) if args.quick else args.requests
    signal.signal(signal.SIGTERM, _sigterm)
    servers = Servers()
    results: dict[str, list[tuple[Figures, Figures]]] = {}
    with tempfile.TemporaryDirectory(prefix="kiosk-bench-scaling-") as name:
        tmp = Path(name)
        redis = RedisServer(tmp, free_port()).start()
        try:
            port = free_port()
            py = [sys.executable, "-m", "tests.bench_servers"]
            upstream = servers.start(
                "upstream", [*py, "upstream", "--port", str(port)], cwd=ROOT, port=port,
                output=subprocess.DEVNULL,
            )  # fmt: skip
            config, db = tmp / "gateway.toml", tmp / "keys.db"
            write_config(config, upstream)
            shared = _with_redis(config, redis.url)
            key = asyncio.run(create_key(db))
            limited = asyncio.run(create_key(db, limited=True))
            memory = _gateway(servers, tmp, "memory", config, db)
            one = _gateway(servers, tmp, "redis", shared, db)
            two = _gateway(servers, tmp, "workers", shared, db, "--workers", "2")
            wait_tcp(upstream)
            for server in (memory, one, two):
                wait_http(server, "/healthz")
            cells: list[tuple[Mode, int]] = [("json", 1), ("json", 32), ("stream", 32)]
            comparisons = {
                "limits": (Side("memory", memory, key=limited), Side("redis", one, key=limited)),
                "workers": (Side("1 proc", one), Side("2 workers", two)),
            }

            async def run() -> None:
                for title, (base, subject) in comparisons.items():
                    print(f"{TITLES[title]}:", flush=True)
                    results[title] = [
                        await measure_cell(base, subject, key, mode, c, requests)
                        for mode, c in cells
                    ]

            started = time.monotonic()
            asyncio.run(run())
        except BenchError as exc:
            print(f"bench_scaling: {exc}", file=sys.stderr)
            return 1
        finally:
            servers.stop_all()
            redis.stop()
    print_table(
        results["limits"], TITLES["limits"], ("mem", "redis"),
        ("(latencies in ms; the same limited key; cpu/req = gateway process CPU per request)",),
    )  # fmt: skip
    print_table(
        results["workers"], TITLES["workers"], ("one", "two"),
        ("(latencies in ms; a key without limits; cpu/req of `two` is its idle parent's)",),
    )  # fmt: skip
    errors = sum(f.errors for cells in results.values() for pair in cells for f in pair)
    print(f"\n{errors} request errors; {time.monotonic() - started:.1f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
