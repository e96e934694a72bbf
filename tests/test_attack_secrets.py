"""Attack: secrets (database / Redis passwords) reaching stdout, stderr or tracebacks.

docs/scaling.md and docs/operations.md promise the gateway never prints a password. These
tests give it URLs whose password holds a character that is not percent-encoded (`/`, `#`,
`?`: common in generated secrets) or a URL with a driver suffix in its scheme
(`postgresql+asyncpg://`, as SQLAlchemy writes it), run the real CLI, and look for the
password where an operator (or their log collector) would see it. No PostgreSQL or Redis
server is needed: every failure here happens before a connection is made (port 1 refuses).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.dburl import problem, redact

ROOT = Path(__file__).resolve().parents[1]

# Distinctive pieces of a password: neither may appear in any output.
HEAD, TAIL = "Kx9Head", "Tail42zz"


def _run(tmp_path: Path, *argv: str, timeout: float = 30.0) -> tuple[int | None, str]:
    """Run `gateway *argv` in `tmp_path`; its exit status (None: still running after
    `timeout`, then killed) and its stdout and stderr together."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    env.pop("GATEWAY_CONFIG", None)
    proc = subprocess.Popen(  # noqa: S603 - our own CLI
        [sys.executable, "-m", "gateway", *argv],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        status: int | None = proc.returncode
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        status = None
    return status, out.decode("utf-8", "replace")


def _assert_hidden(text: str) -> None:
    assert HEAD not in text, text
    assert TAIL not in text, text


# --- gateway.dburl.redact: the one helper every message uses --------------------------------


@pytest.mark.parametrize("sep", ["/", "#", "?"])
def test_redact_hides_a_password_holding_slash_hash_or_question_mark(sep: str) -> None:
    # urlsplit ends the netloc at the first `/`, `#` or `?`: "kiosk:Kx9Head" has no `@`,
    # so redact() sees no user part and returns the URL as it came, password and all.
    url = f"postgresql://kiosk:{HEAD}{sep}{TAIL}@db.example:5432/kiosk"
    _assert_hidden(redact(url))


@pytest.mark.parametrize("scheme", ["postgresql+asyncpg", "postgresql+psycopg", "POSTGRESQL"])
def test_redact_hides_the_password_of_a_driver_suffixed_or_uppercase_url(scheme: str) -> None:
    # is_postgres_url() is false for these, so redact() takes them for a SQLite path.
    _assert_hidden(redact(f"{scheme}://kiosk:{HEAD}{TAIL}@db.example:5432/kiosk"))


# --- the CLI, as an operator runs it -------------------------------------------------------


@pytest.mark.parametrize("sep", ["/", "#", "?"])
def test_serve_database_error_hides_a_password_holding_slash_or_hash(
    tmp_path: Path, sep: str
) -> None:
    # cli._database_failed prints redact(database): today
    #   gateway: database error (postgresql://kiosk:Kx9Head/Tail42zz@127.0.0.1:1/kiosk): ...
    url = f"postgresql://kiosk:{HEAD}{sep}{TAIL}@127.0.0.1:1/kiosk"
    status, out = _run(tmp_path, "serve", "--port", "0", "--db", url)
    assert status == 1, out
    _assert_hidden(out)
    assert "percent-encode" in out  # what to do about it


def test_keys_database_error_hides_a_password_holding_a_slash(tmp_path: Path) -> None:
    # asyncpg reads "kiosk:Kx9Head" as host:port and fails on int("Kx9Head"); PgStore.open
    # replaces urlsplit(url).password in the message, which is None for this URL, so:
    #   gateway: database error: cannot connect to PostgreSQL:
    #       invalid literal for int() with base 10: 'Kx9Head'
    url = f"postgresql://kiosk:{HEAD}/{TAIL}@127.0.0.1:1/kiosk"
    status, out = _run(tmp_path, "keys", "list", "--db", url)
    assert status == 1, out
    _assert_hidden(out)


def test_serve_with_a_sqlalchemy_style_url_hides_its_password(tmp_path: Path) -> None:
    # `postgresql+asyncpg://` is taken for a SQLite path; SQLite cannot open it and
    # _database_failed prints it whole.
    url = f"postgresql+asyncpg://kiosk:{HEAD}{TAIL}@127.0.0.1:1/kiosk"
    status, out = _run(tmp_path, "serve", "--port", "0", "--db", url)
    assert status == 1, out
    _assert_hidden(out)


def test_reload_with_a_sqlalchemy_style_url_hides_its_password(tmp_path: Path) -> None:
    # NoServer names redact(database) and the pid file's path, which for a "SQLite path"
    # is the URL plus ".pid": the password shows twice.
    url = f"postgresql+asyncpg://kiosk:{HEAD}{TAIL}@127.0.0.1:1/kiosk"
    status, out = _run(tmp_path, "reload", "--db", url)
    assert status == 1, out
    _assert_hidden(out)


@pytest.mark.parametrize("sep", ["/", "#", "?"])
def test_serve_with_a_redis_password_holding_slash_hash_or_question_mark(
    tmp_path: Path, sep: str
) -> None:
    # open_gate passes redis_url to redis-py, whose parse_url reads "Kx9Head" as the port:
    # an uncaught ValueError("Port could not be cast to integer value as 'Kx9Head'") and its
    # traceback on stderr. (The process then hangs instead of exiting: killed here.)
    (tmp_path / "gateway.toml").write_text(
        "[server]\n"
        f'redis_url = "redis://:{HEAD}{sep}{TAIL}@127.0.0.1:1/0"\n'
        'database = "keys.db"\n'
        "port = 0\n",
        encoding="utf-8",
    )
    status, out = _run(tmp_path, "serve", "--config", "gateway.toml", timeout=15.0)
    _assert_hidden(out)
    # A config error, before anything starts: one line, no traceback, and an exit.
    assert status == 2, out
    assert out.startswith("gateway: config error: ") and "server.redis_url: " in out, out
    assert "Traceback" not in out


@pytest.mark.parametrize(
    "redis_url", ["redis://127.0.0.1:99999/0", "redis://127.0.0.1:6379/0?db=x", "redis://[::1/0"]
)
def test_a_redis_url_redis_py_cannot_read_is_a_config_error(tmp_path: Path, redis_url: str) -> None:
    """It used to end `serve` in a traceback, and the process then never exited."""
    (tmp_path / "gateway.toml").write_text(
        f'[server]\nredis_url = "{redis_url}"\ndatabase = "keys.db"\n', encoding="utf-8"
    )
    status, out = _run(tmp_path, "serve", "--config", "gateway.toml", "--port", "0")
    assert status == 2, out
    assert out.startswith("gateway: config error: ") and "server.redis_url: " in out, out


def test_a_database_url_of_another_kind_is_a_config_error(tmp_path: Path) -> None:
    """SQLAlchemy's spelling was taken for a SQLite file name, and printed whole."""
    url = f"postgresql+asyncpg://kiosk:{HEAD}{TAIL}@127.0.0.1:1/kiosk"
    (tmp_path / "gateway.toml").write_text(f'[server]\ndatabase = "{url}"\n', encoding="utf-8")
    status, out = _run(tmp_path, "keys", "list", "--config", "gateway.toml")
    assert status == 2, out
    assert "server.database: a database URL must start with postgresql://" in out
    _assert_hidden(out)


@pytest.mark.parametrize(
    "database",
    [
        "keys.db",
        "/var/lib/kiosk/keys.db",
        "file:keys.db?mode=rwc",
        "postgresql://kiosk:p%2Fa%3Fs%23s%40@db.example:5432/kiosk?sslmode=require",
        "POSTGRES://kiosk@db.example/kiosk",
        "postgresql:///kiosk?host=/run/postgresql",
    ],
)
def test_databases_written_right_are_taken(database: str) -> None:
    assert problem(database) is None


@pytest.mark.parametrize(
    "base_url",
    [f"https://user:{HEAD}@api.example.com/v1", f"https://user:{HEAD}/{TAIL}@api.example.com/v1"],
)
def test_a_base_url_with_credentials_is_a_config_error(tmp_path: Path, base_url: str) -> None:
    """It was taken, and every request to the provider then failed with a 500 (aiohttp
    refuses a URL's credentials beside the Authorization header the gateway sends)."""
    (tmp_path / "gateway.toml").write_text(
        f'[[providers]]\nname = "p"\ntype = "openai"\nbase_url = "{base_url}"\n'
        'api_keys = ["sk-test-0123456789abcdef"]\n',
        encoding="utf-8",
    )
    status, out = _run(tmp_path, "keys", "list", "--config", "gateway.toml")
    assert status == 2, out
    assert out.startswith("gateway: config error: ") and "providers[0].base_url: " in out, out
    _assert_hidden(out)
