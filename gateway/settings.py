"""Configuration: frozen msgspec structs from TOML, `env:NAME` secrets, and the embedded default.

`load_settings()` is the only entry point. It reads the file (or builds the default from the
environment), resolves secrets, checks cross-references, and raises `ConfigError` with one line
naming the field and the problem, so a bad config stops the process before it binds a port.
"""

from __future__ import annotations

import fnmatch
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec

from gateway.errors import InvalidRequest

__all__ = [
    "DEFAULT_BASE_URLS",
    "ConfigError",
    "GroupConfig",
    "ModelConfig",
    "ProviderConfig",
    "RoutingSettings",
    "ServerSettings",
    "Settings",
    "Target",
    "default_settings",
    "load_settings",
]

ProviderType = Literal["openai", "anthropic", "gemini", "demo"]

DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "demo": "",
}

# Path endings that mean a base_url already holds what the gateway appends (a copy of the
# OpenAI-compatible URL, say), which would end in e.g. /v1/v1/messages.
_ROOT_ONLY = {"anthropic": ("/v1", "/v1/messages"), "gemini": ("/v1beta", "/v1beta/openai")}

# Models that take `reasoning_effort` (OpenAI: and reject `max_tokens`), per provider type;
# used by the embedded default config for "<provider>/<model>" ids.
REASONING_MODELS: dict[str, tuple[str, ...]] = {
    "openai": ("o1*", "o3*", "o4*", "gpt-5*"),
    "anthropic": ("claude-3-7-sonnet*", "claude-sonnet-4*", "claude-opus-4*", "claude-haiku-4*"),
    "gemini": ("gemini-2.5-pro*", "gemini-2.5-flash", "gemini-2.5-flash-*", "gemini-3*"),
}

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9._:@-]+$")]


class ConfigError(Exception):
    """A configuration problem, worded as one line: `<where>: <field>: <problem>`."""


class _Base(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Base, frozen=True):
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 8080
    database: str = "keys.db"
    admin_key: str | None = None
    default_model: str = "demo"
    # Bodies above this get a 413; images as data URLs make chat bodies large.
    max_body_bytes: PositiveInt = 32 * 1024 * 1024
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # How often the server looks for key changes made by the CLI (must stay under 2 s).
    keys_refresh_seconds: Annotated[float, msgspec.Meta(gt=0, le=2)] = 1.0
    usage_flush_seconds: PositiveFloat = 0.5
    usage_batch_size: PositiveInt = 500
    # On SIGTERM/SIGINT: how long in-flight requests and streams may take to finish.
    shutdown_grace_seconds: NonNegativeFloat = 30.0


class RoutingSettings(_Base, frozen=True):
    """Retries, failover and cooldowns (`[routing]`)."""

    # Upstream attempts per request, over the accounts and targets of its model.
    max_attempts: PositiveInt = 3
    # Exponential backoff between attempts: initial * 2**n, capped, with jitter.
    backoff_initial: NonNegativeFloat = 0.1
    backoff_max: NonNegativeFloat = 2.0
    # Bounds the whole search for an answer (non-streaming) or a first byte (streaming).
    deadline: PositiveFloat = 600.0
    # A breaker opens after this many failures of an account within the window...
    failure_threshold: PositiveInt = 3
    failure_window: PositiveFloat = 30.0
    # ... for this long (or the upstream's retry-after, up to max_cooldown).
    cooldown: PositiveFloat = 30.0
    max_cooldown: PositiveFloat = 300.0


class ProviderConfig(_Base, frozen=True):
    """One upstream: where it is, how to authenticate, and how long to wait for it."""

    name: Name
    type: ProviderType
    base_url: str | None = None
    api_keys: tuple[str, ...] = ()
    # Extra headers sent with every upstream request (e.g. OpenRouter's HTTP-Referer).
    headers: dict[str, str] = {}
    # Glob patterns of upstream model names that accept `reasoning_effort`, for
    # "<provider>/<model>" ids that have no [[models]] entry of their own.
    reasoning_models: tuple[str, ...] = ()
    connect_timeout: PositiveFloat = 10.0
    # Streams: time to the first event (default: read_timeout). A non-streaming answer comes
    # only once it is generated, so there read_timeout and total_timeout bound the wait.
    first_byte_timeout: PositiveFloat | None = None
    # The longest silence: between stream events, or waiting for a non-streaming answer.
    read_timeout: PositiveFloat = 300.0
    # Whole-request bound for non-streaming calls; streams are bounded by read_timeout only.
    total_timeout: PositiveFloat = 600.0
    max_connections: PositiveInt = 100
    # Output limit for upstreams that require one (Anthropic's `max_tokens`) when neither the
    # request nor the model config sets one.
    default_max_tokens: PositiveInt = 4096
    # `type = "openai"` only: the upstream serves /v1/responses itself, so Responses API
    # requests are passed through instead of being translated to chat completions.
    responses_api: bool = False

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URLS[self.type]).rstrip("/")


