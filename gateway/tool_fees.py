"""What the Responses API's built-in tools bill beyond tokens, besides web searches
(`prices.Rates.web_search`): file searches a call each, code interpreter containers each,
and the images the `image_generation` tool makes at its image model's output rate.

OpenAI's published rates (its pricing page and image generation guide, 2026), not the price
list's, which has none of these but the image models' rates: a file search $2.50 a thousand
calls; a container $0.03 to $1.92 by its memory; an image its image tokens by quality and size
(gpt-image-1's table, gpt-image-1-mini's own; other sizes scaled by pixels) at the image
model's rate, and 100 image tokens each partial image streamed. What a request does not pin
(`auto`) is charged at the most it can be: high quality, the largest standard size; an
answer's own quality and size only lower that. A quality above `high` (`xhigh`, `max`) bills
token counts no one publishes: refused to keys with a USD budget (`ServerTools.unpriced`).

A request's tools (`ServerTools.of`) hold at admission: `max_tool_calls` calls, or
`UNCAPPED_SEARCHES` without it, each at the most one of them bills, on the routes that run
the tools. The answer's items are charged: a whole answer's `output`, a stream's items as
each is added (billed as it runs: counted if cut) and the terminal `response`'s output once
it comes; a request cut before its answer that forced a tool (`tool_choice`) and saw no call
of it is charged one. Calls counted are never more than `max_tool_calls` (or
`MOST_SEARCHES`): a hostile upstream cannot charge a key for calls it did not make room for.
A stored prompt (`prompt`) carries tools the request does not name: its answer's calls are
charged, and nothing is held for them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import msgspec

from gateway.schemas.responses import ToolChoiceObject

__all__ = [
    "CONTAINER_PRICES",
    "FILE_SEARCH_PRICE",
    "LONGEST_MODEL",
    "MOST_SEARCHES",
    "PARTIAL_IMAGE_TOKENS",
    "SEARCH_CALL",
    "UNCAPPED_SEARCHES",
    "UNKNOWN_IMAGE_RATE",
    "Item",
    "ServerTools",
    "base_model",
    "image_tokens",
]

# A request's built-in web search tool without a limit of its own (Anthropic's `max_uses`,
# the Responses API's `max_tool_calls`) is held as this many calls (searches), each billed a
# call; a limit past MOST_SEARCHES is refused (a key's budget holds each search).
UNCAPPED_SEARCHES = 10
MOST_SEARCHES = 1000
FILE_SEARCH_PRICE = 0.0025  # USD a call ($2.50 a thousand)
# USD a container by its memory limit (a session of up to 20 minutes); one named by id is
# charged as the smallest, which is what the request's own `auto` ones default to.
CONTAINER_PRICES = {"1g": 0.03, "4g": 0.12, "16g": 0.48, "64g": 1.92}
# Image output tokens by quality, for 1024x1024, 1024x1536 and 1536x1024: gpt-image-1's
# (OpenAI's image generation guide), and gpt-image-1-mini's from its per-image prices at its
# $8 a million (its model page: low $0.005 and $0.006, medium $0.011 and $0.015, high $0.036
# and $0.052).
_SIZES = ("1024x1024", "1024x1536", "1536x1024")
_IMAGE_TOKENS = {"low": (272, 408, 400), "medium": (1056, 1584, 1568), "high": (4160, 6240, 6208)}
_MODEL_TOKENS = {
    "gpt-image-1-mini": {
        "low": (625, 750, 750),
        "medium": (1375, 1875, 1875),
        "high": (4500, 6500, 6500),
    }
}
# (An image model not known by name, or several the request names: each count at its most.)
_MOST_TOKENS = {
    quality: tuple(
        max(table[quality][at] for table in (_IMAGE_TOKENS, *_MODEL_TOKENS.values()))
        for at in range(len(_SIZES))
    )
    for quality in _IMAGE_TOKENS
}
_QUALITIES = frozenset({"low", "medium", "high", "auto"})
_FORMATS = frozenset({"png", "jpeg", "webp"})  # (one image each: a `gif` is many frames)
# A dated snapshot of a model (`gpt-image-1-mini-2025-10-06`): the model's table and rate.
_SNAPSHOT = re.compile(r"-\d{4}-\d{2}-\d{2}$")
# The forced calls of a cut request, cheapest first: one call of the first forced is charged
# (a web search at the model's price: `Call.web_searches`).
SEARCH_CALL = "web_search_call"
_CHEAPEST_FIRST = (
    "file_search_call",
    SEARCH_CALL,
    "image_generation_call",
    "code_interpreter_call",
)
_SQUARE = 1024 * 1024
_LARGEST_EDGE = 8192  # (a size past it is no size an image model makes: held as the largest)
PARTIAL_IMAGE_TOKENS = 100
IMAGE_MODEL = "gpt-image-1"  # (the tool's default)
LONGEST_MODEL = 256  # (an image model named longer is looked up nowhere: priced as unknown)
# USD a million image output tokens for an image model the price list lacks: the most it asks.
UNKNOWN_IMAGE_RATE = 40.0


def image_tokens(quality: object, size: object, model: str = IMAGE_MODEL) -> int:
    """The image output tokens one image of `quality` and `size` bills; what is not a known
    quality or a size (`auto`, absent) at the most it can be; another `WIDTHxHEIGHT` (gpt-image-2
    makes them) scaled from the square's count by its pixels."""
    table = _MODEL_TOKENS.get(base_model(model), _IMAGE_TOKENS if model else _MOST_TOKENS)
    rows = (
        (table[quality],)
        if isinstance(quality, str) and quality in table
        else tuple(table.values())
    )
    if isinstance(size, str) and size in _SIZES:
        at = _SIZES.index(size)
        return max(row[at] for row in rows)
    pixels = _pixels(size)
    if pixels is None:
        return max(max(row) for row in rows)
    # (Never below the square's count: a smaller size is no cheaper to hold than one the
    # upstream may make instead.)
    return max(math.ceil(row[0] * max(pixels, _SQUARE) / _SQUARE) for row in rows)


