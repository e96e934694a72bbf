"""The configuration's shape: frozen msgspec structs that a TOML file decodes into.

Unknown or mistyped fields fail the decode with the field's path; `gateway.config` loads and
checks a file (or builds the embedded default) and is where the cross-references are checked.
"""

from __future__ import annotations

import fnmatch
from typing import TYPE_CHECKING, Annotated, ClassVar, Literal

import msgspec

from gateway.errors import InvalidRequest
from gateway.records import KEY_FIELDS, LIMIT_FIELDS

__all__ = [
    "DEFAULT_BASE_URLS",
    "AnthropicConfig",
    "AzureConfig",
    "ConfigError",
    "DemoConfig",
    "GeminiConfig",
    "GroupConfig",
    "MetricsSettings",
    "ModelConfig",
    "OpenAIConfig",
    "PriceSettings",
    "ProviderConfig",
    "RoutingSettings",
    "ServerSettings",
    "Settings",
    "Target",
    "UpstreamConfig",
]

DEFAULT_BASE_URLS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com",
    "azure": "",  # required: the resource's own endpoint
}

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
# The most a price may be, USD per million tokens (the dearest models cost hundreds): above it,
# a typo or `inf`, whose cost would be infinite.
MAX_PRICE_PER_MTOK = 1_000_000.0
PricePerMtok = Annotated[float, msgspec.Meta(ge=0, le=MAX_PRICE_PER_MTOK)]
# As a browser sends it in `Origin`: scheme, host and port only (no path, no slash at the end).
Origin = Annotated[str, msgspec.Meta(pattern=r"^(\*|https?://[^/\s]+)$", max_length=256)]
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
    # Like nginx's: the longest a client may take to send a request's headers (from the
    # connection's start or the first byte of a later request), and its whole body.
    client_header_timeout: PositiveFloat = 60.0
    client_body_timeout: PositiveFloat = 60.0
    # Run on uvloop where it is installed (Linux, macOS); false: asyncio's own event loop.
    uvloop: bool = True
    # Connections the kernel queues before the gateway accepts them. The usual 128 drops
    # connection attempts under bursts of a thousand clients, which then wait seconds to retry.
    listen_backlog: PositiveInt = 1024
    # Browser origins (`https://app.example.com`, or `*` for any) whose pages may call the
    # API: preflights are answered and answers carry CORS headers. Default: none.
    cors_origins: tuple[Origin, ...] = ()
    # Rate limits, concurrency and budgets shared by every replica (`redis://host:6379/0`);
    # unset: in memory, per process. When Redis cannot be reached: "refuse" answers 503,
    # "local" falls back to this replica's own in-memory limits.
    redis_url: str | None = None
    redis_failure: Literal["refuse", "local"] = "refuse"
    redis_timeout_seconds: Annotated[float, msgspec.Meta(gt=0, le=5)] = 0.5
    # The dashboard at /dashboard (on whenever there is an admin key, unless this is false),
    # how long a sign-in lasts, and whether to trust `X-Forwarded-Proto: https` from a proxy
    # in front (then its session cookie is `Secure` even though the proxy speaks plain HTTP).
    dashboard: bool = True
    dashboard_session_hours: Annotated[float, msgspec.Meta(gt=0, le=24 * 30)] = 12.0
    trust_forwarded_proto: bool = False


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
    # An account whose credentials the upstream refused is out this long, then probed again.
    auth_cooldown: PositiveFloat = 300.0


class _Provider(_Base, frozen=True, kw_only=True, tag_field="type"):
    """What every provider type has; the `type` tag picks the rest (a tagged union)."""

    name: Name
    # Glob patterns of upstream model names that accept `reasoning_effort`, for
    # "<provider>/<model>" ids that have no [[models]] entry of their own.
    reasoning_models: tuple[str, ...] = ()
    # Output limit for upstreams that require one (Anthropic's `max_tokens`) when neither the
    # request nor the model config sets one; also the limit sent upstream for keys with a
    # token or USD budget or tokens per minute, which admission reserves.
    default_max_tokens: PositiveInt = 4096
    # Whose prices apply to this provider's models when a model's config has none: a
    # genai-prices provider id (default: openai, azure, anthropic or google by type), "free"
    # (a server you run yourself), or "none" (only config prices).
    pricing: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None

    @property
    def type(self) -> str:
        return str(self.__struct_config__.tag)


