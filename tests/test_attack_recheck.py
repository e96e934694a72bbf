"""Re-check of the URL checks of db82f26 (dburl rewritten to read a URL as asyncpg does) and of
the price sanity check of 7f31e12. Every test here fails on 7f31e12 for the reason its
docstring gives.

The password pieces `Kx9Head` must never reach an output. No test needs a running server: the
leaks happen before (or instead of) a connection, with 127.0.0.1:1 (nothing listens) as host.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from gateway import cli
from gateway.config import load_settings
from gateway.dburl import problem, redact
from gateway.prices import Price, Rates, Usage, _sane

SECRET = "Kx9Head"


def _asyncpg_reads(url: str) -> dict[str, object]:
    """What asyncpg 0.32 makes of `url` (its own parser, no connection). A private function:
    where another asyncpg version changed it, the test skips (after its own assertions about
    the gateway, which come first)."""
    from asyncpg import connect_utils

    parse = getattr(connect_utils, "_parse_connect_dsn_and_args", None)
    if parse is None:
        pytest.skip("asyncpg's private URL parser is not there in this version")
    try:
        addrs, params = parse(
            dsn=url, host=None, port=None, user=None, password=None, passfile=None,
            database=None, ssl=None, service=None, servicefile=None, direct_tls=None,
            server_settings=None, target_session_attrs=None, krbsrvname=None, gsslib=None,
        )  # fmt: skip
    except TypeError:  # (its arguments changed)
        pytest.skip("asyncpg's private URL parser takes other arguments in this version")
    return {"addrs": addrs, "password": params.password, "settings": params.server_settings}


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int | None, str]:
    try:
        status: int | None = cli.main(list(argv))
    except BaseException as exc:
        status = None
        print(f"ESCAPED {type(exc).__name__}: {exc}")
    captured = capsys.readouterr()
    return status, captured.out + captured.err


# --- 1. A password shaped `?key=value` (or `digits/x?key=value`) is taken as a parameter ----

# The user `kiosk`, the password `?token=Kx9Head`, unencoded. asyncpg reads host `kiosk`, and
# a server setting `token` = `Kx9Head@127.0.0.1:1/app`: nothing tells problem() the `@` is the
# end of a user part. The code before db82f26 refused it ("an @ after its host").
QUERY_SHAPED = [
    f"postgresql://kiosk:?token={SECRET}@127.0.0.1:1/app",
    f"postgresql://kiosk:12/x?token={SECRET}@127.0.0.1:1/app",
]


@pytest.mark.parametrize("url", QUERY_SHAPED)
def test_query_shaped_password_is_not_shown_by_redact(url: str) -> None:
    """redact() returns the URL whole: problem() takes it (its authority has no `@`, the `@`
    after it sits in a `key=value` parameter) and the user-part branch finds no `@`."""
    assert SECRET not in redact(url), f"problem()={problem(url)!r} redact()={redact(url)!r}"
    assert SECRET in str(_asyncpg_reads(url)["settings"])  # asyncpg misreads it, as said


@pytest.mark.parametrize("command", ["reload", "serve"])
def test_query_shaped_password_reaches_cli_output(
    command: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`gateway reload --db URL` prints "no running server found for <redact(URL)>" and
    `gateway serve --db URL` prints "database error (<redact(URL)>)": the whole password."""
    monkeypatch.chdir(tmp_path)  # (the pid file of a URL is looked up in the working dir)
    argv = [command, "--db", QUERY_SHAPED[0]] + (["--port", "0"] if command == "serve" else [])
    status, output = _cli(capsys, *argv)
    assert status == 1
    assert SECRET not in output, output


# --- 2. A password holding `[...]`: urllib's error quotes the bracketed piece ---------------

BRACKETED = f"postgresql://kiosk:ab[{SECRET}]cd@127.0.0.1:1/app"


def test_bracketed_password_is_taken_by_problem_but_not_by_asyncpg() -> None:
    """problem() takes it; asyncpg (urllib.parse.urlparse) raises ValueError("'Kx9Head' does
    not appear to be an IPv4 or IPv6 address"), a piece of the password in its message, which
    PgStore.open masks only of the whole password `ab[Kx9Head]cd`. Refusing `[`/`]` in a user
    part (or running urlsplit in problem()) would stop it before the driver."""
    assert problem(BRACKETED) is not None
    with pytest.raises(ValueError, match=SECRET):
        _asyncpg_reads(BRACKETED)