def base_model(model: str) -> str:
    """A model's name without the date of a snapshot (`gpt-image-1-mini-2025-10-06`)."""
    return _SNAPSHOT.sub("", model) if model[-3:-2] == "-" else model


def _pixels(size: object) -> int | None:
    """A `WIDTHxHEIGHT` size's pixels, or None when it is none (`auto`, garbage, too large)."""
    if not isinstance(size, str) or size.count("x") != 1:
        return None
    width, height = size.split("x")
    digits = width + height
    if not (digits.isascii() and width.isdigit() and height.isdigit() and len(digits) < 11):
        return None
    w, h = int(width), int(height)
    if not (0 < w <= _LARGEST_EDGE and 0 < h <= _LARGEST_EDGE):
        return None
    return w * h


class _Tool(msgspec.Struct):
    """A built-in tool of the request, as far as its bill goes (every field read leniently:
    the request was checked on the way, and the upstream refuses what it does not take)."""

    type: object = None
    model: object = None
    quality: object = None
    size: object = None
    partial_images: object = None
    container: object = None
    output_format: object = None


class Item(msgspec.Struct):
    """An output item of an answer, as far as its bill goes."""

    type: object = None
    id: object = None
    status: object = None
    container_id: object = None
    quality: object = None
    size: object = None


_TOOL = msgspec.json.Decoder(_Tool)
_BILLED = frozenset({"file_search_call", "code_interpreter_call", "image_generation_call"})
_FORCEABLE = _BILLED | {SEARCH_CALL}


def _container_price(container: object) -> float:
    """What a code interpreter tool's container bills: an `auto` one's by its memory limit
    (1g unless set; one not known at the most), one named by id as the smallest."""
    if not isinstance(container, dict):
        return CONTAINER_PRICES["1g"]
    memory = container.get("memory_limit")
    if memory is None:
        return CONTAINER_PRICES["1g"]
    return (
        CONTAINER_PRICES.get(memory, max(CONTAINER_PRICES.values()))
        if isinstance(memory, str)
        else max(CONTAINER_PRICES.values())
    )


def _forced(choice: object, kinds: list[object]) -> str:
    """The billed call a `tool_choice` forces, the cheapest of those it may be ("" none): one
    naming a billed tool; "required", or `allowed_tools` in `required` mode, when every tool
    it leaves is a billed one."""
    if choice == "required":
        left = kinds
    elif isinstance(choice, ToolChoiceObject):
        if choice.type != "allowed_tools":
            left = [choice.type]
        elif choice.mode == "required" and isinstance(choice.tools, list):
            left = []
            for raw in choice.tools:
                try:
                    left.append(_TOOL.decode(raw).type)
                except (msgspec.MsgspecError, RecursionError):
                    return ""
        else:
            return ""
    else:
        return ""
    calls = {_call_of(kind) for kind in left}
    if not calls or not calls <= _FORCEABLE:
        return ""
    return next(call for call in _CHEAPEST_FIRST if call in calls)


def _call_of(kind: object) -> str:
    """The output item a tool's call is (every web search tool's: `web_search_call`)."""
    if not isinstance(kind, str):
        return ""
    return SEARCH_CALL if kind.startswith("web_search") else f"{kind}_call"