class UpstreamConfig(_Provider, frozen=True, kw_only=True):
    """An upstream reached over HTTP: where it is, how to authenticate, how long to wait."""

    base_url: str | None = None
    api_keys: tuple[str, ...] = ()
    # Extra headers sent with every upstream request (e.g. OpenRouter's HTTP-Referer).
    headers: dict[str, str] = {}
    connect_timeout: PositiveFloat = 10.0
    # Streams: time to the first event (default: read_timeout). A non-streaming answer comes
    # only once it is generated, so there read_timeout and total_timeout bound the wait.
    first_byte_timeout: PositiveFloat | None = None
    # The longest silence: between stream events, or waiting for a non-streaming answer.
    read_timeout: PositiveFloat = 300.0
    # Whole-request bound for non-streaming calls; streams are bounded by read_timeout only.
    total_timeout: PositiveFloat = 600.0
    # Connections open to this provider at once; none: no limit, so a healthy stream never
    # waits behind others. With a limit, a request waits at most pool_timeout seconds for
    # one, then gets a 503 (waits are logged and counted in GET /admin/stats).
    max_connections: PositiveInt | None = None
    pool_timeout: PositiveFloat = 10.0
    # The most the gateway reads of one upstream answer (non-streaming), and of one stream
    # event, counted after decompression; past either, the client gets a 502 (or an error
    # event once its stream has started) and the upstream connection is dropped.
    max_response_bytes: PositiveInt = 64 * 1024 * 1024
    max_event_bytes: PositiveInt = 16 * 1024 * 1024
    # The most the gateway holds at once of this provider's answers and unfinished events,
    # over all its requests; past it, the request that needs more gets a 503 (another route
    # may be tried), so a hostile upstream cannot make it hold one of each per connection.
    max_buffered_bytes: PositiveInt = 256 * 1024 * 1024

    @property
    def url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URLS[self.type]).rstrip("/")


class OpenAIConfig(UpstreamConfig, frozen=True, kw_only=True, tag="openai"):
    """OpenAI, or any server that speaks its API (vLLM, Ollama, OpenRouter, DeepSeek...)."""

    # The upstream serves /v1/responses itself, so Responses API requests are passed through
    # instead of being translated to chat completions.
    responses_api: bool = False


class AzureConfig(UpstreamConfig, frozen=True, kw_only=True, tag="azure"):
    """Azure OpenAI: `base_url` is the resource (https://RESOURCE.openai.azure.com), a
    target's `model` is a deployment name, and every call names its `api_version`."""

    api_version: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9.-]{1,64}$")]


class AnthropicConfig(UpstreamConfig, frozen=True, kw_only=True, tag="anthropic"):
    """Anthropic's Messages API, translated both ways."""


class GeminiConfig(UpstreamConfig, frozen=True, kw_only=True, tag="gemini"):
    """Google's Gemini API (`generateContent`), translated both ways."""


class DemoConfig(_Provider, frozen=True, kw_only=True, tag="demo"):
    """The offline demo model: nothing to connect to, so no connection settings (a config
    that sets one is refused); what generic code reads of every provider is fixed here."""

    base_url: ClassVar[None] = None
    api_keys: ClassVar[tuple[str, ...]] = ()
    headers: ClassVar[dict[str, str]] = {}
    connect_timeout: ClassVar[float] = 1.0
    first_byte_timeout: ClassVar[float | None] = None
    read_timeout: ClassVar[float] = 60.0
    total_timeout: ClassVar[float] = 60.0
    max_connections: ClassVar[int | None] = None


ProviderConfig = OpenAIConfig | AzureConfig | AnthropicConfig | GeminiConfig | DemoConfig


