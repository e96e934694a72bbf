"""The `gateway` command: serve the API, reload its config, manage virtual keys, report usage.

Key and usage commands open the database (a SQLite file or a PostgreSQL URL) as a second
connection; running servers notice their writes within a second (SQLite: `PRAGMA data_version`;
PostgreSQL: LISTEN/NOTIFY), with no restart. Only `keys create` ever prints a secret, once.
`migrate` brings a database's schema up to date; `copy-db` moves a SQLite database to PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, get_args, get_origin

import asyncpg
import msgspec

from gateway import __version__, cli_db, cli_output as out, hangups, keybody, workers
from gateway.config import config_file, load_settings, naming
from gateway.database import Database, opened_database
from gateway.dburl import redact
from gateway.errors import InvalidRequest, NotFound, StoreBusy
from gateway.logs import configure_logging
from gateway.pidfile import NoServer, keep_pid_file, pid_file, signal_reload
from gateway.records import (
    EDITABLE_FIELDS,
    KEY_FIELDS,
    LIMIT_FIELDS,
    VIEW_NAMES,
    describe,
    key_view,
    value_type,
)
from gateway.settings import ConfigError, Settings
from gateway.store import StoreError
from gateway.timeparse import parse_expires, parse_since

if TYPE_CHECKING:
    from aiohttp import web

__all__ = ["main"]


Command = Callable[[Database, argparse.Namespace], Awaitable[int]]


def _argtype(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a parser raising ValueError; `none` means "no limit"."""

    def convert(text: str) -> Any:
        if text.strip().lower() == "none":  # how `keys update` clears a limit
            return None
        try:
            value = parse(text)
        except ValueError as exc:
            # int("x") says "invalid literal for int() with base 10"; say it like argparse does.
            message = f"invalid {parse.__name__} value: {text!r}" if parse in (int, float) else exc
            raise argparse.ArgumentTypeError(str(message)) from None
        if isinstance(value, int | float) and value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return value

    return convert


def _models(text: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in text.split(",") if m.strip())


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _workers(text: str) -> int:
    workers = int(text)
    if not 1 <= workers <= 256:
        raise argparse.ArgumentTypeError(f"workers must be 1-256, got {workers}")
    return workers