class ServerTools:
    """A Responses request's built-in tools that bill beyond tokens, and what its answer's
    calls of them have cost so far (`cost`)."""

    __slots__ = (
        "_containers",
        "_given_up",
        "_images",
        "_items",
        "_partials",
        "answered",
        "container_price",
        "forced",
        "image_model",
        "image_quality",
        "image_size",
        "most_calls",
        "partial_images",
        "tools",
        "unpriced",
    )

    def __init__(self, tools: frozenset[str], most_calls: int | None) -> None:
        self.tools = tools
        self.most_calls = most_calls
        self.image_model = IMAGE_MODEL
        self.image_quality: object = None
        self.image_size: object = None
        self.partial_images = 0
        self.container_price = CONTAINER_PRICES["1g"]
        self.forced = ""  # the call type `tool_choice` forces ("" none)
        self.unpriced = ""  # the field of a request whose calls no published price covers
        # Calls counted, by their place in the output (or id): type and, for an image, tokens.
        self._items: dict[object, tuple[object, int]] = {}
        # Code interpreter calls by place (or id): the container each ran in (one may serve
        # several; a call seen before its container id is said counts once).
        self._containers: dict[object, object] = {}
        self._images = 0
        self._partials = 0
        self.answered = False  # an answer came, whole, terminal or an error: none was cut
        self._given_up = 0  # attempts given up on, each charged a forced call

    @classmethod
    def of(
        cls,
        tools: Iterable[msgspec.Raw],
        most_calls: object,
        choice: object = None,
        prompt: bool = False,
    ) -> ServerTools | None:
        """The request's tools that bill beyond tokens (the calls its `tool_choice`, a
        `ToolChoiceObject` or "required", forces), or None when it has none and no stored
        `prompt` that may carry some. Several image tools are priced at the most of each
        field they differ in."""
        found: set[str] = set()
        kinds: list[object] = []  # (every tool's type, for "required")
        images: list[tuple[int, _Tool]] = []
        container_price = 0.0
        for at, raw in enumerate(tools):
            try:
                tool = _TOOL.decode(raw)
            except (msgspec.MsgspecError, RecursionError):
                continue  # (refused with its field's name on the way)
            kind = tool.type
            kinds.append(kind)
            if kind == "image_generation":
                images.append((at, tool))
            elif kind == "code_interpreter":
                container_price = max(container_price, _container_price(tool.container))
            elif kind != "file_search":
                continue
            found.add(kind)
        forced = _forced(choice, kinds) if choice is not None else ""
        if not found and not prompt and not forced:
            return None
        made = cls(frozenset(found), most_calls if type(most_calls) is int else None)
        made.container_price = container_price or CONTAINER_PRICES["1g"]
        made.forced = forced
        if images:
            made._take_images(images)
        elif prompt:
            made.partial_images = 3  # (the most a stored prompt's image tool may ask for)
        return made

    def _take_images(self, images: list[tuple[int, _Tool]]) -> None:
        """Price images at the request's image tools; refuse (`unpriced`) what none prices."""
        models, qualities, sizes = set(), set(), set()
        for at, tool in images:
            model, quality = tool.model, tool.quality
            if model is None:
                models.add(IMAGE_MODEL)  # (the tool's default)
            elif isinstance(model, str) and len(model) <= LONGEST_MODEL:
                models.add(model)
            else:  # (a model id only is looked up; else priced as the most any asks)
                models.add("")
            if quality is not None and not (isinstance(quality, str) and quality in _QUALITIES):
                self.unpriced = self.unpriced or f"tools[{at}].quality"
            form = tool.output_format
            if form is not None and not (isinstance(form, str) and form in _FORMATS):
                self.unpriced = self.unpriced or f"tools[{at}].output_format"
            qualities.add(quality if isinstance(quality, str) else None)
            sizes.add(tool.size if isinstance(tool.size, str) else None)
            partials = tool.partial_images
            if type(partials) is int and 0 < partials <= 3:
                self.partial_images = max(self.partial_images, partials)
        self.image_model = models.pop() if len(models) == 1 else ""
        self.image_quality = qualities.pop() if len(qualities) == 1 else None
        self.image_size = sizes.pop() if len(sizes) == 1 else None

    def _image_tokens(self, quality: object = None, size: object = None) -> int:
        """One image's tokens: at the request's quality and size, or at the answer's own
        where those bill less (never more: a hostile upstream's word raises nothing)."""
        bound = image_tokens(self.image_quality, self.image_size, self.image_model)
        if quality is None and size is None:
            return bound
        said = image_tokens(
            quality if quality is not None else self.image_quality,
            size if size is not None else self.image_size,
            self.image_model,
        )
        return min(said, bound)

    def held(self, image_rate: float) -> float:
        """What admission holds for the calls: `max_tool_calls` (else `UNCAPPED_SEARCHES`),
        each at the most one of the tools bills (an image with its partial images at
        `image_rate`, USD a million tokens)."""
        most = 0.0
        if "file_search" in self.tools:
            most = FILE_SEARCH_PRICE
        if "code_interpreter" in self.tools:
            most = max(most, self.container_price)
        if "image_generation" in self.tools:
            tokens = self._image_tokens() + self.partial_images * PARTIAL_IMAGE_TOKENS
            most = max(most, tokens * image_rate / 1_000_000)
        calls = self.most_calls if self.most_calls is not None else UNCAPPED_SEARCHES
        return most * min(calls, MOST_SEARCHES)

    def cost(self, image_rate: float) -> float:
        """What the calls counted so far cost (images at `image_rate`)."""
        files = images = 0
        for kind, tokens in self._items.values():
            if kind == "file_search_call":
                files += 1
            else:
                images += tokens
        images += self._partials * PARTIAL_IMAGE_TOKENS
        containers = len(set(self._containers.values()))
        forced = self.forced
        if self._given_up and forced == "file_search_call":
            files += self._given_up
        elif self._given_up and forced == "code_interpreter_call":
            containers += self._given_up
        elif self._given_up:
            images += self._given_up * self._image_tokens()
        return (
            files * FILE_SEARCH_PRICE
            + containers * self.container_price
            + images * image_rate / 1_000_000
        )

    def take(self, item: Item, at: object) -> None:
        """Count one output item, `at` its key when it has no id (its place in the output):
        the same call seen again (added, then done, then in the terminal response) counts
        once, with what it says last; a failed file search or image is not billed, a
        container runs (and bills) whether or not its code failed."""
        kind = item.type
        if kind not in _BILLED:
            return
        # (By its place in the output, which each event of a stream names and the terminal
        # `response` keeps; by its id only where an event gives no place.)
        key = at if type(at) is int else item.id if isinstance(item.id, str) and item.id else at
        if kind == "code_interpreter_call":
            container = item.container_id
            place = container if isinstance(container, str) and container else key
            if key in self._containers or self._room():
                self._containers[key] = place
            return
        if item.status == "failed":
            if self._items.pop(key, ("", 0))[0] == "image_generation_call":
                self._images -= 1
            return
        tokens = 0 if kind == "file_search_call" else self._image_tokens(item.quality, item.size)
        if key in self._items:
            if self._items[key][0] == kind:  # (an id the upstream gave two calls: the first's)
                self._items[key] = (kind, tokens)
        elif self._room():
            self._items[key] = (kind, tokens)
            self._images += kind == "image_generation_call"

    def partial_image(self) -> None:
        """Count one partial image a stream sent (billed beyond its image)."""
        if self._partials < self.partial_images * max(1, self._images):
            self._partials += 1

    def cut(self, searches: int) -> int:
        """The request was cut before its answer (the client hung up, the stream broke): a
        call its `tool_choice` forced and no item showed is charged all the same, the
        upstream having it to make. Not after an answer, whole or failed (`answered`). A
        forced web search, priced with the model (`Call.web_searches`), is handed back: 1 when
        none of the `searches` seen, else 0."""
        forced = self.forced
        if self.answered or not forced:
            return 0
        if forced == SEARCH_CALL:
            return 0 if searches else 1
        if forced == "code_interpreter_call":
            if not self._containers:
                self._containers[_UNSEEN] = _UNSEEN
        elif not any(kind == forced for kind, _ in self._items.values()):
            self.take(Item(type=forced), _UNSEEN)
        return 0

    def given_up(self, attempts: int) -> int:
        """`attempts` attempts the gateway gave up waiting for had the request upstream: each
        is charged the call its `tool_choice` forced (their items are never seen; each made
        its own, beside what the answering attempt's `max_tool_calls` allows). Forced web
        searches are handed back, as by `cut`."""
        if self.forced == SEARCH_CALL:
            return attempts
        if self.forced:
            self._given_up += attempts
        return 0

    def _room(self) -> bool:
        """Whether one more call may be counted (`max_tool_calls`, else `MOST_SEARCHES`)."""
        most = self.most_calls if self.most_calls is not None else MOST_SEARCHES
        return len(self._items) + len(self._containers) < min(most, MOST_SEARCHES)


_UNSEEN = "(forced, unseen)"