class Target(_Base, frozen=True):
    provider: Name
    model: Annotated[str, msgspec.Meta(min_length=1)]
    weight: PositiveFloat = 1.0
    priority: int = 0


class ModelConfig(_Base, frozen=True):
    """A model id clients may send, and where it goes."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    targets: Annotated[tuple[Target, ...], msgspec.Meta(min_length=1)]
    # USD per million tokens, for cost accounting and USD budgets; unset: the provider's
    # price list (see `pricing`). Prompt-cache reads and writes and reasoning default to the
    # input and output prices.
    input_price_per_mtok: PricePerMtok | None = None
    output_price_per_mtok: PricePerMtok | None = None
    cache_read_price_per_mtok: PricePerMtok | None = None
    cache_write_price_per_mtok: PricePerMtok | None = None
    reasoning_price_per_mtok: PricePerMtok | None = None
    # Audio in and out and images out (reported in the usage's details) default to the input
    # and output prices; a web search (a built-in tool's call) to the price list's for the
    # upstream model, else $0.03 (`prices.PriceBook.search_price`).
    audio_input_price_per_mtok: PricePerMtok | None = None
    audio_output_price_per_mtok: PricePerMtok | None = None
    image_output_price_per_mtok: PricePerMtok | None = None
    web_search_price_per_call: PricePerMtok | None = None
    cache_write_1h_price_per_mtok: PricePerMtok | None = None  # (default: the cache-write price)
    # Used when a request sets neither max_tokens nor max_completion_tokens.
    max_tokens: PositiveInt | None = None
    # Only reasoning models accept `reasoning_effort` / `thinking`; others get a 400.
    reasoning: bool = False
    # An embedding model: /v1/models says so (`"embeddings": true`) so clients can tell.
    embeddings: bool = False
    description: str = ""


if TYPE_CHECKING:  # mypy cannot see fields made at run time; code reads them with getattr
    _GroupLimits = _Base
else:
    # A key's limit fields (records.LIMIT_FIELDS), typed and defaulting as the key has them.
    _GroupLimits = msgspec.defstruct(
        "_GroupLimits",
        [(f.name, f.type, f.default) for f in KEY_FIELDS if f.name in LIMIT_FIELDS],
        bases=(_Base,),
        frozen=True,
        kw_only=True,
        module=__name__,
    )


class GroupConfig(_GroupLimits, frozen=True, kw_only=True):
    """Defaults for the keys of a group: a key's own value, when set, wins.

    Besides `models` a group sets a key's limits and budget: every `LIMIT_FIELDS` field of
    `KeyRecord` (rpm, tpm, max_concurrency, budget_tokens, budget_usd, budget_period).
    """

    name: Name
    models: tuple[str, ...] = ()


class PriceSettings(_Base, frozen=True):
    """Where model prices come from when a model's config has none (`[prices]`)."""

    # The price database bundled with the genai-prices package (works offline).
    database: bool = True
    # Fetch newer prices at run time (off by default: no network call unless asked for).
    update: bool = False
    update_url: str | None = None  # default: the genai-prices project's published data
    update_interval: Annotated[float, msgspec.Meta(ge=60)] = 3600.0


class MetricsSettings(_Base, frozen=True):
    """`GET /metrics` in the Prometheus text format (`[metrics]`)."""

    enabled: bool = True
    # Scrapes need the admin key as a Bearer token unless this is true.
    public: bool = False
    # Tokens, cost and refusals per key; past `max_keys` keys, the rest count as `other`.
    per_key: bool = True
    max_keys: PositiveInt = 1000
    # Past this many model ids, further ones count as `other` (ids may come from clients).
    max_models: PositiveInt = 500


class Settings(_Base, frozen=True):
    server: ServerSettings = ServerSettings()
    metrics: MetricsSettings = MetricsSettings()
    routing: RoutingSettings = RoutingSettings()
    prices: PriceSettings = PriceSettings()
    providers: tuple[ProviderConfig, ...] = ()
    models: tuple[ModelConfig, ...] = ()
    groups: tuple[GroupConfig, ...] = ()

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