@pytest.mark.parametrize("command", ["migrate", "keys list", "serve"])
def test_bracketed_password_reaches_cli_output(
    command: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`gateway migrate|keys list|serve --db URL` prints "cannot connect to PostgreSQL:
    'Kx9Head' does not appear to be an IPv4 or IPv6 address"."""
    monkeypatch.chdir(tmp_path)
    argv = [*command.split(), "--db", BRACKETED] + (["--port", "0"] if command == "serve" else [])
    status, output = _cli(capsys, *argv)
    assert status in (1, 2)
    assert SECRET not in output, output


# --- 3. A percent-encoded `password` parameter name -----------------------------------------

ENCODED_NAME = f"postgresql://kiosk@127.0.0.1:1/app?pass%77ord={SECRET}"


def test_percent_encoded_password_parameter_is_not_shown() -> None:
    """asyncpg decodes parameter names (parse_qs): `pass%77ord=` is its password. redact()
    matches `password=` literally and shows the value; `gateway reload`/`serve` print it."""
    assert SECRET not in redact(ENCODED_NAME), redact(ENCODED_NAME)
    assert _asyncpg_reads(ENCODED_NAME)["password"] == SECRET


# --- 4. An empty host in a host list: a traceback instead of a refusal ----------------------

EMPTY_HOST = [
    f"postgresql://kiosk:{SECRET}@127.0.0.1:1,/app",
    f"postgresql://kiosk:{SECRET}@,127.0.0.1:1/app",
]


@pytest.mark.parametrize("url", EMPTY_HOST)
def test_empty_host_in_host_list_is_refused(url: str) -> None:
    """asyncpg's _parse_hostlist indexes `hostspec[0]` of every host: an empty one raises
    IndexError, which PgStore.open does not catch (it catches ValueError, OSError, ...). The
    host regex `[^:\\[\\]]*` takes an empty host, so problem() says nothing."""
    assert problem(url) is not None
    with pytest.raises(IndexError):
        _asyncpg_reads(url)


@pytest.mark.parametrize("command", ["migrate", "keys list"])
def test_empty_host_gives_a_traceback(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`gateway keys list|migrate|serve --db postgresql://u:pw@h:1,/db` ends in an IndexError
    traceback (exit 1 with no `gateway:` line), not a one-line refusal."""
    status, output = _cli(capsys, *command.split(), "--db", EMPTY_HOST[0])
    assert "ESCAPED" not in output, output
    assert status in (1, 2)


# --- 5. A URL after leading whitespace is a SQLite path, shown whole -----------------------


def test_url_after_a_space_is_not_shown_whole(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """` postgresql://...` (a space pasted into a config or an env variable) does not match
    `_SCHEME` (anchored at 0): problem() takes it as a SQLite path and redact() returns it
    whole, so `gateway reload` prints the password (older than db82f26; still there)."""
    monkeypatch.chdir(tmp_path)
    url = f" postgresql://kiosk:{SECRET}@127.0.0.1:1/app"
    status, output = _cli(capsys, "reload", "--db", url)
    assert status == 1
    assert SECRET not in output, output


# --- 6. Prices: a finite rate whose cost is infinite; an infinite config price -------------


def test_sane_refuses_a_rate_whose_cost_is_infinite() -> None:
    """_sane() takes any finite rate, so a fetched 1e308 USD/Mtok passes; the cost of 1,000
    tokens is then inf, the very value _sane exists to keep out of a key's spend."""
    price = Price(Rates(1e308, 1e308, 1e308, 1e308, 1e308), source="genai-prices")
    cost = price.cost(Usage(prompt=1000, completion=1000))
    assert _sane(price) is False or math.isfinite(cost), cost


def test_config_refuses_an_infinite_price(tmp_path: Path) -> None:
    """_sane's docstring says config prices "are checked as loaded", but NonNegativeFloat
    (ge=0) takes TOML `inf`: every request of the model costs inf."""
    config = tmp_path / "gateway.toml"
    config.write_text(
        f'[server]\ndatabase = "{tmp_path / "k.db"}"\n'
        '[[providers]]\nname = "oa"\ntype = "openai"\napi_keys = ["sk-x"]\n'
        '[[models]]\nname = "m"\ntargets = [{provider = "oa", model = "gpt-4o"}]\n'
        "input_price_per_mtok = inf\noutput_price_per_mtok = 1.0\n"
    )
    from gateway.settings import ConfigError

    with pytest.raises(ConfigError):
        load_settings(config, {})


# --- 7. A Redis URL redis-py takes, refused ------------------------------------------------


def test_uppercase_redis_scheme_is_taken(tmp_path: Path) -> None:
    """redis-py 8 compares the scheme case-insensitively (`url.lower().startswith`), the
    gateway's own prefix check before it does not: `REDIS://127.0.0.1:6379/0` is refused
    (older than db82f26; minor)."""
    from redis.connection import parse_url

    url = "REDIS://127.0.0.1:6379/0"
    assert parse_url(url)["host"] == "127.0.0.1"
    config = tmp_path / "gateway.toml"
    config.write_text(f'[server]\ndatabase = "{tmp_path / "k.db"}"\nredis_url = "{url}"\n')
    assert load_settings(config, {}).server.redis_url == url
