"""Machine instructions per request, counted under callgrind: an A/B measure that holds still.

    .venv/bin/python -m tests.bench_instructions      # JSON and stream, gateway and relay
    .venv/bin/python -m tests.bench_instructions --mode stream --side gateway --requests 1000

Timings on a shared 2-core VM move by half between runs of the same code; the instructions a
process executes for the same requests do not (runs agree within about 1 %). This starts the
fake upstream (`tests/bench_servers.py`) and, under `valgrind --tool=callgrind` with
instrumentation off, either `gateway serve` (a temporary config and database, as `make bench`
makes them) or the bare relay. After a warm-up it switches instrumentation on
(`callgrind_control`), sends the measured requests one at a time, switches it off, and prints
the instructions per request. Every measured request must succeed. Python's hash seed is fixed
(`PYTHONHASHSEED=0`), so dictionary layouts are the same on every run.

The count includes the work after each answer (usage row, metrics, log line) and the usage
writer's SQLite batches, whose size depends on how fast the process runs under valgrind: a few
thousand instructions of noise per request; `--without-usage-writes` leaves them out (the rows
are held until the gateway stops, uncounted). Needs valgrind (`apt-get install valgrind`); not
part of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tests import bench
from tests.bench import HOST, ROOT, Client, Server, Servers, Side, create_key, free_port

__all__ = ["main"]

VALGRIND_START_TIMEOUT = 300.0  # imports under valgrind take tens of seconds


def _callgrind(out: Path) -> list[str]:
    return ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]


def _total(out: Path) -> int:
    """The instructions counted in a callgrind output file (its `totals:` line)."""
    for line in out.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise bench.BenchError(f"no totals in {out}")


def _toggle(server: Server, on: bool) -> None:
    control = shutil.which("callgrind_control") or "callgrind_control"
    subprocess.run(  # noqa: S603 - valgrind's own tool, our child's pid
        [control, "-i", "on" if on else "off", str(server.proc.pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=True,
    )


def count(
    mode: bench.Mode,
    side: str,
    requests: int,
    warm_up: int,
    keep: Path | None = None,
    *,
    usage_writes: bool = True,
) -> float:
    """Instructions per request of `side` ("gateway" or "relay") for `requests` in `mode`.

    With `keep`, the callgrind file is copied there (for `callgrind_annotate`). Without
    `usage_writes`, the gateway holds its usage rows until it stops (uncounted): the count
    then leaves out the SQLite batches, whose size (and so cost a row) moves between runs.
    """
    servers = Servers()
    tmp = Path(tempfile.mkdtemp(prefix="tk-instr-"))
    bench.START_TIMEOUT = VALGRIND_START_TIMEOUT
    try:
        python = [sys.executable, "-m", "tests.bench_servers"]
        port = free_port()
        upstream = servers.start(
            "upstream", [*python, "upstream", "--port", str(port)],
            cwd=ROOT, port=port, output=subprocess.DEVNULL,
        )  # fmt: skip
        out = tmp / "callgrind.out"
        port = free_port()
        key = ""
        if side == "gateway":
            config, db = tmp / "gateway.toml", tmp / "keys.db"
            bench.write_config(config, upstream)
            if not usage_writes:
                held = "[server]\nusage_flush_seconds = 3600\nusage_batch_size = 1000000\n"
                config.write_text(config.read_text().replace("[server]\n", held, 1))
            key = asyncio.run(create_key(db))
            argv = [
                *_callgrind(out), sys.executable, "-m", "gateway", "serve", "--config",
                str(config), "--db", str(db), "--host", HOST, "--port", str(port),
            ]  # fmt: skip
            cwd = tmp
        else:
            argv = [*_callgrind(out), *python, "relay", "--port", str(port), "--upstream",
                    upstream.url]  # fmt: skip
            cwd = ROOT
        server = servers.start(side, argv, cwd=cwd, port=port, output=subprocess.DEVNULL)
        bench.wait_tcp(upstream)
        if side == "gateway":
            bench.wait_http(server, "/readyz")
        else:
            bench.wait_tcp(server)
        asyncio.run(_load(server, key, mode, requests, warm_up))
    finally:
        servers.stop_all()  # callgrind writes its file as the process exits
    try:
        if keep is not None:
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, keep / f"callgrind.{side}.{mode}.out")
        return _total(out) / requests
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


async def _load(server: Server, key: str, mode: bench.Mode, requests: int, warm_up: int) -> None:
    client = Client(Side(server.name, server), key, mode, 1)
    try:
        await client.warm_up(warm_up)
        _toggle(server, on=True)
        await client.run(requests)
        await asyncio.sleep(0.5)  # the work after the last answers (usage row, log line)
        _toggle(server, on=False)
    finally:
        await client.close()
    if client.samples.errors:
        raise bench.BenchError(f"{client.samples.errors} requests failed")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench_instructions")
    parser.add_argument("--mode", choices=("json", "stream"), action="append")
    parser.add_argument("--side", choices=("gateway", "relay"), action="append")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--warm-up", type=int, default=300)
    parser.add_argument("--keep", type=Path, help="a directory to keep the callgrind files in")
    parser.add_argument(
        "--without-usage-writes",
        action="store_true",
        help="hold usage rows until the gateway stops: count without the SQLite writes",
    )
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        raise SystemExit("needs valgrind (apt-get install valgrind)")
    os.environ["PYTHONHASHSEED"] = "0"  # the servers inherit it
    for mode in args.mode or ["json", "stream"]:
        for side in args.side or ["gateway", "relay"]:
            per_request = count(
                mode,
                side,
                args.requests,
                args.warm_up,
                args.keep,
                usage_writes=not args.without_usage_writes,
            )
            print(f"{side:8} {mode:6} {per_request:12,.0f} instructions per request", flush=True)


if __name__ == "__main__":
    main()