def _key_options(parser: argparse.ArgumentParser, *, update: bool) -> None:
    # In `update`, options left out must not appear at all, so SUPPRESS their defaults.
    default: Any = argparse.SUPPRESS if update else None
    none = " ('none' clears it)" if update else ""
    add = parser.add_argument
    add("--name", required=not update, default=default)
    add("--models", type=_models, default=default, metavar="A,B", help="empty = all models")
    # One option per limit of the key record, typed as the record types it.
    for field in (f for f in KEY_FIELDS if f.name in LIMIT_FIELDS):
        flag, kind, text = f"--{field.name.replace('_', '-')}", value_type(field), describe(field)
        if get_origin(kind) is Literal:  # a choice, which `none` cannot clear
            add(flag, choices=get_args(kind), default=default, help=text)
        else:
            add(flag, type=_argtype(kind), default=default, metavar="N", help=text + none)
    add("--group", dest="group_name", default=default, metavar="NAME", help="a [[groups]] entry")
    add("--notes", default=default, metavar="TEXT", help="free text for people")
    expiry = parser.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires",
        type=_argtype(parse_expires),
        default=default,
        dest="expires_at",
        metavar="30d|12h|ISO-8601",
    )
    if update:
        expiry.add_argument("--clear-expires", action="store_true", default=default)


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="TOML config (default: $GATEWAY_CONFIG, ./gateway.toml, else built in)",
    )
    common.add_argument(
        "--db",
        metavar="PATH|URL",
        help="SQLite file or postgresql:// URL (default: server.database)",
    )
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON")
    both = [common, as_json]

    parser = argparse.ArgumentParser(prog="gateway", description="Token Kiosk LLM API gateway.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser("serve", parents=[common], help="run the HTTP server")
    serve.add_argument("--host")
    serve.add_argument("--port", type=_port)
    serve.add_argument(
        "--workers",
        type=_workers,
        default=1,
        metavar="N",
        help="processes serving the port (N > 1 needs server.redis_url)",
    )
    serve.add_argument("--worker-fd", help=argparse.SUPPRESS)  # set by the parent: SOCKET,WATCH
    sub.add_parser(
        "reload", parents=[common], help="make the running server re-read its config (SIGHUP)"
    )

    keys = sub.add_parser("keys", help="manage virtual API keys").add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    create = keys.add_parser("create", parents=both, help="create a key; prints its secret once")
    _key_options(create, update=False)
    create.set_defaults(run=_keys_create)
    keys.add_parser("list", parents=both, help="list every key").set_defaults(run=_keys_list)
    for action, run, text in (
        ("show", _keys_show, "show one key"),
        ("revoke", _keys_revoke, "revoke a key for good"),
    ):
        p = keys.add_parser(action, parents=both, help=text)
        p.add_argument("id")
        p.set_defaults(run=run)
    update = keys.add_parser("update", parents=both, help="change a key's name, models or limits")
    update.add_argument("id")
    _key_options(update, update=True)
    update.set_defaults(run=_keys_update)

    usage = sub.add_parser("usage", parents=both, help="usage report")
    usage.add_argument("--key", metavar="ID")
    usage.add_argument("--since", type=_argtype(parse_since), metavar="7d|ISO-8601")
    usage.add_argument(
        "--until", type=_argtype(parse_since), metavar="1d|ISO-8601", help="exclusive end"
    )
    usage.add_argument("--by", choices=("key", "model", "day"), default="key")
    usage.set_defaults(run=_usage)

    cli_db.add_commands(sub, common)
    return parser


# Commands


def _flag(field: str) -> str:
    """The option that sets a key body's field (`models[3]`: `--models`)."""
    name = field.split("[", 1)[0].split(".", 1)[0]
    return "--expires" if name == "expires_at" else f"--{name.replace('_', '-')}"


def _key_fields(
    given: dict[str, Any], kind: type[msgspec.Struct], args: argparse.Namespace
) -> dict[str, Any]:
    """The options as the admin API's body, checked as it checks one (`gateway.keybody`), so
    the CLI stores nothing the API would refuse (an infinite budget, notes too long...).

    Raises:
        InvalidRequest: a value is refused; the message names its option.
    """
    body = keybody.body_of({VIEW_NAMES.get(f, f): v for f, v in given.items()}, kind, label=_flag)
    # Without a config read (--db only) groups cannot be checked.
    return keybody.checked(body, getattr(args, "settings", None), label=_flag)


async def _keys_create(store: Database, args: argparse.Namespace) -> int:
    given = vars(args)  # options left out are None: the record's defaults apply
    fields = {f: given[f] for f in EDITABLE_FIELDS if given.get(f) is not None}
    key, secret = await store.create_key(**_key_fields(fields, keybody.KeyCreate, args))
    if args.json:
        out.print_json({**key_view(key), "key": secret})
    else:
        out.print_key(key)
        print("\nThe secret below is shown only now; store it safely:")
        print(secret)  # last line of stdout, for scripts
    return 0


async def _keys_list(store: Database, args: argparse.Namespace) -> int:
    keys = await store.list_keys()
    if args.json:
        out.print_json([key_view(k) for k in keys])
        return 0
    headers = ("ID", "NAME", "PREFIX", "STATUS", "MODELS", "RPM", "TPM", "CONC", "BUDGET")
    rows = []
    for k in keys:
        row = [k.id, k.name, k.prefix, out.status(k), ",".join(k.models) or "all"]
        row += map(out.opt, (k.rpm, k.tpm, k.max_concurrency))
        rows.append([*row, out.budget(k), out.when(k.expires_at, "never")])
    print(out.table((*headers, "EXPIRES"), rows))
    return 0


async def _keys_show(store: Database, args: argparse.Namespace) -> int:
    return out.show(await store.require_key(args.id), args)


async def _keys_update(store: Database, args: argparse.Namespace) -> int:
    given = vars(args)  # options left out are absent (SUPPRESS), not None
    changes = {f: given[f] for f in EDITABLE_FIELDS if f in given}
    for field, cleared in (("notes", ""), ("group_name", None)):
        value = changes.get(field)
        if isinstance(value, str) and value.strip().lower() == "none":  # `--group none`
            changes[field] = cleared
    if given.get("clear_expires"):
        changes["expires_at"] = None
    if not changes:
        print("gateway: keys update: nothing to change (see --help)", file=sys.stderr)
        return 2
    changes = _key_fields(changes, keybody.KeyUpdate, args)
    return out.show(await store.update_key(args.id, **changes), args)


async def _keys_revoke(store: Database, args: argparse.Namespace) -> int:
    return out.show(await store.revoke_key(args.id), args)


async def _usage(store: Database, args: argparse.Namespace) -> int:
    if args.key is not None:
        await store.require_key(args.key)
    rows = await store.usage_summary(
        since=args.since, until=args.until, key_id=args.key, by=args.by
    )
    if args.json:
        out.print_json(rows)
        return 0
    # By key, each key's name beside its id (a name alone may be shared or changed).
    named = args.by == "key"
    group = ("KEY", "NAME") if named else (args.by.upper(),)
    headers = (*group, "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "TOTAL", "COST_USD")
    body = []
    for r in rows:
        counts = (r.requests, r.errors, r.prompt_tokens, r.completion_tokens, r.total_tokens)
        latency = (out.ms(r.p50_latency_ms), out.ms(r.p95_latency_ms))
        names = (r.group, r.name or "-") if named else (r.group,)
        body.append([*names, *map(str, counts), f"{r.cost_usd:.4f}", *latency])
    print(out.table((*headers, "P50_MS", "P95_MS"), body, right_from=len(group)))
    return 0


def _settings(args: argparse.Namespace) -> Settings:
    """The config `serve` runs on (and re-reads on SIGHUP): the file, then the options."""
    settings = load_settings(args.config, os.environ)
    given = {"host": args.host, "port": args.port, "database": args.db}
    server = msgspec.structs.replace(
        settings.server, **{k: v for k, v in given.items() if v is not None}
    )
    return msgspec.structs.replace(settings, server=server)


def _serve(args: argparse.Namespace) -> int:
    with hangups.holding():  # SIGHUP waits until the server can reload on it (gateway.hangups)
        return _serve_held(args)


def _serve_held(args: argparse.Namespace) -> int:
    # Imported here so key and usage commands need not load the HTTP and provider stack.
    from gateway.app import create_app
    from gateway.server import serve

    settings = _settings(args)
    server = settings.server
    configure_logging(server.log_level)
    host = f"[{server.host}]" if ":" in server.host else server.host
    if args.worker_fd is not None:
        return _serve_worker(args, settings)
    problem = workers.needs_redis(server, args.workers)
    if problem is not None:
        print(f"gateway: {problem}", file=sys.stderr)
        return 2
    if args.workers > 1:
        # What a worker's start would refuse, refused once here: a config error (exit 2),
        # not a worker that died (exit 1).
        _check_pricing(settings, args)
        # Each worker would create and migrate a new database at the same moment, and
        # SQLite's switch to WAL does not wait for another's: one failed ("database is
        # locked", about one start in eight here), and the start with it. The parent does it.
        try:
            asyncio.run(_prepare_database(server.database))
        except _DATABASE_ERRORS as exc:
            return _database_failed(server.database, exc)
        try:
            sock = workers.listen(server.host, server.port)
        except OSError as exc:
            print(f"gateway: cannot listen on {host}:{server.port}: {exc}", file=sys.stderr)
            return 1
        port = sock.getsockname()[1]

        def ready() -> None:
            print(
                f"Token Kiosk listening on http://{host}:{port} ({args.workers} workers)",
                file=sys.stderr,
                flush=True,
            )

        with pid_file(server.database):
            return workers.supervise(sock, args.argv, args.workers, ready)

    app = create_app(
        settings,
        reload=lambda: _settings(args),
        config_file=lambda: config_file(args.config, os.environ),
    )
    write_pid_file = keep_pid_file(app, server.database)  # for `gateway reload`

    def announce() -> None:
        # Called once the port is bound, so neither the line nor the pid file precedes a
        # bind error (a second server on the port would take the running one's pid file).
        write_pid_file()
        print(f"Token Kiosk listening on http://{host}:{server.port}", file=sys.stderr, flush=True)

    try:
        with _naming_config_file(args):  # (the price database's check, at the app's start)
            serve(app, server.host, server.port, announce)
    except OSError as exc:  # address in use, unknown host, no permission
        print(f"gateway: cannot listen on {host}:{server.port}: {exc}", file=sys.stderr)
        return 1
    except _DATABASE_ERRORS as exc:
        return _database_failed(server.database, exc)
    return _usage_status(app)


def _usage_status(app: web.Application) -> int:
    """0, or 3 when the server stopped with usage rows it could not write (the database was
    gone at the end, or rows were dropped while it failed): a supervisor sees the loss in the
    exit status, not only in the `usage_rows_lost` / `usage_rows_dropped` log lines."""
    from gateway.state import USAGE_KEY

    recorder = app.get(USAGE_KEY)
    lost = 0 if recorder is None else recorder.lost + recorder.dropped
    if lost:
        print(f"gateway: {lost} usage rows could not be written to the database", file=sys.stderr)
        return 3
    return 0


def _serve_worker(args: argparse.Namespace, settings: Settings) -> int:
    """One worker of `serve --workers N`: the app on the socket its parent bound."""
    from gateway.app import create_app
    from gateway.server import serve

    app = create_app(
        settings,
        reload=lambda: _settings(args),
        config_file=lambda: config_file(args.config, os.environ),
    )
    fd, watch, ready = workers.worker_fds(args.worker_fd)
    workers.watch_parent(app, watch)
    sock = workers.worker_socket(fd)
    try:
        with _naming_config_file(args):
            serve(
                app,
                settings.server.host,
                settings.server.port,
                lambda: workers.worker_ready(ready),
                sock=sock,
            )
    except _DATABASE_ERRORS as exc:  # the parent then stops the others
        return _database_failed(settings.server.database, exc)
    return _usage_status(app)


def _check_pricing(settings: Settings, args: argparse.Namespace) -> None:
    """What the running server checks on a reload beyond the config itself: every provider's
    `pricing` names a price list of the price database (loaded here only when one names one).

    Raises:
        ConfigError: as `prices.open_book`, naming the config file.
    """
    if any(p.pricing not in (None, "free", "none") for p in settings.providers):
        from gateway.prices import open_book  # (a price list: only if one is named)

        with _naming_config_file(args):
            open_book(settings)


@contextlib.contextmanager
def _naming_config_file(args: argparse.Namespace) -> Iterator[None]:
    """A config error found beyond `load_settings` (a provider's `pricing` the price database
    lacks: `prices.open_book`) named with the config file first, as `load_settings` names
    its own errors."""
    try:
        yield
    except ConfigError as exc:
        raise naming(config_file(args.config, os.environ), exc) from None


def _reload(database: str) -> int:
    try:
        pid = signal_reload(database)
    except NoServer as exc:
        print(f"gateway: reload: {exc}", file=sys.stderr)
        return 1
    print(f"Sent SIGHUP to the gateway (pid {pid}); its log says config_reloaded, or")
    print("config_reload_failed with the error (the running config then stays).")
    return 0


# What a database that is missing, locked, full or unreachable raises.
_DATABASE_ERRORS = (sqlite3.Error, StoreError, asyncpg.PostgresError)


def _database_failed(database: str, exc: Exception) -> int:
    """`serve` could not use its database: one line naming it (no password), exit status 1."""
    print(f"gateway: database error ({redact(database)}): {exc}", file=sys.stderr)
    return 1


async def _prepare_database(database: str) -> None:
    """Create the database if new and bring its schema up to date (then close it)."""
    async with opened_database(database):
        pass


async def _run_with_store(path: str, run: Command, args: argparse.Namespace) -> int:
    async with opened_database(path) as store:
        return await run(store, args)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 usage or config error)."""
    args = _build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what `serve` workers run
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "copy-db":
            return asyncio.run(cli_db.copy_db(args.source, args.target))
        # Settings only supply the database path. With --db and no --config they are not
        # loaded, so a shell without the providers' env secrets can still manage keys.
        path = args.db
        args.settings = None
        if path is None or args.config is not None:
            args.settings = load_settings(args.config, os.environ)
            path = path or args.settings.server.database
        if args.command == "reload":
            if args.settings is not None:
                _check_pricing(args.settings, args)
            return _reload(path)
        return asyncio.run(_run_with_store(path, args.run, args))
    except ConfigError as exc:
        print(f"gateway: config error: {exc}", file=sys.stderr)
        return 2
    except (NotFound, InvalidRequest, StoreBusy) as exc:
        print(f"gateway: {exc.message}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidRequest) else 1
    except _DATABASE_ERRORS as exc:
        print(f"gateway: database error: {exc}", file=sys.stderr)
        return 1
    except UnicodeEncodeError:
        # An argument that is not UTF-8 (held as lone surrogates) reached the store: a key id
        # or `--key` (key fields are checked before, naming their option). Not the server's
        # failure: that one is a failure of its own, never called a bad argument.
        if args.command == "serve":
            raise
        print("gateway: an argument is not UTF-8 text", file=sys.stderr)
        return 2
