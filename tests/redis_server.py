"""Throw-away `redis-server` instances for the shared-limits tests: a temp dir, a free port,
no persistence, no system service. Without redis-server installed, those tests skip."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

__all__ = ["RedisServer", "require_redis"]

REDIS_SERVER = shutil.which("redis-server")


def require_redis() -> str:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does)")
    return REDIS_SERVER


class RedisServer:
    """One redis-server process; `start()` returns once it accepts connections."""

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.url = f"redis://127.0.0.1:{port}/0"
        self.process: subprocess.Popen[str] | None = None

    def start(self) -> RedisServer:
        argv = [require_redis(), "--port", str(self.port), "--bind", "127.0.0.1"]
        argv += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(  # noqa: S603 (our own argv)
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        assert self.process.stdout is not None
        # Its log says when it is ready: wait for that line, not for time to pass.
        for line in self.process.stdout:
            if "Ready to accept connections" in line:
                return self
        raise RuntimeError(f"redis-server exited with {self.process.wait()}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
