"""What images, files and audio in a request cost in tokens, as the providers bill them.

Images follow each provider's published formula: OpenAI bills 512-pixel tiles (after scaling
into 2048x2048, then the short side to 768; `detail: low` is the base alone) or, for its
mini and nano models, 32-pixel patches; Anthropic bills width x height / 750 after scaling
into 1568 pixels and 1.15 megapixels; Gemini 258 tokens per 768-pixel tile (Gemini 3: 1120 an
image). The size is read from the image's own header when it comes as a data URL; an image by
URL counts as 1024x1024 (likely) and the most the formula allows (at most). Files and audio
count by their size: a file's bytes / 4 (likely) and its bytes (at most), audio at 32 tokens a
second of speech-quality sound. A file sent by id has no size the gateway can see: it counts a
fixed amount (`FILE_BY_ID`).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import io
import math
from dataclasses import dataclass

import imagesize
import msgspec

__all__ = ["FILE_BY_ID", "Estimate", "audio_tokens", "file_tokens", "image_tokens"]


@dataclass(frozen=True, slots=True)
class Estimate:
    """Tokens a part of a request will likely cost, and the most it can (`most >= likely`)."""

    likely: int
    most: int

    def __add__(self, other: Estimate) -> Estimate:
        return Estimate(self.likely + other.likely, self.most + other.most)

    def scaled(self, factor: int) -> Estimate:
        return Estimate(self.likely * factor, self.most * factor)


FILE_BY_ID = Estimate(10_000, 100_000)
_LIKELY_SIDE = 1024  # an image whose size is unknown, as most clients send one
_MOST_SIDE = 2048  # and as large as a provider takes it before scaling it down
# Only this much of a data URL is decoded to find an image's size in its header.
_HEADER_CHARS = 512 * 1024

# OpenAI: (model pattern, base, per tile) for tile-billed models, most specific first; and
# (pattern, multiplier) for the patch-billed ones.
_OPENAI_PATCHES = (
    ("gpt-4.1-mini*", 1.62),
    ("gpt-4.1-nano*", 2.46),
    ("gpt-5-mini*", 1.62),
    ("gpt-5-nano*", 2.46),
    ("o4-mini*", 1.72),
)
_OPENAI_TILES = (
    ("gpt-4o-mini*", 2833, 5667),
    ("gpt-5*", 70, 140),
    ("o1-pro*", 75, 150),
    ("computer-use*", 65, 129),
    ("*", 85, 170),
)


def _match(model: str, pattern: str) -> bool:
    return fnmatch.fnmatchcase(model.lower(), pattern)


def _fit(w: float, h: float, box: float) -> tuple[float, float]:
    scale = min(1.0, box / max(w, h))
    return w * scale, h * scale


def _openai(model: str, w: int, h: int, detail: str | None) -> int:
    for pattern, multiplier in _OPENAI_PATCHES:
        if _match(model, pattern):
            patches = math.ceil(w / 32) * math.ceil(h / 32)
            if patches > 1536:  # scaled down to fit 1536 patches
                scale = math.sqrt(1536 * 32 * 32 / (w * h))
                patches = min(1536, math.ceil(w * scale / 32) * math.ceil(h * scale / 32))
            return math.ceil(patches * multiplier)
    base, per_tile = next((b, t) for p, b, t in _OPENAI_TILES if _match(model, p))
    if detail == "low":
        return base
    fw, fh = _fit(w, h, 2048)
    short = min(fw, fh)
    if short > 768:
        fw, fh = fw * 768 / short, fh * 768 / short
    return base + per_tile * math.ceil(fw / 512) * math.ceil(fh / 512)


def _anthropic(w: int, h: int) -> int:
    fw, fh = _fit(w, h, 1568)
    area = fw * fh
    if area > 1_150_000:
        fw, fh = fw * math.sqrt(1_150_000 / area), fh * math.sqrt(1_150_000 / area)
    return math.ceil(fw * fh / 750)


def _gemini(model: str, w: int, h: int) -> int:
    if _match(model, "gemini-3*"):
        return 1120
    if w <= 384 and h <= 384:
        return 258
    return 258 * math.ceil(w / 768) * math.ceil(h / 768)


def _tokens(kind: str, model: str, w: int, h: int, detail: str | None) -> int:
    if kind == "anthropic":
        return _anthropic(w, h)
    if kind == "gemini":
        return _gemini(model, w, h)
    return _openai(model, w, h, detail)  # OpenAI, Azure, and OpenAI-compatible servers


def _data_url(url: str) -> tuple[str, str] | None:
    """(media type, base64 payload) of a base64 data URL, else None."""
    if not url.startswith("data:"):
        return None
    head, sep, payload = url.partition(",")
    if not sep or not head.endswith(";base64"):
        return None
    return head[5:-7], payload


def _decode(payload: str) -> bytes:
    try:
        return base64.b64decode(payload[: len(payload) - len(payload) % 4], validate=False)
    except (binascii.Error, ValueError):
        return b""


def image_dimensions(url: str) -> tuple[int, int] | None:
    """An image's size from the header of its data URL; None for URLs and unreadable data."""
    found = _data_url(url)
    if found is None:
        return None
    # A byte stream only: given a str, imagesize would open a file or fetch a URL.
    w, h = imagesize.get(io.BytesIO(_decode(found[1][:_HEADER_CHARS])))
    return (w, h) if w > 0 and h > 0 else None


def image_tokens(kind: str, model: str, url: str, detail: str | None) -> Estimate:
    """What one image costs on a provider of type `kind` serving `model`."""
    dims = image_dimensions(url)
    if dims is not None:
        cost = _tokens(kind, model, *dims, detail)
        return Estimate(cost, cost)
    likely = _tokens(kind, model, _LIKELY_SIDE, _LIKELY_SIDE, detail)
    most = max(
        _tokens(kind, model, w, h, detail)
        for w, h in ((_MOST_SIDE, _MOST_SIDE), (768, _MOST_SIDE), (_MOST_SIDE, 768))
    )
    return Estimate(likely, max(likely, most))


def _payload_bytes(data: str) -> int:
    found = _data_url(data)
    payload = found[1] if found is not None else data
    return len(payload) * 3 // 4


class _File(msgspec.Struct):
    file_data: str | None = None
    file_id: str | None = None


_FILE = msgspec.json.Decoder(_File)


def file_tokens(raw: msgspec.Raw) -> Estimate:
    """A `file` content part: its inline data by size, a file id by `FILE_BY_ID`."""
    try:
        part = _FILE.decode(raw)
    except msgspec.MsgspecError:
        part = _File()
    if part.file_data:
        size = _payload_bytes(part.file_data)
        return Estimate(math.ceil(size / 4), size)
    return FILE_BY_ID


def audio_tokens(data: str, fmt: str) -> Estimate:
    """An `input_audio` part: 32 tokens a second, the length judged from the size (16 kB a
    second of WAV or 1 kB of compressed audio at the least, likely 32 kB and 4 kB)."""
    size = _payload_bytes(data)
    if fmt.lower() in ("wav", "pcm16", "pcm"):
        return Estimate(math.ceil(size / 1000), math.ceil(size / 500))
    return Estimate(math.ceil(size / 125), math.ceil(size / 32))