class Target(_Base, frozen=True):
    provider: Name
    model: Annotated[str, msgspec.Meta(min_length=1)]
    weight: PositiveFloat = 1.0
    priority: int = 0


class ModelConfig(_Base, frozen=True):
    """A model id clients may send, and where it goes."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    targets: Annotated[tuple[Target, ...], msgspec.Meta(min_length=1)]
    input_price_per_mtok: NonNegativeFloat = 0.0
    output_price_per_mtok: NonNegativeFloat = 0.0
    # Used when a request sets neither max_tokens nor max_completion_tokens.
    max_tokens: PositiveInt | None = None
    # Only reasoning models accept `reasoning_effort` / `thinking`; others get a 400.
    reasoning: bool = False
    description: str = ""

    def cost_usd(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_price_per_mtok
            + completion_tokens * self.output_price_per_mtok
        ) / 1_000_000


class GroupConfig(_Base, frozen=True):
    """Defaults for the keys of a group: a key's own value, when set, wins."""

    name: Name
    models: tuple[str, ...] = ()
    rpm: PositiveInt | None = None
    tpm: PositiveInt | None = None
    max_concurrency: PositiveInt | None = None
    budget_tokens: PositiveInt | None = None
    budget_usd: PositiveFloat | None = None
    budget_period: Literal["day", "week", "month", "total"] | None = None


