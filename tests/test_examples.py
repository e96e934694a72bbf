"""The examples of the README and docs/ run as written, on the default config (issue #12).

test_docs.py checks that the examples parse; here they run:

- every `gateway` command line of a `sh` block, in order, in a fresh directory where `make run`
  would leave things (the embedded default config, `keys.db` copied from `keys.db.sample`, no
  provider keys in the environment). `key_0123456789ab` stands for the id of the key the block
  created; a command with `--config FILE` gets the page's `toml` block just before it as FILE.
  (`serve` runs forever and `reload` needs a server: test_lifecycle.py runs both.) The docs'
  PostgreSQL URL, `postgresql://kiosk@db.internal/kiosk`, stands for a new database on the
  test session's throw-away server (those blocks skip without PostgreSQL).
- the quick start's HTTP examples (those with the demo key) against the gateway serving that
  default config: the `curl` lines with curl, the Python ones with the `openai` client.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from aiohttp.pytest_plugin import AiohttpServer

from gateway import cli
from gateway.app import create_app
from gateway.config import load_settings
from tests.test_docs import BLOCKS, ROOT, Block, _commands

PLACEHOLDER = "key_0123456789ab"
PG_PLACEHOLDER = "postgresql://kiosk@db.internal/kiosk"
SECRETS = ("GATEWAY_CONFIG", "OPENAI_API_KEY", "OPENAI_BASE_URL", "ANTHROPIC_API_KEY")
CLI_BLOCKS = [b for b in BLOCKS if b.lang == "sh" and _commands(b)]
DEMO_URL = "http://127.0.0.1:8080"


@pytest.fixture
def fresh(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory as `make run` leaves it, with no config file and no provider keys."""
    monkeypatch.chdir(tmp_path)
    for name in (*SECRETS, "GEMINI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    shutil.copy(ROOT / "keys.db.sample", tmp_path / "keys.db")
    return tmp_path


def _toml_before(block: Block) -> str:
    earlier = [b for b in BLOCKS if b.page == block.page and b.lang == "toml"]
    earlier = [b for b in earlier if b.line < block.line]
    assert earlier, f"{block.where}: --config names no toml block before it"
    return earlier[-1].body


def _newest_key(database: Path) -> str:
    with sqlite3.connect(database) as conn:
        (key_id,) = conn.execute("SELECT id FROM keys ORDER BY rowid DESC LIMIT 1").fetchone()
    return str(key_id)


@pytest.mark.parametrize("block", CLI_BLOCKS, ids=[b.where for b in CLI_BLOCKS])
def test_every_command_line_example_runs(
    block: Block, fresh: Path, request: pytest.FixtureRequest
) -> None:
    created = PLACEHOLDER
    pg_url = request.getfixturevalue("pg_url") if PG_PLACEHOLDER in block.body else None
    for argv in _commands(block):
        if argv[0] in ("serve", "reload"):
            continue
        if "--config" in argv:
            (fresh / argv[argv.index("--config") + 1]).write_text(_toml_before(block))
        argv = [created if word == PLACEHOLDER else word for word in argv]
        argv = [pg_url if word == PG_PLACEHOLDER and pg_url else word for word in argv]
        assert cli.main(argv) == 0, f"{block.where}: `gateway {' '.join(argv)}` failed"
        if argv[:2] == ["keys", "create"]:
            created = _newest_key(fresh / "keys.db")


def _demo_blocks(lang: str) -> list[Block]:
    """The HTTP examples that run on the default config: they use the demo key (or, in
    Python, a client made as the quick start makes it)."""
    found = [b for b in BLOCKS if b.lang == lang]
    if lang == "python":
        return found
    return [b for b in found if "sk-kiosk-demo" in b.body]


async def _run(args: list[str]) -> str:
    """Run an example in its own process (its output is its own); its stdout."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=os.getcwd()
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.fixture
async def demo_url(fresh: Path, aiohttp_server: AiohttpServer) -> str:
    """The gateway on the embedded default config and the sample database."""
    server = await aiohttp_server(create_app(load_settings(None, os.environ)))
    return f"http://127.0.0.1:{server.port}"


@pytest.mark.parametrize("block", _demo_blocks("python"), ids=lambda b: b.where)
async def test_every_python_example_runs(block: Block, demo_url: str) -> None:
    code = block.body.replace(DEMO_URL, demo_url)
    if "client =" not in code:  # continues the quick start: its client
        code = (
            "from openai import OpenAI\n"
            f'client = OpenAI(base_url="{demo_url}/v1", api_key="sk-kiosk-demo")\n' + code
        )
    out = await _run([sys.executable, "-c", code])
    if "Hello!" in code:  # a chat example: the demo model's answer
        assert "You said: Hello!" in out
    else:  # e.g. embeddings: it ran and printed what it says it prints
        assert out.strip()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.parametrize("block", _demo_blocks("sh"), ids=lambda b: b.where)
async def test_every_curl_example_runs(block: Block, demo_url: str) -> None:
    script = block.body.replace(DEMO_URL, demo_url)
    out = await _run(["sh", "-e", "-c", script])
    assert "You said: Hello!" in out


def test_the_quick_start_is_among_them() -> None:
    readme = ROOT / "README.md"
    assert [b.page for b in _demo_blocks("sh")].count(readme) >= 1
    assert [b.page for b in _demo_blocks("python")].count(readme) >= 1
    assert any(b.page.name == "keys.md" for b in CLI_BLOCKS)