class Settings(_Base, frozen=True):
    server: ServerSettings = ServerSettings()
    routing: RoutingSettings = RoutingSettings()
    providers: tuple[ProviderConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    groups: tuple[GroupConfig, ...] = ()

    def provider(self, name: str) -> ProviderConfig | None:
        return next((p for p in self.providers if p.name == name), None)

    def model(self, name: str) -> ModelConfig | None:
        return next((m for m in self.models if m.name == name), None)

    def group(self, name: str) -> GroupConfig | None:
        return next((g for g in self.groups if g.name == name), None)

    def require_group(self, name: str | None) -> None:
        """Refuse a key's group that this config does not define.

        Raises:
            InvalidRequest: no `[[groups]]` entry has that name (param `group`).
        """
        if name is not None and self.group(name) is None:
            known = ", ".join(g.name for g in self.groups) or "none are configured"
            raise InvalidRequest(f"No group named {name!r} in the config ({known}).", param="group")

    def is_reasoning(self, provider: ProviderConfig, upstream_model: str) -> bool:
        return any(fnmatch.fnmatchcase(upstream_model, p) for p in provider.reasoning_models)


def _resolve_secret(value: str, where: str, environ: Mapping[str, str]) -> str:
    if not value.startswith("env:"):
        return value
    name = value[4:]
    found = environ.get(name)
    if not found:
        raise ConfigError(f"{where}: environment variable {name} is not set")
    return found


def _with_demo(settings: Settings) -> Settings:
    """Every config gets the offline `demo` provider and model unless it defines its own."""
    if any(p.name == "demo" for p in settings.providers):
        return settings
    providers = (*settings.providers, ProviderConfig(name="demo", type="demo"))
    models = settings.models
    if not any(m.name == "demo" for m in models):
        models = (*models, DEMO_MODEL)
    return msgspec.structs.replace(settings, providers=providers, models=models)


def _resolve(settings: Settings, environ: Mapping[str, str]) -> Settings:
    """Resolve `env:` secrets and check every cross-reference."""
    settings = _with_demo(settings)
    admin_key = settings.server.admin_key
    if admin_key is not None and admin_key.startswith("env:"):
        # An unset admin key variable turns the admin API off rather than refusing to start.
        admin_key = environ.get(admin_key[4:]) or None
    if admin_key is not None and len(admin_key) < 16:
        raise ConfigError("server.admin_key: must be at least 16 characters")
    server = msgspec.structs.replace(settings.server, admin_key=admin_key)

    providers: list[ProviderConfig] = []
    seen: set[str] = set()
    for i, p in enumerate(settings.providers):
        where = f"providers[{i}]"
        if p.name in seen:
            raise ConfigError(f"{where}.name: duplicate provider name {p.name!r}")
        seen.add(p.name)
        if p.type in ("anthropic", "gemini") and not p.api_keys:
            raise ConfigError(f"{where}.api_keys: {p.type} providers need at least one key")
        if p.responses_api and p.type != "openai":
            raise ConfigError(f"{where}.responses_api: only openai providers can serve it")
        if p.base_url is not None and not p.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url: must start with http:// or https://")
        if p.base_url is not None and p.type in _ROOT_ONLY:
            path = urllib.parse.urlsplit(p.base_url).path.rstrip("/")
            if path.endswith(_ROOT_ONLY[p.type]):
                raise ConfigError(
                    f"{where}.base_url: give the API root (as {p.type}'s SDK takes it, e.g. "
                    f"{DEFAULT_BASE_URLS[p.type]}); the gateway adds the rest of the path"
                )
        keys = tuple(
            _resolve_secret(k, f"{where}.api_keys[{j}]", environ) for j, k in enumerate(p.api_keys)
        )
        headers = {
            k: _resolve_secret(v, f"{where}.headers.{k}", environ) for k, v in p.headers.items()
        }
        providers.append(msgspec.structs.replace(p, api_keys=keys, headers=headers))

    names: set[str] = set()
    for i, m in enumerate(settings.models):
        where = f"models[{i}]"
        if m.name in names:
            raise ConfigError(f"{where}.name: duplicate model name {m.name!r}")
        names.add(m.name)
        for j, t in enumerate(m.targets):
            if t.provider not in seen:
                raise ConfigError(
                    f"{where}.targets[{j}].provider: no provider named {t.provider!r}"
                )
    groups: set[str] = set()
    for i, g in enumerate(settings.groups):
        if g.name in groups:
            raise ConfigError(f"groups[{i}].name: duplicate group name {g.name!r}")
        groups.add(g.name)
    resolved = msgspec.structs.replace(settings, server=server, providers=tuple(providers))
    default = server.default_model
    if default and resolved.model(default) is None:
        prefix = default.split("/", 1)[0]
        if "/" not in default or prefix not in seen:
            raise ConfigError(f"server.default_model: no model named {default!r}")
    return resolved


def _describe(err: msgspec.MsgspecError) -> str:
    """msgspec says "Expected `int`, got `str` - at `$.server.port`"; put the path first."""
    text = str(err)
    if " - at `$." in text:
        problem, _, path = text.rpartition(" - at `$.")
        return f"{path.rstrip('`')}: {problem}"
    return text


DEMO_MODEL = ModelConfig(
    name="demo",
    targets=(Target(provider="demo", model="demo"),),
    description="Offline demo model: answers from your last message.",
)


def default_settings(environ: Mapping[str, str]) -> Settings:
    """The embedded default: the offline demo model, plus one provider per API key found."""
    providers: list[ProviderConfig] = []
    models: list[ModelConfig] = []
    if environ.get("OPENAI_API_KEY"):
        providers.append(
            ProviderConfig(
                name="openai",
                type="openai",
                base_url=environ.get("OPENAI_BASE_URL") or None,
                api_keys=("env:OPENAI_API_KEY",),
                reasoning_models=REASONING_MODELS["openai"],
            )
        )
        models.append(
            ModelConfig(
                name="gpt-4o-mini",
                targets=(Target(provider="openai", model="gpt-4o-mini"),),
                input_price_per_mtok=0.15,
                output_price_per_mtok=0.60,
            )
        )
    native: tuple[tuple[str, ProviderType], ...] = (
        ("ANTHROPIC_API_KEY", "anthropic"),
        ("GEMINI_API_KEY", "gemini"),
    )
    for var, name in native:
        if environ.get(var):
            providers.append(
                ProviderConfig(
                    name=name,
                    type=name,
                    api_keys=(f"env:{var}",),
                    reasoning_models=REASONING_MODELS[name],
                )
            )
    return _resolve(Settings(providers=tuple(providers), models=tuple(models)), environ)


def load_settings(path: str | os.PathLike[str] | None, environ: Mapping[str, str]) -> Settings:
    """Load settings from `path`, `$GATEWAY_CONFIG`, `./gateway.toml` or the embedded default.

    Raises:
        ConfigError: the file is missing, is not TOML, or has a bad field (one line says which).
    """
    if path is None:
        path = environ.get("GATEWAY_CONFIG") or None
    if path is None and Path("gateway.toml").is_file():
        path = "gateway.toml"
    if path is None:
        return default_settings(environ)
    where = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read config file ({exc.strerror})") from None
    try:
        settings = msgspec.toml.decode(raw, type=Settings)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{where}: {_describe(exc)}") from None
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: not valid UTF-8") from None
    try:
        return _resolve(settings, environ)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
